"""`Context`: what an intervention sees of the running forward pass — one vocabulary for every site.

Inside an nnsight trace, a `Context` reads and edits the model's real intermediate values, layer by layer:

    ctx.residual(layer)            # [B, T, D] residual stream after decoder layer `layer`
    ctx.attention_output(layer)    # [B, T, D] self-attention output, before it is added to the stream
    ctx.mlp_output(layer)          # [B, T, D] MLP output, before it is added to the stream
    ctx.embeddings()               # [B, T, D] the stream entering layer 0
    ctx.attention_mask(layer)      # [B, 1 or H, Q, K] the additive mask layer `layer`'s attention receives
    ctx.set_attention_mask(layer, mask)
    ctx.skip(layer)                # run layer `layer` as the identity
    ctx.logits()                   # [B, T, V] the model's logits
    ctx.positions("image")         # (rows, cols) to index any [B, T, ...] site: ctx.residual(3)[ctx.positions("image")]
    ctx.source                     # the ActivationCache of another run (clean → corrupted patching), if given

and inside the vision tower, which runs before the decoder (families with vision sites: LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL / Qwen2.5-VL / Qwen3-VL; the others refuse them, naming the family):

    ctx.vision_residual(layer)     # [B_images, N, D_v] (CLIP) or [sum patches, D_v] (Qwen): after vision layer `layer`
    ctx.vision_attention_output(layer), ctx.vision_mlp_output(layer)   # the same shape, before the residual add
    ctx.projector_output()         # the multimodal projector's output: the image features the decoder reads
    ctx.vision_attention_mask(layer) / ctx.set_vision_attention_mask(layer, mask)   # [B_images, 1, N, N] (CLIP),
                                   # [1, 1, S, S] over Qwen's flattened patches (0 within each image or window)
    ctx.vision_tokens("patches")   # an index into any vision site: ctx.vision_residual(0)[ctx.vision_tokens("cls")]

Values are the live tensors of the forward pass: editing them in place changes what flows on. Sites must be
touched in forward order within one intervention (layer 2 before layer 3; a layer's mask before its output),
as the forward pass reaches them. The same `Context` is what `with model.trace(example) as ctx:` yields, so
an edit tried inline becomes an `Intervention` by moving its lines into `apply(ctx)`.

A sweep engine may run several variants as rows of one forward over only the positions after a cached prefix.
It then gives each variant a context `restricted` to its rows (`Restriction`): sites are that row slice, from
the forward's first position on; positions count from that position; mask edits change those rows only.

`ActivationCache` holds the sites of one run of one example (`Model.cache`), as the source a patch reads from
(`ctx.source`): TransformerLens' `run_with_cache` and its clean cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mmscope.errors import InterventionError, known
from mmscope.models.adapter import attribute_path
from mmscope.sites import SITES, VISION_SITES

if TYPE_CHECKING:
    from mmscope.layout import Example
    from mmscope.models.adapter import Adapter

Group = str | tuple[int, ...]


class Sites:
    """The nnsight envoys of one model's parts, found once through its adapter's paths."""

    def __init__(self, envoy, adapter: Adapter) -> None:
        self.adapter = adapter
        self.layers = attribute_path(envoy, adapter.layers)
        self.lm_head = attribute_path(envoy, adapter.lm_head)
        self.decoder = attribute_path(envoy, adapter.layers.rsplit(".", 1)[0])  # the parent of the layers
        self.n_layers = len(self.layers)
        self.n_heads = adapter.text_config.num_attention_heads
        self.envoy = envoy

    def layer(self, layer: int):
        if not _whole(layer) or not 0 <= layer < self.n_layers:
            what = "out of range" if _whole(layer) else "is not a whole number"
            shown = layer if _whole(layer) else repr(layer)
            raise InterventionError(f"layer {shown} {what}; the model has layers 0..{self.n_layers - 1}")
        return self.layers[layer]

    def attention(self, layer: int):
        return attribute_path(self.layer(layer), self.adapter.attention)

    def mlp(self, layer: int):
        return attribute_path(self.layer(layer), self.adapter.mlp)

    def vision_layers(self, asked: str):
        """The vision tower's layers, or the family's refusal of `asked` where it has none."""
        if self.adapter.vision_layers is None:
            raise self.adapter.no_vision_sites(asked)
        return attribute_path(self.envoy, self.adapter.vision_layers)

    def vision_layer(self, layer: int, asked: str):
        layers = self.vision_layers(asked)
        if not _whole(layer) or not 0 <= layer < len(layers):
            what = "out of range" if _whole(layer) else "is not a whole number"
            shown = layer if _whole(layer) else repr(layer)
            raise InterventionError(f"{asked}: vision layer {shown} {what}; the vision tower has layers "
                                    f"0..{len(layers) - 1}")
        return layers[layer]

    def projector(self, asked: str):
        if self.adapter.projector is None:
            raise self.adapter.no_vision_sites(asked)
        return attribute_path(self.envoy, self.adapter.projector)


@dataclass
class Restriction:
    """One variant's share of a batched forward: its `rows` of the running batch (of `batch_rows` rows), and
    `offset`, the forward's first position (earlier positions come from a cache).

    `masks` is shared by every variant of one forward: per layer, the batch's private copy of the attention
    mask that each variant writes its own rows into (copied once per layer, not once per variant).
    """

    rows: slice
    offset: int = 0
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_rows: int | None = None  # None: more rows than `rows` (a layer skip would reach other variants)
    converted: dict = field(default_factory=dict)  # the received masks as additive tensors, shared likewise


@dataclass
class ActivationCache:
    """Sites of one run of a one-row `example`: `(site, layer) -> [1, T, D]` (a site of `SITES`, "residual" being
    the stream after the layer) and, for vision sites (`VISION_SITES`), `(site, layer) ->` the site as the
    context reads it (the projector as layer 0). Built by `Model.cache`; a patch reads it as `ctx.source`."""

    example: Example
    activations: dict[tuple[str, int], torch.Tensor]
    probs: torch.Tensor | None = None  # [V] the run's next-token probabilities at the last prompt position

    def site(self, site: str, layer: int) -> torch.Tensor:
        """The cached `[1, T, D]` activation of `site` at `layer`."""
        found = self.activations.get((site, layer))
        if found is None:
            held = sorted({name for name, _ in self.activations})
            raise InterventionError(
                f"the source cache holds no {site!r} activation at layer {layer}; it holds {known(held)} at "
                f"layers {known(sorted({at for _, at in self.activations}))} — cache it with model.cache(example, "
                f"sites=[{site!r}])"
            )
        return found

    def positions(self, group: Group) -> torch.Tensor:
        """Positions `[n]` of `group` in the cached example."""
        return self.example.positions(group, 0)


class Context:
    """What an intervention sees: the running model's sites, the batch's token layout, its size.

    Attributes: `example` (the running `Example`), `n_layers`, `n_heads`, `batch_size`, `seq_len`.
    """

    def __init__(self, sites: Sites, example: Example, restriction: Restriction | None = None,
                 source: ActivationCache | None = None) -> None:
        self._sites = sites
        self._source = source
        self.example = example
        self.n_layers = sites.n_layers
        self.n_heads = sites.n_heads
        self.batch_size = len(example)
        self.seq_len = example.seq_len
        if restriction is not None and restriction.rows.stop - restriction.rows.start != self.batch_size:
            raise InterventionError(
                f"rows {restriction.rows} do not hold the {self.batch_size} row(s) of this context's example"
            )
        self._restriction = restriction
        # id(mask as received) -> (it, additive); one conversion serves every variant of a batched forward
        self._converted: dict[int, tuple[object, torch.Tensor]] = restriction.converted if restriction else {}
        self._seen: tuple | None = None  # (layer, args, kwargs): the attention inputs last read
        self._seen_vision: tuple | None = None  # likewise for a vision layer's attention

    # --- where things are -------------------------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """`layer`, or an InterventionError when the model has no such decoder layer."""
        self._sites.layer(layer)
        return layer

    def positions(self, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, cols)` index tensors of `group` over the whole batch: `x[ctx.positions("image")]` is `[n, D]`."""
        rows, cols = [], []
        for row in range(self.batch_size):
            found = self.row_positions(group, row)
            rows.append(torch.full_like(found, row))
            cols.append(found)
        return torch.cat(rows), torch.cat(cols)

    @property
    def offset(self) -> int:
        """The forward's first position (0 but in an engine's suffix pass, whose earlier positions are cached)."""
        return self._restriction.offset if self._restriction else 0

    @property
    def source(self) -> ActivationCache:
        """The activations of another run this forward may read from (clean → corrupted patching)."""
        if self._source is None:
            raise InterventionError(
                "this intervention reads a source run, and none was given: cache the clean run with "
                "`cache = model.cache(clean)` and pass `source=cache`"
            )
        return self._source

    def row_positions(self, group: Group, row: int) -> torch.Tensor:
        """Positions `[n]` of `group` in batch row `row`, counted from the forward's first position."""
        found = self.example.positions(group, row)
        offset = self.offset
        if offset and len(found) and int(found.min()) < offset:
            raise InterventionError(
                f"group {group!r} of row {row} starts at position {int(found.min())}, before this forward's first "
                f"position {offset} (earlier positions come from a cache); an intervention that touches it "
                f"must not claim affected_from > {int(found.min())}"
            )
        return found - offset

    # --- values of the running forward pass -------------------------------------------------------------------
    def residual(self, layer: int) -> torch.Tensor:
        """Residual stream after decoder layer `layer`, `[B, T, D]`."""
        return self._own_rows(_first(self._sites.layer(layer).output))

    def embeddings(self) -> torch.Tensor:
        """The residual stream entering decoder layer 0 (the decoder's input embeddings), `[B, T, D]`."""
        return self._own_rows(self._sites.layer(0).input)  # `.input` is the first argument: the hidden states

    def attention_output(self, layer: int) -> torch.Tensor:
        """Self-attention output of layer `layer` before it is added to the residual, `[B, T, D]`."""
        return self._own_rows(_first(self._sites.attention(layer).output))

    def attention_weights(self, layer: int) -> torch.Tensor:
        """Self-attention weights of layer `layer`, `[B, H, Q, K]` (after softmax, this context's rows): what
        eager attention returns beside its output. Refused where the layer gives none (sdpa attention)."""
        output = self._sites.attention(layer).output
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor):
            implementation = self._sites.adapter.text_config._attn_implementation
            fix = ("load the model with attn_implementation='eager'" if implementation != "eager" else
                   f"the {self._sites.adapter.family} family's attention module does not return them")
            raise InterventionError(
                f"layer {layer}'s self-attention gives no attention weights under {implementation!r} attention; "
                f"{fix}"
            )
        return self._own_rows(weights)

    def mlp_output(self, layer: int) -> torch.Tensor:
        """MLP output of layer `layer` before it is added to the residual, `[B, T, D]`."""
        return self._own_rows(_first(self._sites.mlp(layer).output))

    def site(self, site: str, layer: int) -> torch.Tensor:
        """One of `SITES` ("residual", "attention", "mlp") at `layer`, `[B, T, D]`."""
        check_site(site)
        readers = {"residual": self.residual, "attention": self.attention_output, "mlp": self.mlp_output}
        return readers[site](layer)

    def logits(self) -> torch.Tensor:
        """The model's logits, `[B, T, V]` in its dtype (positions from the forward's first one): the lm_head
        output, after whatever the family's forward does to it (e.g. PaliGemma 2's soft-cap)."""
        return self._sites.adapter.final_logits(self._own_rows(self._sites.lm_head.output))

    def attention_mask(self, layer: int) -> torch.Tensor:
        """The additive mask layer `layer`'s self-attention receives, `[B, 1 or H, Q, K]` (this context's rows).

        0 = attend, the dtype's minimum = blocked, in the hidden states' dtype: built as a causal mask when the
        model passed None, converted when it passed a boolean one. The model shares one mask between layers:
        never edit it in place — build a new tensor and hand it to `set_attention_mask`.
        """
        mask = self._received_mask(layer)
        return mask if self._restriction is None else mask[self._restriction.rows]

    def set_attention_mask(self, layer: int, mask: torch.Tensor) -> None:
        """Make layer `layer`'s self-attention use the additive `mask` (`[B, 1 or H, Q, K]`, this context's rows).

        Call it right after `attention_mask(layer)`, before touching any later site.
        """
        attention = self._sites.attention(layer)
        seen, self._seen = self._seen, None
        # The inputs `attention_mask(layer)` just read are still the module's (no other edit runs in between).
        args, kwargs = seen[1:] if seen is not None and seen[0] == layer else attention.inputs
        if self._restriction is not None:
            mask = self._write_rows(layer, self._additive(args, kwargs), mask)
        attention.inputs = (args, {**kwargs, "attention_mask": mask})

    def skip(self, layer: int, output: torch.Tensor | None = None) -> None:
        """Run decoder layer `layer` as the identity (its input passes on unchanged), or make it return `output`."""
        restriction = self._restriction
        if restriction is not None and restriction.batch_rows != restriction.rows.stop - restriction.rows.start:
            rows = restriction.rows
            raise InterventionError(
                f"cannot skip layer {layer} for rows {rows.start}..{rows.stop - 1} only: a skipped layer skips for "
                "the whole batch; run this intervention in a forward of its own"
            )
        envoy = self._sites.layer(layer)
        envoy.skip(envoy.input if output is None else output)

    # --- the vision tower ------------------------------------------------------------------------------------
    @property
    def n_vision_layers(self) -> int:
        """The number of layers (blocks) of the vision tower."""
        return len(self._sites.vision_layers("ctx.n_vision_layers"))

    def vision_residual(self, layer: int) -> torch.Tensor:
        """Hidden states after vision layer `layer`: `[B_images, N, D_v]` for a CLIP tower (LLaVA-1.5: one row
        per image; LLaVA-NeXT: one per tile, each image's base view then its high-resolution tiles; N = 1 + g*g,
        the CLS token at 0, then the patches row-major), `[sum of patches over images, D_v]` for Qwen-VL's
        blocks (images one after another, no CLS; Qwen2.5-VL's in window order). Index with `vision_tokens`."""
        return self._vision(self._sites.vision_layer(layer, f"ctx.vision_residual({layer})").output)

    def vision_attention_output(self, layer: int) -> torch.Tensor:
        """Self-attention output of vision layer `layer` before its residual add, shaped as `vision_residual`."""
        asked = f"ctx.vision_attention_output({layer})"
        return self._vision(attribute_path(self._sites.vision_layer(layer, asked), self._adapter.vision_attention)
                            .output)

    def vision_mlp_output(self, layer: int) -> torch.Tensor:
        """MLP output of vision layer `layer` before its residual add, shaped as `vision_residual`."""
        asked = f"ctx.vision_mlp_output({layer})"
        return self._vision(attribute_path(self._sites.vision_layer(layer, asked), self._adapter.vision_mlp).output)

    def projector_output(self) -> torch.Tensor:
        """The multimodal projector's output, the image features that enter the language model: `[B_images,
        g*g, D]` for LLaVA (CLS dropped; LLaVA-NeXT: per tile, before unpadding and row newlines are added),
        `[sum of merged tokens, D]` for Qwen-VL's merger (Qwen2.5-VL's in window order; Qwen3-VL's deepstack
        features are not in it)."""
        return self._vision(self._sites.projector("ctx.projector_output()").output)

    def vision_site(self, site: str, layer: int) -> torch.Tensor:
        """One of `VISION_SITES` at vision layer `layer` (the projector: layer 0)."""
        if check_vision_site(site, (layer,)) == "projector":
            return self.projector_output()
        readers = {"vision_residual": self.vision_residual, "vision_attention": self.vision_attention_output,
                   "vision_mlp": self.vision_mlp_output}
        return readers[site](layer)

    def vision_tokens(self, tokens: Group = "patches", site: str = "vision_residual"):
        """An index into vision `site` selecting `tokens` of every image: "patches", "cls" (CLIP towers), or
        positions within each image's sequence there — `ctx.vision_residual(0)[ctx.vision_tokens("cls")]`.
        The vision layers' sites share one layout; the projector's output has its own (CLIP: the patches
        without CLS; Qwen: merged tokens), so index it with `site="projector"`."""
        if self._adapter.vision_layers is None:
            raise self._adapter.no_vision_sites(f"ctx.vision_tokens({tokens!r})")
        return self._adapter.vision_index(tokens, self.example.inputs, projected=site == "projector")

    def vision_positions(self, tokens: Group = "patches") -> torch.Tensor:
        """Positions `[n]` of `tokens` within one image's vision sequence, the same in every image (e.g. the
        queries and keys of a vision knockout in each image's `[N, N]` attention)."""
        if self._adapter.vision_layers is None:
            raise self._adapter.no_vision_sites(f"ctx.vision_positions({tokens!r})")
        return self._adapter.vision_positions(tokens, self.example.inputs)

    def vision_edges(self, targets: Group, sources: Group, keep_self: bool = True) -> torch.Tensor:
        """Boolean `[B_images or 1, N, N]`, aligned with `vision_attention_mask`: True at the (query, key) pairs
        where a `targets` vision token reads a `sources` token of its own image (a vision knockout's edges)."""
        if self._adapter.vision_layers is None:
            raise self._adapter.no_vision_sites(f"ctx.vision_edges({targets!r}, {sources!r})")
        return self._adapter.vision_edges(targets, sources, self.example.inputs, keep_self)

    def vision_attention_mask(self, layer: int) -> torch.Tensor:
        """The additive mask vision layer `layer`'s self-attention receives, `[B_images, 1, N, N]`: zeros where
        the tower passed None (it attends everywhere). Never edit it in place; hand a new one to
        `set_vision_attention_mask`."""
        attention = self._vision_attention(layer, f"ctx.vision_attention_mask({layer})")
        args, kwargs = attention.inputs
        self._seen_vision = (layer, args, kwargs)
        own = self._adapter.vision_attention_mask(args, kwargs)  # a family whose attention takes no mask keyword
        if own is not None:
            return own
        hidden = args[0] if args else kwargs["hidden_states"]
        received = kwargs.get("attention_mask")
        if received is None:
            return hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], hidden.shape[1])
        return additive_mask(received, hidden)

    def set_vision_attention_mask(self, layer: int, mask: torch.Tensor) -> None:
        """Make vision layer `layer`'s self-attention use the additive `mask` (`[B_images, 1 or H, N, N]`);
        call it right after `vision_attention_mask(layer)`, before touching any later site."""
        attention = self._vision_attention(layer, f"ctx.set_vision_attention_mask({layer})")
        seen, self._seen_vision = self._seen_vision, None
        args, kwargs = seen[1:] if seen is not None and seen[0] == layer else attention.inputs
        masked = self._adapter.masked_vision_attention(layer, args, kwargs, mask)
        if masked is not None:  # the family's attention recomputed under the mask: its output replaced
            attention.output = masked
            return
        attention.inputs = (args, {**kwargs, "attention_mask": mask})

    @property
    def _adapter(self) -> Adapter:
        return self._sites.adapter

    def _vision_attention(self, layer: int, asked: str):
        envoy = self._sites.vision_layer(layer, asked)
        refusal = self._adapter.vision_mask_refusal()
        if refusal is not None:
            raise InterventionError(f"{asked}: the {self._adapter.family} family's vision attention mask cannot be "
                                    f"edited faithfully: {refusal}")
        return attribute_path(envoy, self._adapter.vision_attention)

    def _vision(self, value) -> torch.Tensor:
        """A vision site's tensor; refused in a forward restricted to some rows (an engine's suffix pass, where
        the vision tower does not run and its rows are images, not batch rows)."""
        if self._restriction is not None:
            raise InterventionError(
                "vision sites are read in a full forward only: this context is restricted to some rows of a sweep "
                "engine's pass; an intervention on them must claim first_layer() == 0 and affected_from() == 0"
            )
        return _first(value)

    # --- restriction to rows ----------------------------------------------------------------------------------
    def _own_rows(self, value: torch.Tensor) -> torch.Tensor:
        return value if self._restriction is None else value[self._restriction.rows]  # a view: edits reach on

    def _received_mask(self, layer: int) -> torch.Tensor:
        """The whole batch's mask at `layer` as an additive tensor, converted once per mask object received."""
        args, kwargs = self._sites.attention(layer).inputs
        self._seen = (layer, args, kwargs)
        return self._additive(args, kwargs)

    def _additive(self, args, kwargs) -> torch.Tensor:
        """The mask in an attention's inputs as an additive tensor, converted once per mask object."""
        received = kwargs.get("attention_mask")
        cached = self._converted.get(id(received))
        if cached is not None and cached[0] is received:
            return cached[1]
        hidden = args[0] if args else kwargs["hidden_states"]
        additive = additive_mask(received, hidden)
        self._converted[id(received)] = (received, additive)
        return additive

    def _write_rows(self, layer: int, whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """`whole` with this context's rows replaced by `part`, in the forward's private copy for `layer`."""
        masks, rows = self._restriction.masks, self._restriction.rows
        private = masks.get(layer)
        # The first variant to edit a layer copies the shared mask once (widened to per-head when its edit is);
        # later variants of the same forward write their rows into that copy.
        if private is not whole or part.shape[1] > whole.shape[1]:
            private = whole.expand(whole.shape[0], max(part.shape[1], whole.shape[1]), *whole.shape[2:]).clone()
            masks[layer] = private
        private[rows] = part
        return private


def check_site(site: str) -> str:
    """`site`, or an InterventionError when it is not one of `SITES`."""
    if site not in SITES:
        raise InterventionError(f"unknown site {site!r}; known: {known(SITES)}")
    return site


def check_vision_site(site: str, layers: tuple[int, ...]) -> str:
    """`site`, or an InterventionError when it is not one of `VISION_SITES` or is the projector at a layer
    other than 0."""
    if site not in VISION_SITES:
        raise InterventionError(f"unknown vision site {site!r}; known: {known(VISION_SITES)}")
    if site == "projector" and set(layers) != {0}:
        raise InterventionError(f"the projector is one site, layer 0; got layers {list(layers)}")
    return site


def additive_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The mask a self-attention receives, as an additive `[B, 1 or H, Q, K]` tensor in `hidden`'s dtype.

    `None` (an SDPA model that relies on `is_causal`) becomes the causal mask for `Q = K = hidden.shape[1]`;
    a boolean mask (True = attend) becomes 0 / minimum; a padding mask broadcast over queries (`Q = 1` for a
    longer input, as GPT-2-style remote code passes while applying causality itself) is expanded to all queries.
    """
    dtype = hidden.dtype
    minimum = torch.finfo(dtype).min
    if mask is None:
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None].expand(hidden.shape[0], 1, length, length)
    if mask.shape[-2] == 1 and hidden.shape[1] > 1:
        mask = mask.expand(*mask.shape[:-2], hidden.shape[1], mask.shape[-1])
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(minimum, dtype=dtype, device=mask.device))
    return mask.to(dtype)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _whole(value) -> bool:
    """Whether `value` is an int (a NumPy or torch integer too), not a bool: a layer index."""
    return not isinstance(value, bool) and hasattr(value, "__index__")

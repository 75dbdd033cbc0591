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

and inside the vision tower, which runs before the decoder (`VisionContext`, `mmscope.vision_context`; families
with vision sites: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL / Qwen3-VL; the others refuse them, naming the
family):

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

The sweep engine runs several variants as rows of one forward over the positions after a cached prefix, each
through a context restricted to its rows (`mmscope.experiments.rows`): an intervention written against this
class runs there unchanged, as long as it indexes sites with `positions` / `row_positions` and writes the
example's own positions with `write_positions`.

`ActivationCache` holds the sites of one run of one example (`Model.cache`), as the source a patch reads from
(`ctx.source`): TransformerLens' `run_with_cache` and its clean cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmscope.envoys import Sites, additive_mask, check_site, check_vision_site, output_tensor
from mmscope.errors import InterventionError, known
from mmscope.sites import SITES, VISION_SITES
from mmscope.vision_context import VisionContext

if TYPE_CHECKING:
    from mmscope.layout import Example

__all__ = ["SITES", "VISION_SITES", "ActivationCache", "Context", "Group", "additive_mask", "check_site",
           "check_vision_site"]

Group = str | tuple[int, ...]


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


class Context(VisionContext):
    """What an intervention sees: the running model's sites (the vision tower's through `VisionContext`), the
    batch's token layout, its size.

    Attributes: `example` (the running `Example`), `n_layers`, `n_heads`, `batch_size`, `seq_len`.
    """

    def __init__(self, sites: Sites, example: Example, source: ActivationCache | None = None) -> None:
        self._sites = sites
        self._source = source
        self.example = example
        self.n_layers = sites.n_layers
        self.n_heads = sites.n_heads
        self.batch_size = len(example)
        self.seq_len = example.seq_len
        self._converted: dict[int, tuple[object, torch.Tensor]] = {}  # id(mask as received) -> (it, additive)
        self._seen: tuple | None = None  # (layer, args, kwargs): the attention inputs last read

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
    def source(self) -> ActivationCache:
        """The activations of another run this forward may read from (clean → corrupted patching)."""
        if self._source is None:
            raise InterventionError(
                "this intervention reads a source run, and none was given: cache the clean run with "
                "`cache = model.cache(clean)` and pass `source=cache`"
            )
        return self._source

    def row_positions(self, group: Group, row: int) -> torch.Tensor:
        """Positions `[n]` of `group` in batch row `row`, counted from the forward's first position: indices
        into this context's sites."""
        return self.example.positions(group, row)

    def write_positions(self, value: torch.Tensor, row: int, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Write `new` `[n, ...]` into `value` (a site this context read, `[B, T, ...]`) in batch row `row` at
        the example's own `positions` `[n]` (counted from the prompt's first token, as `example.positions` and
        `source.positions` give them), cast to `value`'s device and dtype. A forward that starts after cached
        positions writes only the positions it runs, leaving the earlier ones as the cache holds them."""
        value[row, positions] = new.to(value.device, value.dtype)

    # --- values of the running forward pass -------------------------------------------------------------------
    def residual(self, layer: int) -> torch.Tensor:
        """Residual stream after decoder layer `layer`, `[B, T, D]`."""
        return self._own_rows(output_tensor(self._sites.layer(layer).output))

    def embeddings(self) -> torch.Tensor:
        """The residual stream entering decoder layer 0 (the decoder's input embeddings), `[B, T, D]`."""
        return self._own_rows(self._sites.layer(0).input)  # `.input` is the first argument: the hidden states

    def attention_output(self, layer: int) -> torch.Tensor:
        """Self-attention output of layer `layer` before it is added to the residual, `[B, T, D]`."""
        return self._own_rows(output_tensor(self._sites.attention(layer).output))

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
        return self._own_rows(output_tensor(self._sites.mlp(layer).output))

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
        return self._own_rows(self._received_mask(layer))

    def set_attention_mask(self, layer: int, mask: torch.Tensor) -> None:
        """Make layer `layer`'s self-attention use the additive `mask` (`[B, 1 or H, Q, K]`, this context's rows).

        Call it right after `attention_mask(layer)`, before touching any later site.
        """
        attention = self._sites.attention(layer)
        seen, self._seen = self._seen, None
        # The inputs `attention_mask(layer)` just read are still the module's (no other edit runs in between).
        args, kwargs = seen[1:] if seen is not None and seen[0] == layer else attention.inputs
        attention.inputs = (args, {**kwargs, "attention_mask": self._batch_mask(layer, args, kwargs, mask)})

    def skip(self, layer: int, output: torch.Tensor | None = None) -> None:
        """Run decoder layer `layer` as the identity (its input passes on unchanged), or make it return `output`."""
        envoy = self._sites.layer(layer)
        envoy.skip(envoy.input if output is None else output)

    # --- this context's rows of the batch ---------------------------------------------------------------------
    def _own_rows(self, value: torch.Tensor) -> torch.Tensor:
        """This context's rows of a running `[B, ...]` value: all of them."""
        return value

    def _batch_mask(self, layer: int, args, kwargs, mask: torch.Tensor) -> torch.Tensor:
        """The mask the whole batch's attention at `layer` gets when this context sets `mask`: `mask` itself."""
        return mask

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


"""`VisionContext`: what a `Context` reads and edits inside the vision tower, which runs before the decoder.

Families with vision sites (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL / Qwen3-VL) name the tower's layers,
attention, MLP and projector in their adapter; the others refuse each of these, naming the family. A vision
site's rows are images (CLIP: one per image or tile) or, for Qwen-VL, its flattened patches — never batch rows:
index them with `vision_tokens`, not `positions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmscope.envoys import additive_mask, check_vision_site, output_tensor
from mmscope.errors import InterventionError
from mmscope.models.adapter import attribute_path

if TYPE_CHECKING:
    from mmscope.context import Group
    from mmscope.envoys import Sites
    from mmscope.layout import Example
    from mmscope.models.adapter import Adapter


class VisionContext:
    """The vision tower's sites, token indices and attention masks, as `Context` offers them (it holds the
    model's `_sites` and the running `example`)."""

    _sites: Sites
    example: Example
    _seen_vision: tuple | None = None  # (layer, args, kwargs): the vision attention inputs last read

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
        """A vision site's tensor (its rows are images, not batch rows)."""
        return output_tensor(value)

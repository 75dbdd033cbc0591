"""Interventions inside the vision tower: knockout between vision tokens, scaling and patching vision sites.

The vision tower runs before the decoder, so these compose with decoder interventions in one forward (a
vision edit reaches the decoder through the projector's image features). Vision tokens are named per image:
"patches", "cls" (CLIP towers: LLaVA-1.5, LLaVA-NeXT) or positions within each image's vision sequence (CLIP:
0 is CLS, then the patches row-major; Qwen-VL: the blocks' own order, see `mmscope.models.qwen2_vl`), and an
edit applies to those tokens of every image (every tile, for LLaVA-NeXT).

`VisionKnockout(sources, targets, layers)` blocks every target query from every source key in the chosen
vision layers, all heads, by setting the additive mask the vision attention receives to the dtype's minimum
there — e.g. `VisionKnockout("patches", "cls", range(12))` keeps the CLS token from reading any patch. The
CLS → patch and patch → patch edges are blocked likewise. Qwen-VL's attention takes no mask (it attends within
each image's, or Qwen2.5-VL's window's, block of the flattened patches): there the mask is that block-diagonal one
over all patches, the edges are blocked within each image, and the attention is recomputed under the edited mask
from the layer's own weights (`mmscope.models.qwen2_vl`).

`VisionScale(site, layers, tokens, factor)` multiplies a vision site (0: zero-ablation) and `VisionCachedPatch
(site, layers, tokens)` overwrites it with another run's value (`ctx.source`, from `model.cache(clean,
sites=["vision_residual"])`) — the clean → corrupted patching of `CachedPatch`, one stage earlier.

What to watch for: LLaVA-1.5 and LLaVA-NeXT read the image features off the second-to-last vision layer
(`vision_feature_layer=-2`), so an edit in the last vision layer changes nothing downstream, and they drop the
CLS token before the projector, so a CLS edit reaches the decoder only through the vision layers after it.

A sweep engine reuses the clean prefix of the decoder; an image edit changes every image position from the
decoder's first layer on, so each of these claims `first_layer() == 0` and `affected_from() == 0`: the engine
gives it a full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from mmscope.context import check_vision_site
from mmscope.errors import InterventionError
from mmscope.interventions.base import Context, Group, Intervention
from mmscope.interventions.masks import block

if TYPE_CHECKING:
    from mmscope.layout import Example


@dataclass(frozen=True)
class VisionIntervention(Intervention):
    """Shared claims of an intervention inside the vision tower: it changes the image features, so a sweep
    engine must run the whole forward (nothing of the decoder computes as in the clean run), and its token
    fields name vision tokens, not the example's token groups."""

    def groups(self) -> frozenset[str]:
        return frozenset()

    def affected_from(self, example: Example) -> int:
        """0: every image position of the decoder reads the edited image features."""
        return 0

    def first_layer(self) -> int:
        """0: the decoder's input embeddings already carry the edit."""
        return 0


@dataclass(frozen=True)
class VisionKnockout(VisionIntervention):
    """Block attention from every `targets` vision token to every `sources` vision token in vision `layers`
    (all heads, every image). A token keeps attending to itself unless `keep_self` is False; even then no
    attention row is left fully masked."""

    sources: Group
    targets: Group
    layers: tuple[int, ...]
    counted: ClassVar[tuple[str, ...]] = ("layers",)
    keep_self: bool = True

    def apply(self, ctx: Context) -> None:
        blocked = None
        for layer in sorted(self.layers):
            # [B_images, 1, N, N] (CLIP) or [1, 1, S, S] (Qwen-VL); refused where there is no mask to edit
            mask = ctx.vision_attention_mask(layer)
            if blocked is None:
                blocked = ctx.vision_edges(self.targets, self.sources, self.keep_self).to(mask.device)
                if blocked.shape[-2:] != mask.shape[-2:]:
                    raise InterventionError(f"vision knockout edges {list(blocked.shape[-2:])} for a vision attention "
                                            f"mask {list(mask.shape[-2:])} at vision layer {layer}")
            edges = blocked.expand(mask.shape[0], *blocked.shape[1:])
            ctx.set_vision_attention_mask(layer, block(mask, edges, None, 1, may_empty_rows=not self.keep_self))


@dataclass(frozen=True)
class VisionScale(VisionIntervention):
    """Multiply vision `site` ("vision_residual", "vision_attention", "vision_mlp" or "projector", layer 0) at
    `tokens` of every image by `factor` in each of `layers` (factor 0: zero-ablation). The projector's tokens
    are its output features (`Context.vision_tokens(tokens, "projector")`)."""

    site: str
    layers: tuple[int, ...]
    counted: ClassVar[tuple[str, ...]] = ("layers",)
    tokens: Group = "patches"
    factor: float = 0.0

    def check(self) -> None:
        check_vision_site(self.site, self.layers)

    def apply(self, ctx: Context) -> None:
        for layer in sorted(self.layers):
            activation = ctx.vision_site(self.site, layer)
            activation[ctx.vision_tokens(self.tokens, self.site)] *= self.factor


@dataclass(frozen=True)
class VisionCachedPatch(VisionIntervention):
    """Overwrite vision `site` at `tokens` of every image with the source run's value there (`ctx.source`,
    cached with `model.cache(clean, sites=[site], vision_layers=layers)`); the images must give the vision
    tower the same shape in both runs."""

    site: str
    layers: tuple[int, ...]
    counted: ClassVar[tuple[str, ...]] = ("layers",)
    tokens: Group = "patches"

    def check(self) -> None:
        check_vision_site(self.site, self.layers)

    def apply(self, ctx: Context) -> None:
        source = ctx.source
        for layer in sorted(self.layers):
            activation = ctx.vision_site(self.site, layer)
            index = ctx.vision_tokens(self.tokens, self.site)
            value = source.site(self.site, layer)
            if value.shape != activation.shape:
                raise InterventionError(
                    f"the source run's {self.site!r} at vision layer {layer} is {list(value.shape)}, this run's "
                    f"{list(activation.shape)}: patch between images the vision tower sees at the same size"
                )
            activation[index] = value[index].to(activation.device, activation.dtype)

    def source_sites(self) -> frozenset[tuple[str, int]]:
        return frozenset((self.site, layer) for layer in self.layers)

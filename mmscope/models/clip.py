"""The CLIP vision tower of LLaVA-1.5 and LLaVA-NeXT: where its sites are and how its tokens are laid out.

Every image (every tile, for LLaVA-NeXT's base view and high-resolution tiles) is one row of the tower's batch:
a sequence of `1 + g*g` tokens, the CLS token at index 0, then the `g x g` patches in row-major order
(`g = image_size // patch_size`). The tower's attention is bidirectional and takes an additive `attention_mask`
keyword (None: attend everywhere), which eager and sdpa attention honour — so a vision knockout edits it.
"""

from __future__ import annotations

import torch

from mmscope.errors import InterventionError, known

VISION_TOKENS = ("patches", "cls")


class ClipVisionTower:
    """Mixin for an `Adapter` whose vision tower is transformers' CLIP vision model (LLaVA's layout)."""

    vision_layers: str | None = "model.vision_tower.encoder.layers"
    vision_attention: str = "self_attn"
    vision_mlp: str = "mlp"
    projector: str | None = "model.multi_modal_projector"

    @property
    def vision_sequence_length(self) -> int:
        """`1 + g*g`: the CLS token and the patches of one image (tile)."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    def vision_mask_refusal(self) -> str | None:
        implementation = self.model.config.vision_config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            return f"its vision tower runs {implementation!r} attention, which ignores an additive mask"
        return None

    def vision_positions(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False) -> torch.Tensor:
        # The projector reads the patches only under the "default" feature selection (CLS dropped), all tokens
        # under "full".
        cls = not projected or self.model.config.vision_feature_select_strategy == "full"
        first, length = (0, self.vision_sequence_length) if cls else (1, self.vision_sequence_length - 1)
        if tokens == "patches":
            return torch.arange(1 - first, length)
        if tokens == "cls":
            if not cls:
                raise InterventionError("the projector's features have no CLS token: the model drops it before "
                                        "the projector (vision_feature_select_strategy 'default')")
            return torch.tensor([0])
        if isinstance(tokens, str):
            raise InterventionError(f"unknown vision tokens {tokens!r}; known: {known(VISION_TOKENS)} or positions")
        outside = [token for token in tokens if not 0 <= token < length]
        if outside:
            what = "vision sequence" if not projected else "projected features"
            first_token = "0 (CLS)" if cls else "0"
            raise InterventionError(f"vision tokens {outside} out of range; each image's {what} of the {self.family} "
                                    f"family has tokens {first_token}..{length - 1}")
        return torch.tensor(tokens)

    def vision_edges(self, targets, sources, inputs: dict, keep_self: bool) -> torch.Tensor:
        """`[1, N, N]`: the same (query, key) pairs in every image's (tile's) sequence."""
        target, source = self.vision_positions(targets, inputs), self.vision_positions(sources, inputs)
        blocked = torch.zeros(self.vision_sequence_length, self.vision_sequence_length, dtype=torch.bool)
        blocked[target[:, None], source[None, :]] = True
        if keep_self:
            blocked.fill_diagonal_(False)
        return blocked[None]

    def vision_index(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False):
        """`(all images, positions)`: vision sites are `[B_images, 1 + g*g, D_v]`, the projector's output
        `[B_images, g*g, D]` (the patches, CLS dropped)."""
        return slice(None), self.vision_positions(tokens, inputs, projected)

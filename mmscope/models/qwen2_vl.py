"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, merged patches, multimodal rotary positions.

The image is resized (aspect kept) so both sides are multiples of `patch_size * merge_size` within a pixel
budget, cut into `patch_size` patches, and every `merge_size x merge_size` block of patches becomes one
language-model token. The prompt carries `<|vision_start|><|image_pad|><|vision_end|>`; the processor repeats
`<|image_pad|>` once per merged block, in row-major order of the merged grid (`image_grid_thw / merge`).

Position ids are three-dimensional (time, row, column for image tokens; equal for text) and computed by the
model from `input_ids`, `mm_token_type_ids` and `image_grid_thw` — with left padding handled through the
attention mask — so the adapter passes none. Qwen3-VL also adds "deepstack" visual features to the image
positions after its first decoder layers; `ctx.residual(layer)` is the layer's output before that addition.

The vision tower runs its blocks on one flattened sequence `[sum of t*h*w patches over images, D_v]` (no CLS
token), images one after another, each image's patches in the processor's order (every `merge x merge` block of
patches contiguous); Qwen2.5-VL's blocks hold them permuted into its attention windows, and its merger's output
too (the model restores the order after the merger). Its attention takes no mask: transformers splits the
sequence into each image's (or window's) block by `cu_seqlens` and attends within each with no mask. A vision
knockout sees that as the block-diagonal additive mask over all patches (`vision_attention_mask`), blocks its
edges within each image, and replaces the attention's output with the attention recomputed from the layer's
own weights and inputs under the edited mask (`masked_vision_attention`: eager attention within each block,
faithful to the tower's eager or sdpa attention; flash attention is refused).
"""

from __future__ import annotations

import sys

import torch
from einops import rearrange

from mmscope.errors import InterventionError
from mmscope.models.adapter import Adapter, attribute_path, register
from mmscope.models.processors import load_processor_without_video
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

QWEN_CHAT = PromptTemplate(
    (
        ("roles", "<|im_start|>system\n"),
        ("system", "You are a helpful assistant."),
        (None, "<|im_end|>\n"),
        ("roles", "<|im_start|>user\n"),
        ("image", IMAGE),
        ("question", QUESTION),
        (None, "<|im_end|>\n"),
        ("roles", "<|im_start|>assistant\n"),
    )
)


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    """A vision block's argument to its attention, given by keyword or by position."""
    return kwargs[name] if name in kwargs else args[index]


@register("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
class QwenVLAdapter(Adapter):
    family: str = "qwen_vl"
    template: PromptTemplate = QWEN_CHAT
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "mm_token_type_ids")
    vision_layers: str | None = "model.visual.blocks"
    vision_attention: str = "attn"
    vision_mlp: str = "mlp"
    projector: str | None = "model.visual.merger"

    def placeholder(self) -> str:
        return f"<|vision_start|>{self.processor.image_token}<|vision_end|>"

    def placeholder_tokens(self) -> tuple[str, ...]:
        """Each of the placeholder's three tokens alone, besides the whole."""
        return tuple(dict.fromkeys((*super().placeholder_tokens(), "<|vision_start|>", "<|vision_end|>")))

    @property
    def image_in_input_embeddings(self) -> bool:
        """False for Qwen3-VL, whose decoder adds "deepstack" visual features to image positions in early layers."""
        return not getattr(self.model.config.vision_config, "deepstack_visual_indexes", None)

    def vision_mask_refusal(self) -> str | None:
        implementation = self.model.config.vision_config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            return (f"its vision tower runs {implementation!r} attention; the knockout recomputes it as eager "
                    "attention, which is faithful only to eager or sdpa")
        return None

    def vision_attention_mask(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """`[1, 1, S, S]` over the flattened patches: 0 within each block `cu_seqlens` splits the sequence into
        (an image, or a Qwen2.5-VL window), the dtype's minimum across blocks — what the blocks' attention does."""
        hidden = _argument(args, kwargs, 0, "hidden_states")
        bounds = _argument(args, kwargs, 1, "cu_seqlens").to(hidden.device)
        block_of = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=hidden.device), bounds.diff())
        apart = block_of[:, None] != block_of[None, :]
        mask = hidden.new_zeros(len(hidden), len(hidden)).masked_fill(apart, torch.finfo(hidden.dtype).min)
        return mask[None, None]

    def masked_vision_attention(self, layer: int, args: tuple, kwargs: dict, mask: torch.Tensor) -> torch.Tensor:
        """The block's attention output under the additive `mask [1, 1 or H, S, S]`: transformers' own steps
        (fused qkv, the family's vision rotary embedding, scaled scores, float32 softmax, proj) with the mask
        added to the scores (eager). Where the mask still blocks every pair across the `cu_seqlens` blocks, as
        a knockout's does, each block attends on its own (memory of the largest block's scores); otherwise one
        attention runs over all patches."""
        module = attribute_path(attribute_path(self.model, self.vision_layers)[layer], self.vision_attention)
        hidden = _argument(args, kwargs, 0, "hidden_states")
        cos, sin = _argument(args, kwargs, 2, "position_embeddings")
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        length = hidden.shape[0]
        qkv = torch.nn.functional.linear(hidden, module.qkv.weight, module.qkv.bias)
        query, key, value = qkv.reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, key = rotary(query, key, cos, sin)
        query, key, value = (state.transpose(0, 1).unsqueeze(0) for state in (query, key, value))  # [1, H, S, d]
        mask = mask.to(query.dtype)
        bounds = _argument(args, kwargs, 1, "cu_seqlens").tolist()
        within = self.vision_attention_mask(args, kwargs) == 0  # [1, 1, S, S]: pairs inside one block
        minimum = torch.finfo(mask.dtype).min
        spans = (list(zip(bounds[:-1], bounds[1:], strict=True)) if bool((mask.masked_fill(within, minimum)
                                                                          == minimum).all()) else [(0, length)])
        outputs = []
        for start, end in spans:
            scores = torch.matmul(query[:, :, start:end], key[:, :, start:end].transpose(2, 3)) * module.scaling
            scores = scores + mask[..., start:end, start:end]
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            outputs.append(torch.matmul(weights, value[:, :, start:end]))
        output = torch.cat(outputs, dim=2).transpose(1, 2).reshape(length, -1)
        return torch.nn.functional.linear(output, module.proj.weight, module.proj.bias)

    def vision_edges(self, targets, sources, inputs: dict, keep_self: bool) -> torch.Tensor:
        """`[1, S, S]` over the flattened patches: the pairs within each image ("patches": all of that image's)."""
        lengths = self._vision_lengths(inputs, projected=False).tolist()
        total = sum(lengths)
        blocked = torch.zeros(total, total, dtype=torch.bool)
        start = 0
        for length in lengths:
            target, source = (torch.arange(length) if tokens == "patches" else self.vision_positions(tokens, inputs)
                              for tokens in (targets, sources))
            blocked[start + target[:, None], start + source[None, :]] = True
            start += length
        if keep_self:
            blocked.fill_diagonal_(False)
        return blocked[None]

    def vision_positions(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False) -> torch.Tensor:
        """Positions within each image's patch sequence, or its merged tokens where `projected` ("patches": all,
        where every image has as many)."""
        lengths = self._vision_lengths(inputs, projected)
        if tokens == "patches":
            if len(set(lengths.tolist())) > 1:
                raise InterventionError(f"images of {lengths.tolist()} patches have no common 'patches' positions; "
                                        "give positions")
            return torch.arange(int(lengths[0]))
        if isinstance(tokens, str):
            raise InterventionError(f"unknown vision tokens {tokens!r} for the {self.family} family, whose vision "
                                    "sequences have no CLS token; known: patches or positions")
        outside = [token for token in tokens if not 0 <= token < int(lengths.min())]
        if outside:
            raise InterventionError(f"vision tokens {outside} out of range; the smallest image has patches "
                                    f"0..{int(lengths.min()) - 1}")
        return torch.tensor(tokens)

    def vision_index(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False) -> torch.Tensor:
        """Rows `[n]` of the flattened vision sites (of the merger's output where `projected`): "patches" (every
        row), or positions within each image's sequence, in every image."""
        lengths = self._vision_lengths(inputs, projected)
        if tokens == "patches":
            return torch.arange(int(lengths.sum()))
        starts = lengths.cumsum(0) - lengths
        return (starts[:, None] + self.vision_positions(tokens, inputs, projected)[None, :]).flatten()

    def _vision_lengths(self, inputs: dict, projected: bool) -> torch.Tensor:
        """Each image's rows in the vision blocks (`t*h*w` patches) or, `projected`, in the merger's output."""
        lengths = inputs["image_grid_thw"].prod(-1)
        return lengths // self.model.config.vision_config.spatial_merge_size**2 if projected else lengths

    @classmethod
    def load_processor(cls, source: str):
        return load_processor_without_video(source)

    def position_ids(self, attention_mask: torch.Tensor) -> None:
        return None

    def forward_position_ids(self, inputs: dict) -> torch.Tensor:
        """The model's multimodal rotary positions `[3, B, T]`, as its forward computes them from the inputs."""
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"],
        )
        return positions

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        """Rectangles of the merged blocks: the image is resized (no crop, no pad) to the patch grid."""
        _, rows, cols = inputs["image_grid_thw"][0].tolist()
        merge = self.processor.image_processor.merge_size
        block_x, block_y = image.width / (cols // merge), image.height / (rows // merge)
        r, c = torch.meshgrid(torch.arange(rows // merge, dtype=torch.double),
                              torch.arange(cols // merge, dtype=torch.double), indexing="ij")  # float64: exact edges
        corners = torch.stack([c * block_x, r * block_y, (c + 1) * block_x, (r + 1) * block_y]).double()
        return rearrange(corners, "xy rows cols -> (rows cols) xy")

"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, merged patches, multimodal rotary positions.

The image is resized (aspect kept) so both sides are multiples of `patch_size * merge_size` within a pixel
budget, cut into `patch_size` patches, and every `merge_size x merge_size` block of patches becomes one
language-model token. The prompt carries `<|vision_start|><|image_pad|><|vision_end|>`; the processor repeats
`<|image_pad|>` once per merged block, in row-major order of the merged grid (`image_grid_thw / merge`).

Position ids are three-dimensional (time, row, column for image tokens; equal for text) and computed by the
model from `input_ids`, `mm_token_type_ids` and `image_grid_thw` — with left padding handled through the
attention mask — so the adapter passes none. Qwen3-VL also adds "deepstack" visual features to the image
positions after its first decoder layers; `ctx.residual(layer)` is the layer's output before that addition.
"""

from __future__ import annotations

import torch
from einops import rearrange

from mmscope.models.adapter import Adapter, register
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


@register("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
class QwenVLAdapter(Adapter):
    family: str = "qwen_vl"
    template: PromptTemplate = QWEN_CHAT
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "mm_token_type_ids")

    def placeholder(self) -> str:
        return f"<|vision_start|>{self.processor.image_token}<|vision_end|>"

    @property
    def image_in_input_embeddings(self) -> bool:
        """False for Qwen3-VL, whose decoder adds "deepstack" visual features to image positions in early layers."""
        return not getattr(self.model.config.vision_config, "deepstack_visual_indexes", None)

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
        r, c = torch.meshgrid(torch.arange(rows // merge), torch.arange(cols // merge), indexing="ij")
        corners = torch.stack([c * block_x, r * block_y, (c + 1) * block_x, (r + 1) * block_y]).double()
        return rearrange(corners, "xy rows cols -> (rows cols) xy")

"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower pooled to a fixed grid, bidirectional image blocks.

The processor squashes the image to the tower's square input, and the model average-pools the patch grid to
`mm_tokens_per_image` soft tokens (row-major). The prompt's `<start_of_image>` expands to
`\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`; everything but the soft tokens is in
`image_markers`. The processor's `token_type_ids` mark the soft tokens, and the model lets each image's tokens
attend to each other in both directions (within the sliding window on local layers) — so a knockout edits the
mask the model built, never a causal one of our own.
"""

from __future__ import annotations

import torch

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter, register
from mmscope.models.geometry import patch_rectangles
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

GEMMA3_CHAT = PromptTemplate(
    (
        ("roles", "<start_of_turn>user\n"),
        ("image", IMAGE),
        ("question", QUESTION),
        (None, "<end_of_turn>\n"),
        ("roles", "<start_of_turn>model\n"),
    )
)


@register("gemma3")
class Gemma3Adapter(Adapter):
    family: str = "gemma3"
    template: PromptTemplate = GEMMA3_CHAT
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        """Rectangles of the pooled grid over the squashed image (pan-and-scan crops are not mapped)."""
        if int(inputs.get("num_crops", torch.zeros(1)).sum()) > 0:
            raise InputError("boxes are not mapped onto Gemma 3 pan-and-scan crops; process without do_pan_and_scan")
        side = int(self.model.config.mm_tokens_per_image**0.5)
        pooled_patch = self.model.config.vision_config.image_size // side
        return patch_rectangles(image.width, image.height, self.processor.image_processor, pooled_patch)

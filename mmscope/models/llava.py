"""LLaVA-1.5 family (`LlavaForConditionalGeneration`): CLIP vision tower, projector, Llama/Vicuna decoder.

The processor expands the single `<image>` placeholder into one token per vision patch (the CLS feature is
dropped under the "default" feature-selection strategy), in row-major patch order — which is exactly the order
`Adapter.patch_rectangles` returns, so the base adapter needs no overrides beyond its name and the CLIP vision
tower's sites (`mmscope.models.clip`).

The family does all three of the study's preprocessing knobs: `square_pad` runs a copy of the processor whose
image processor pads to a square first (`do_pad`, transformers' `expand2square`), `prompt_chunks` re-tokenises
the text around the image run, and `red-mask` reads the processed mask in the vision tower's patch grid.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter, register
from mmscope.models.clip import ClipVisionTower
from mmscope.models.preprocessing import Preprocessing, processed_mask, red_cells, red_mask


@register("llava")
class LlavaAdapter(ClipVisionTower, Adapter):
    family: str = "llava"
    square_pads: bool = True
    chunks_prompts: bool = True
    object_patch_rules: tuple[str, ...] = ("overlap", "red-mask")

    def processor_for(self, preprocessing: Preprocessing):
        """With `square_pad`, a copy of the loaded processor whose image processor pads to a square of its mean
        colour before resizing (the loaded processor and its image processor stay as they were)."""
        loaded = self.loaded_processor
        if not preprocessing.square_pad or loaded.image_processor.do_pad:
            return loaded
        padded = copy.copy(loaded)
        padded.image_processor = copy.deepcopy(loaded.image_processor)
        padded.image_processor.do_pad = True
        return padded

    def red_mask_patches(self, image: Image.Image, inputs: dict, boxes) -> torch.Tensor:
        """The red cells of the processed mask in the vision tower's patch grid, row-major."""
        pixels = processed_mask(self.processor.image_processor, red_mask(image.width, image.height, boxes))
        if pixels.dim() != 3:
            raise InputError(f"the {self.family} image processor made mask pixel values of shape "
                             f"{tuple(pixels.shape)}; expected one [3, H, W] image")
        return red_cells(pixels, self.model.config.vision_config.patch_size).flatten()

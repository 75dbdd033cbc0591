"""Emu3 (`Emu3ForConditionalGeneration`): the image as discrete VQ tokens of the language model's own vocabulary.

The processor resizes the image (aspect kept) to multiples of the VQ downsampling factor within a pixel budget,
and expands the prompt's `<image>` into

    <|image start|>H*W<|image token|> <image>×H(W+1) <|extra_201|><|image end|>

The model encodes the image with its VQ-VAE, maps each code to its `<|visual token …|>` id, appends the
end-of-line token `<|extra_200|>` to every row, and embeds them with the text embedding table in place of the
`<image>` placeholders. So the image tokens are an `H x W` grid of codes, row-major, each row followed by a
newline token (group `image_newline`); the size digits and the start/end tokens are `image_markers`. The
processor also inserts BOS before the prompt.
"""

from __future__ import annotations

import torch
from einops import rearrange

from mmscope.models.adapter import Adapter, register
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

EMU3_CHAT = PromptTemplate(
    (
        ("system", "You are a helpful assistant."),
        ("roles", " USER:"),
        (None, " "),
        ("image", IMAGE),
        ("question", QUESTION),
        ("roles", " ASSISTANT:"),
    )
)


def _code_grid(inputs, model) -> tuple[int, int]:
    """`(rows, cols)` of the VQ code grid of the first image."""
    factor = model.model.vqmodel.vision_spatial_factor
    height, width = inputs["image_sizes"][0].tolist()
    return height // factor, width // factor


@register("emu3")
class Emu3Adapter(Adapter):
    family: str = "emu3"
    layers: str = "model.text_model.layers"
    final_norm: str = "model.text_model.norm"
    template: PromptTemplate = EMU3_CHAT

    def image_groups(self, input_ids, inputs) -> dict[str, torch.Tensor]:
        image = self.image_positions(input_ids)
        _, cols = _code_grid(inputs, self.model)
        is_newline = (torch.arange(len(image)) + 1) % (cols + 1) == 0
        return {"image_newline": image[is_newline]}

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        """Each code covers a `factor x factor` cell of the resized image (no crop, no pad); newlines show none."""
        rows, cols = _code_grid(inputs, self.model)
        cell_x, cell_y = image.width / cols, image.height / rows
        r, c = torch.meshgrid(torch.arange(rows, dtype=torch.double), torch.arange(cols + 1, dtype=torch.double),
                              indexing="ij")  # float64: exact edges
        corners = torch.stack([c * cell_x, r * cell_y, (c + 1) * cell_x, (r + 1) * cell_y]).double()
        corners[:, :, -1] = float("nan")
        return rearrange(corners, "xy rows cols -> (rows cols) xy")

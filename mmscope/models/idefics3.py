"""Idefics3 and SmolVLM: image splitting into tiles plus a global view, each tile pixel-shuffled to few tokens.

The processor resizes the image (longest edge to `size`), then up to multiples of the tile side `M`
(`max_image_size`), cuts it into `rows x cols` tiles and appends the whole image squashed to one tile. Each
tile's `(M / patch)^2` patches are pixel-shuffled by `scale_factor` into `image_seq_len` tokens, row-major over
the shuffled grid. The `<image>` placeholder expands to

    <fake_token_around_image><row_1_col_1><image>*n … "\n" (after each row of tiles)
    "\n"<fake_token_around_image><global-img><image>*n<fake_token_around_image>

(only the global part when the image fits one tile). Tile tags, fake tokens and newlines are `image_markers`;
the image tokens split into `image_tiles` and `image_global`.
"""

from __future__ import annotations

import math
import torch
from einops import rearrange

from mmscope.models.adapter import Adapter, register
from mmscope.models.processors import load_processor_without_video
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

IDEFICS3_CHAT = PromptTemplate(
    (
        ("roles", "User:"),
        ("image", IMAGE),
        ("question", QUESTION),
        (None, "<end_of_utterance>\n"),
        ("roles", "Assistant:"),
    )
)


def _fit_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3's resize of the longest edge to `longest`, the other side even (its `rescale_to_max_len`)."""
    if width >= height:
        new_height, new_width = int(longest / (width / height)), longest
        new_height += new_height % 2
    else:
        new_height, new_width = longest, int(longest * (width / height))
        new_width += new_width % 2
    return max(new_height, 1), max(new_width, 1)


def _tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """Idefics3's `resize_for_vision_encoder`: both sides up to multiples of the tile side."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_grid(height: int, width: int, image_processor) -> tuple[int, int, int, int]:
    """`(rows, cols, resized_height, resized_width)` of the tiles an image is split into (0, 0 when unsplit)."""
    tile = image_processor.max_image_size["longest_edge"]
    if image_processor.do_resize:
        height, width = _fit_longest_edge(height, width, image_processor.size["longest_edge"])
    if not image_processor.do_image_splitting:
        return 0, 0, tile, tile
    height, width = _tile_multiple(height, width, tile)
    if height <= tile and width <= tile:
        return 0, 0, height, width
    return height // tile, width // tile, height, width


@register("idefics3", "smolvlm")
class Idefics3Adapter(Adapter):
    family: str = "idefics3"
    layers: str = "model.text_model.layers"
    final_norm: str = "model.text_model.norm"
    template: PromptTemplate = IDEFICS3_CHAT

    @classmethod
    def load_processor(cls, source: str):
        return load_processor_without_video(source)

    def image_groups(self, input_ids, inputs) -> dict[str, torch.Tensor]:
        image = self.image_positions(input_ids)
        return {"image_tiles": image[: -self.processor.image_seq_len], "image_global": image[-self.processor.image_seq_len :]}

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        """Rectangles of the shuffled cells of every tile (row-major tiles), then of the global view."""
        image_processor = self.processor.image_processor
        rows, cols, height, width = tile_grid(image.height, image.width, image_processor)
        tile = image_processor.max_image_size["longest_edge"]
        cell = self.model.config.vision_config.patch_size * self.model.config.scale_factor
        r, c = torch.meshgrid(torch.arange(tile // cell), torch.arange(tile // cell), indexing="ij")
        cells = torch.stack([c * cell, r * cell, (c + 1) * cell, (r + 1) * cell], dim=-1).double()
        cells = rearrange(cells, "r c xy -> (r c) xy")  # in one tile's pixels
        to_original = torch.tensor([image.width / width, image.height / height] * 2, dtype=torch.double)
        tiles = [
            (cells + torch.tensor([col * tile, row * tile] * 2)) * to_original
            for row in range(rows)
            for col in range(cols)
        ]
        squashed = torch.tensor([image.width / tile, image.height / tile] * 2, dtype=torch.double)
        return torch.cat([*tiles, cells * squashed])

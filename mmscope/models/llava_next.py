"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): any-resolution tiles with row newlines.

The image is seen twice. The *base* view squashes the whole image to one vision-tower tile; the *high-resolution*
view resizes it (keeping its aspect ratio) into the best-fitting grid of tiles from `image_grid_pinpoints`, pads
it centred, and cuts it into tiles. The model stitches the tiles' patch features into one grid, removes the
rows or columns that show only padding ("unpadding", computed on the feature grid), and appends the learned
`image_newline` feature after every row. The processor's `<image>` placeholder expands to one token per
feature, in this order:

    base grid (g x g, row-major) | row 0 of the unpadded grid, newline | row 1, newline | …

so the groups are `image_base`, `image_grid` and `image_newline` (all within `image`), and a box selects the
patches it overlaps in both views (newline tokens show no patch). Under the study's red-mask rule the mask goes
through the same tiling, and each tile's red cells are stitched into the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from einops import rearrange
from transformers.image_processing_utils import select_best_resolution

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter, register
from mmscope.models.clip import ClipVisionTower
from mmscope.models.preprocessing import processed_mask, red_cells, red_mask


@dataclass(frozen=True)
class AnyResGrid:
    """The feature layout of one image: a `g x g` base grid, then the unpadded high-resolution grid."""

    base_side: int  # g: patches per side of one tile
    rows: range  # rows of the full high-resolution grid kept after unpadding
    cols: range  # columns kept after unpadding

    @property
    def n_base(self) -> int:
        return self.base_side**2

    @property
    def n_tokens(self) -> int:
        return self.n_base + len(self.rows) * (len(self.cols) + 1)


def _side(size) -> tuple[int, int]:
    """`(height, width)` of a processor size dict that is either shortest_edge or height/width."""
    size = dict(size)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    return size["shortest_edge"], size["shortest_edge"]


def _fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Size of the image resized to fit `target` with its aspect ratio (transformers' get_patch_output_size)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def _unpadded(height: int, width: int, grid_rows: int, grid_cols: int) -> tuple[range, range]:
    """Rows and columns of a `grid_rows x grid_cols` feature grid kept by LLaVA-NeXT's `unpad_image`."""
    if width / height > grid_cols / grid_rows:
        new_height = int(round(height * (grid_cols / width), 7))
        padding = (grid_rows - new_height) // 2
        return range(padding, grid_rows - padding), range(grid_cols)
    new_width = int(round(width * (grid_rows / height), 7))
    padding = (grid_cols - new_width) // 2
    return range(grid_rows), range(padding, grid_cols - padding)


def anyres_grid(height: int, width: int, config) -> AnyResGrid:
    """The feature layout the model builds for an image of `height x width` pixels."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    best_height, best_width = select_best_resolution((height, width), config.image_grid_pinpoints)
    grid_rows, grid_cols = best_height // vision.image_size * side, best_width // vision.image_size * side
    rows, cols = _unpadded(height, width, grid_rows, grid_cols)
    return AnyResGrid(side, rows, cols)


def _tile_cells(image_processor, patch_size: int) -> torch.Tensor:
    """`[g, g, 4]` rectangles of one tile's patch features in the tile resized to `size` (before its crop)."""
    size_height, size_width = _side(image_processor.size)
    crop_height, crop_width = (
        _side(image_processor.crop_size) if image_processor.do_center_crop else (size_height, size_width)
    )
    top, left = (size_height - crop_height) // 2, (size_width - crop_width) // 2
    rows, cols = crop_height // patch_size, crop_width // patch_size
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    corners = [c * patch_size + left, r * patch_size + top, (c + 1) * patch_size + left, (r + 1) * patch_size + top]
    return torch.stack(corners, dim=-1).double()


def anyres_rectangles(width: int, height: int, image_processor, config) -> torch.Tensor:
    """`[n_tokens, 4]` rectangles `(x0, y0, x1, y1)` in original pixels in LLaVA-NeXT's token order (NaN rows
    for newlines): the base view squashes the image to one tile; the high-resolution view fits it into the
    best pinpoint resolution, pads it centred and cuts tiles."""
    grid = anyres_grid(height, width, config)
    size_height, size_width = _side(image_processor.size)
    tile = image_processor.crop_size["height"] if image_processor.crop_size else size_height
    cells = _tile_cells(image_processor, config.vision_config.patch_size)
    base = cells * torch.tensor([width / size_width, height / size_height] * 2, dtype=torch.double)
    cells = cells * torch.tensor([tile / size_width, tile / size_height] * 2, dtype=torch.double)

    best_height, best_width = select_best_resolution((height, width), config.image_grid_pinpoints)
    fitted_height, fitted_width = _fitted_size(height, width, best_height, best_width)
    paste_y, paste_x = (best_height - fitted_height) // 2, (best_width - fitted_width) // 2
    tile_rows, tile_cols = best_height // tile, best_width // tile
    tiles_y, tiles_x = torch.meshgrid(torch.arange(tile_rows), torch.arange(tile_cols), indexing="ij")
    origin = torch.stack([tiles_x * tile, tiles_y * tile] * 2, dim=-1).double()  # [ty, tx, 4]
    canvas = cells[None, None] + origin[:, :, None, None]  # [ty, tx, g, g, 4]
    canvas = rearrange(canvas, "ty tx gy gx xy -> (ty gy) (tx gx) xy")
    shift = torch.tensor([paste_x, paste_y] * 2, dtype=torch.double)
    scale = torch.tensor([width / fitted_width, height / fitted_height] * 2, dtype=torch.double)
    high = (canvas - shift) * scale
    newline = torch.full((len(grid.rows), 1, 4), float("nan"), dtype=torch.double)
    rows = torch.cat([high[grid.rows.start : grid.rows.stop, grid.cols.start : grid.cols.stop], newline], dim=1)
    return torch.cat([rearrange(base, "gy gx xy -> (gy gx) xy"), rows.reshape(-1, 4)])


@register("llava_next")
class LlavaNextAdapter(ClipVisionTower, Adapter):
    """Vision sites: one row of the CLIP tower's batch per tile — each image's base view, then its
    high-resolution tiles (row-major), images in batch order."""

    family: str = "llava_next"
    chunks_prompts: bool = True
    object_patch_rules: tuple[str, ...] = ("overlap", "red-mask")

    def image_groups(self, input_ids, inputs) -> dict[str, torch.Tensor]:
        image = self.image_positions(input_ids)
        height, width = inputs["image_sizes"][0].tolist()
        grid = anyres_grid(height, width, self.model.config)
        in_grid = torch.arange(len(image) - grid.n_base)
        is_newline = (in_grid + 1) % (len(grid.cols) + 1) == 0
        return {
            "image_base": image[: grid.n_base],
            "image_grid": image[grid.n_base :][~is_newline],
            "image_newline": image[grid.n_base :][is_newline],
        }

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        return anyres_rectangles(image.width, image.height, self.processor.image_processor, self.model.config)

    def red_mask_patches(self, image, inputs, boxes) -> torch.Tensor:
        """The red cells of the processed mask's tiles in LLaVA-NeXT's token order: the base tile's grid, then
        the stitched high-resolution grid, unpadded, row by row with a (never red) newline after each row."""
        config = self.model.config
        tiles = processed_mask(self.processor.image_processor, red_mask(image.width, image.height, boxes))
        grid = anyres_grid(image.height, image.width, config)
        best_height, best_width = select_best_resolution((image.height, image.width), config.image_grid_pinpoints)
        tile = tiles.shape[-1]
        tile_rows, tile_cols = best_height // tile, best_width // tile
        if tiles.dim() != 4 or len(tiles) != 1 + tile_rows * tile_cols:
            raise InputError(f"the {self.family} image processor made mask pixel values of shape "
                             f"{tuple(tiles.shape)}; expected 1 + {tile_rows * tile_cols} tiles")
        cells = torch.stack([red_cells(plane, config.vision_config.patch_size) for plane in tiles])
        high = rearrange(cells[1:], "(ty tx) gy gx -> (ty gy) (tx gx)", ty=tile_rows, tx=tile_cols)
        kept = high[grid.rows.start : grid.rows.stop, grid.cols.start : grid.cols.stop]
        rows = torch.cat([kept, torch.zeros(len(kept), 1, dtype=torch.bool)], dim=1)
        return torch.cat([cells[0].flatten(), rows.flatten()])

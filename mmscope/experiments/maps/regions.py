"""The regions of a map: the image-token grid cut into blocks of `--region N` x N patches.

Each block is a `Region` — its cell, its rectangle in original pixels and its image tokens' prompt positions —
found from the adapter's patch rectangles (`grid_regions`), so that a fixed grid and an image shown at several
scales (LLaVA-NeXT's base image and tiles) are cut alike; a family whose image tokens are not patches is refused
(`example_regions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mmscope.errors import MMScopeError
from mmscope.experiments.options import OptionError
from mmscope.layout import Example
from mmscope.model import Model


@dataclass(frozen=True)
class Region:
    """One block of the image-token grid: its index (row-major over blocks), its grid (0 for a fixed grid; one
    per patch size where an image is shown at several scales, the finest first), its cell (block row and
    column), its rectangle `(x0, y0, x1, y1)` in original pixels, and its image tokens' prompt positions."""

    index: int
    row: int
    col: int
    rectangle: tuple[float, float, float, float]
    positions: tuple[int, ...]
    grid: int = 0


def _rounded(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values.double() * 1000) / 1000  # to 1e-3 px: edges computed two ways compare equal


def _levels(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among the distinct values (rounded to 1e-3 px), 0-based."""
    rounded = _rounded(values)
    return torch.searchsorted(torch.unique(rounded), rounded)


def grid_regions(rectangles: torch.Tensor, positions: Sequence[int], side: int) -> list[Region]:
    """The regions of `side` x `side` patches, from the image tokens' rectangles `[n, 4]` (NaN rows: tokens that
    show no patch, left out) and their prompt positions `[n]`.

    Tokens are grouped by patch size first (an image shown whole and in tiles, as LLaVA-NeXT does, holds two
    grids; finest first). Within a grid a token's cell is the rank of its rectangle's left edge among the grid's
    distinct left edges, and of its top edge among the top edges; its block is (row // side, col // side).
    Regions come grid by grid, in row-major block order.
    """
    if side < 1:
        raise OptionError(f"region {side} (--region): must be at least 1")
    if len(rectangles) != len(positions):
        raise MMScopeError(f"{len(rectangles)} patch rectangles for {len(positions)} image tokens")
    finite = rectangles.isfinite().all(-1)
    rects = rectangles[finite].double()
    kept = torch.tensor([int(p) for p, keep in zip(positions, finite.tolist(), strict=True) if keep],
                        dtype=torch.long)
    sizes = _rounded(torch.stack([rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]], -1)) if len(rects) else rects
    scales = sorted({tuple(size) for size in sizes.tolist()}, key=lambda wh: wh[0] * wh[1])
    regions: list[Region] = []
    for grid, scale in enumerate(scales):
        members = (sizes == torch.tensor(scale, dtype=sizes.dtype)).all(-1)
        part, part_positions = rects[members], kept[members]
        rows, cols = _levels(part[:, 1]) // side, _levels(part[:, 0]) // side
        blocks: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            blocks.setdefault(key, []).append(i)
        for key, block in sorted(blocks.items()):
            cell = part[block]
            rectangle = (float(cell[:, 0].min()), float(cell[:, 1].min()), float(cell[:, 2].max()),
                         float(cell[:, 3].max()))
            regions.append(Region(len(regions), key[0], key[1], rectangle,
                                  tuple(sorted(part_positions[block].tolist())), grid))
    return regions


def example_regions(model: Model, image: Image.Image, example: Example, side: int) -> list[Region]:
    """The regions of one prepared (unpadded, batch of one) example of `image`; refused for a family whose image
    tokens have no patch rectangles."""
    family = model.adapter.family
    try:
        rectangles = model.adapter.patch_rectangles(image.convert("RGB"), example.inputs)
    except MMScopeError as error:
        raise OptionError(f"mmscope map needs image tokens that are patches of the image; the {family} family's "
                          f"are not ({' '.join(str(error).split())})") from None
    regions = grid_regions(rectangles, example.layout["image"], side)
    if not regions:
        raise OptionError(f"mmscope map needs image tokens that are patches of the image; the {family} family's "
                          "image tokens show no patch")
    return regions


def region_columns(example: Example, regions: Sequence[Region]) -> dict[int, list[int]]:
    """Per region, the columns of its tokens among the example's image tokens (as `image_lens` and
    `image_attention` order them)."""
    column = {position: k for k, position in enumerate(example.layout["image"])}
    return {region.index: [column[p] for p in region.positions] for region in regions}

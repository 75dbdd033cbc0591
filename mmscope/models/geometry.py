"""Where each image token's patch lies in the original image: the processor's pad/resize/crop, inverted.

A bounding box given in original pixels selects the image tokens whose patch overlaps it. Rather than drawing
masks, we carry each patch's rectangle back through the exact geometry of the image processor:

    original (W, H) --pad to square?--> canvas --resize--> resized --center crop--> crop --patchify--> grid

Every step is an affine map of coordinates, so the inverse is exact up to the processor's integer rounding.
"""

from __future__ import annotations

import torch
from einops import rearrange

from mmscope.errors import InputError


def _size_dict(size) -> dict:
    return dict(size) if size is not None else {}


def resized_size(height: int, width: int, size) -> tuple[int, int]:
    """Output `(height, width)` of a CLIP-style resize, following transformers' rounding."""
    size = _size_dict(size)
    if size.get("shortest_edge"):
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise InputError(f"unsupported image-processor size {size}; expected shortest_edge or height/width")


def patch_rectangles(image_width: int, image_height: int, image_processor, patch_size: int) -> torch.Tensor:
    """Rectangles `[n_patches, 4]` as `(x0, y0, x1, y1)` in original-image pixels, in row-major patch order.

    Follows a processor that may pad to a square (`do_pad`), resizes (`size`) and center-crops (`crop_size`).
    Patches that fall on padding map partly or wholly outside `[0, W) x [0, H)`.
    """
    width, height = image_width, image_height
    offset_x = offset_y = 0.0
    if getattr(image_processor, "do_pad", False):
        side = max(width, height)
        offset_x, offset_y = (side - width) // 2, (side - height) // 2
        width = height = side
    if getattr(image_processor, "do_resize", True):
        new_height, new_width = resized_size(height, width, image_processor.size)
    else:
        new_height, new_width = height, width
    scale_x, scale_y = new_width / width, new_height / height
    left = top = 0
    out_height, out_width = new_height, new_width
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(image_processor.crop_size)
        out_height, out_width = crop["height"], crop["width"]
        top, left = (new_height - out_height) // 2, (new_width - out_width) // 2
    rows, cols = out_height // patch_size, out_width // patch_size
    # in float64 throughout: float32 places the edges of a non-integer scale ~1e-6 px off
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.double), torch.arange(cols, dtype=torch.double), indexing="ij")
    x0 = (c * patch_size + left) / scale_x - offset_x
    y0 = (r * patch_size + top) / scale_y - offset_y
    x1 = ((c + 1) * patch_size + left) / scale_x - offset_x
    y1 = ((r + 1) * patch_size + top) / scale_y - offset_y
    return rearrange(torch.stack([x0, y0, x1, y1]).double(), "xy rows cols -> (rows cols) xy")

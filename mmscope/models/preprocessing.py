"""`Preprocessing`: how an image, a prompt and object boxes become model inputs — mmscope's way or the study's.

mmscope's defaults use the processor as its checkpoint configures it, the processor's own tokenisation of the
whole prompt, and the geometry of the processor for boxes (a patch is an object patch when a box overlaps it).
The cross-modal information-flow study's code did three things differently, and each is one knob here:

    square_pad       LLaVA's `expand2square`: pad to a square of the processor's mean colour, then resize
    prompt_chunks    LLaVA's `tokenizer_image_token`: tokenise the text before and after `<image>` separately
    object_patches   "red-mask": draw the boxes red on a black mask, process it like the image, read red patches

    model = mmscope.load(folder, preprocessing=Preprocessing.study())   # LLaVA-1.5 as the study ran it
    model.set_preprocessing(Preprocessing(object_patches="red-mask"))    # one knob, on a loaded model

Which knobs a family can do is the adapter's to say (`Adapter.check_preprocessing`); the others refuse in one
line naming the knob and the family. This module also holds the red mask's two steps, drawing and reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from PIL import Image, ImageDraw

from mmscope.errors import InputError, known, suggest

OBJECT_PATCH_RULES = ("overlap", "red-mask")
RED = (255, 0, 0)


@dataclass(frozen=True)
class Preprocessing:
    """Three preprocessing knobs; the defaults are mmscope's own behaviour, `study()` is the study's.

    Attributes:
        square_pad: pad the image to a square of the image processor's mean colour, centred, before resizing
            (LLaVA's `expand2square`, `image_aspect_ratio="pad"`); False leaves the processor as configured.
        prompt_chunks: tokenise the text before and after the image placeholder each on its own, one BOS at the
            start (LLaVA's `tokenizer_image_token`); False tokenises the whole prompt as the processor does.
        object_patches: "overlap": an image token is an object patch when a box overlaps its patch; "red-mask":
            when its patch holds a pixel exactly (255, 0, 0) of the boxes drawn filled red (edges inclusive) on
            a black mask that went through the image processor without rescaling or normalisation.
    """

    square_pad: bool = False
    prompt_chunks: bool = False
    object_patches: str = "overlap"

    def __post_init__(self) -> None:
        for name in ("square_pad", "prompt_chunks"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"Preprocessing.{name} must be True or False; got {getattr(self, name)!r}")
        if self.object_patches not in OBJECT_PATCH_RULES:
            raise InputError(f"Preprocessing.object_patches {self.object_patches!r} is not a rule; known: "
                             f"{known(OBJECT_PATCH_RULES)}{suggest(str(self.object_patches), OBJECT_PATCH_RULES)}")

    @classmethod
    def study(cls) -> Preprocessing:
        """All three knobs as the study's code did them on LLaVA-1.5 (other families take the knobs they can)."""
        return cls(square_pad=True, prompt_chunks=True, object_patches="red-mask")

    def to_dict(self) -> dict:
        """The knobs as a plain dict, for config records (`Preprocessing(**d)` rebuilds it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        """The setting a `to_dict` record describes; an unknown key is refused by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise InputError(f"unknown preprocessing knob {unknown[0]!r}; known: {known(names)}"
                             f"{suggest(unknown[0], names)}")
        return cls(**record)


def red_mask(width: int, height: int, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A black RGB image of `width x height` with every `(x, y, w, h)` box filled red, as the study drew it:
    `ImageDraw.rectangle((x, y, x + w, y + h))`, inclusive of the right and bottom edge."""
    mask = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((x, y, x + w, y + h), fill=RED)
    return mask


def processed_mask(image_processor, mask: Image.Image) -> torch.Tensor:
    """The mask through `image_processor` with rescaling and normalisation off: `[..., 3, H, W]` pixel values
    0..255 (the processor's own pad, resize and crop; for tiling processors one plane per tile)."""
    output = image_processor(mask, do_rescale=False, do_normalize=False, return_tensors="pt")
    return output["pixel_values"][0]


def red_cells(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Boolean `[rows, cols]`: which `patch_size` cells of one processed mask `[3, H, W]` hold a pixel that is
    exactly (255, 0, 0)."""
    channels, height, width = pixels.shape
    if channels != 3:
        raise InputError(f"a processed red mask needs 3 channels; got pixel values of shape {tuple(pixels.shape)}")
    red = torch.ones(height, width, dtype=torch.bool)
    for channel, value in enumerate(RED):
        red &= pixels[channel].round() == value
    rows, cols = height // patch_size, width // patch_size
    cells = red[: rows * patch_size, : cols * patch_size].reshape(rows, patch_size, cols, patch_size)
    return cells.any(dim=3).any(dim=1)

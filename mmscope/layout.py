"""Token layout: which positions of a prompt hold the image, the question, the last token, an object's patches …

`Example` carries the tensors a Hugging Face model takes (`.inputs`) and, per batch row, a mapping from
token-group name to sorted positions in the language model's sequence (`.layouts`). `token_layout` finds the
groups: from the prompt template's named parts (matched by the tokenizer's character offsets, never by token
strings), from the adapter's image positions and extra image groups, and — when bounding boxes are given —
from the geometry of the image processor (`object`: image tokens whose patch overlaps a box — or, under the
study's red-mask rule, whose patch of the processed box mask is red; `other_patches`; and `random_patches`, a
control group of as many other patches as the object has, drawn reproducibly) and — when the question's object
names are given — from the question's text (`object_word`: the tokens spelling them, `word_spans`).

Batches are left-padded, as for generation, so the last prompt token of every row sits at position -1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from mmscope.errors import InputError, LayoutError, known, suggest

if TYPE_CHECKING:
    from mmscope.models.adapter import Adapter
    from mmscope.models.encoding import Encoding

Layout = dict[str, list[int]]


@dataclass
class Example:
    """One or more prompts ready to run.

    Attributes:
        inputs: the dict of tensors the HF model takes, batch size B (input_ids `[B, T]`, pixel_values …).
        layouts: per row, token-group name → sorted positions in `[0, T)` (padding included in the count).
        prompts: per row, the prompt text before the processor expanded the image placeholder.
        padding: per row, how many pad tokens precede the prompt (left padding).
        meta: per row, free-form metadata (question, image size, boxes …).
    """

    inputs: dict[str, torch.Tensor]
    layouts: list[Layout]
    prompts: list[str]
    padding: list[int] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.padding:
            self.padding = [0] * len(self.layouts)
        if not self.meta:
            self.meta = [{} for _ in self.layouts]

    def __len__(self) -> int:
        return len(self.layouts)

    @property
    def layout(self) -> Layout:
        """The layout of a single example (use `layouts` for a batch)."""
        if len(self) != 1:
            raise LayoutError(f"this Example is a batch of {len(self)}; use .layouts[i] for row i")
        return self.layouts[0]

    @property
    def seq_len(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def groups(self) -> list[str]:
        """Token-group names present in every row."""
        return sorted(set.intersection(*(set(layout) for layout in self.layouts)))

    def positions(self, group: str | tuple[int, ...] | list[int], row: int) -> torch.Tensor:
        """Positions `[n]` of `group` in row `row`: a group name, or explicit positions of the unpadded prompt."""
        if isinstance(group, str):
            layout = self.layouts[row]
            if group not in layout:
                raise LayoutError(f"unknown token group {group!r}; known: {known(sorted(layout))}"
                                  f"{suggest(group, layout)}")
            return torch.tensor(layout[group], dtype=torch.long)
        length = self.seq_len - self.padding[row]
        bad = [p for p in group if not -length <= p < length]
        if bad:
            raise LayoutError(f"positions {bad} lie outside the prompt of row {row} (length {length})")
        return torch.tensor([p % length + self.padding[row] for p in group], dtype=torch.long)

    def select(self, rows: list[int]) -> Example:
        """The sub-batch of the given rows (padding columns kept)."""
        index = torch.tensor(rows)
        batch_size = len(self)
        inputs = {
            key: value[index] if torch.is_tensor(value) and value.shape[:1] == (batch_size,) else value
            for key, value in self.inputs.items()
        }
        pick = lambda items: [items[row] for row in rows]  # noqa: E731
        return Example(inputs, pick(self.layouts), pick(self.prompts), pick(self.padding), pick(self.meta))


def collate(examples: list[Example], pad_token_id: int, sequence_keys: tuple[str, ...]) -> Example:
    """Left-pad and stack examples into one batch; layouts shift by each row's padding.

    `sequence_keys` name the `[B, T]` tensors to pad (ids and masks); every other tensor is concatenated along
    its first dimension (pixel values, image sizes …), zero-padded at the end of its other dimensions when the
    examples differ there (e.g. a different number of image tiles, which the models skip as all-zero tiles).
    """
    if not examples:
        raise LayoutError("cannot collate an empty list of examples")
    length = max(example.seq_len for example in examples)
    inputs: dict[str, torch.Tensor] = {}
    for key in examples[0].inputs:
        parts = [example.inputs[key] for example in examples]
        if key in sequence_keys:
            fill = pad_token_id if key == "input_ids" else 0
            parts = [
                torch.cat([torch.full((p.shape[0], length - p.shape[1]), fill, dtype=p.dtype), p], dim=1)
                for p in parts
            ]
        elif torch.is_tensor(parts[0]) and len({p.shape[1:] for p in parts}) > 1:
            parts = [_zero_pad_to(p, [max(sizes) for sizes in zip(*(q.shape[1:] for q in parts))]) for p in parts]
        inputs[key] = torch.cat(parts, dim=0)
    layouts, prompts, padding, meta = [], [], [], []
    for example in examples:
        for row in range(len(example)):
            shift = length - example.seq_len
            layouts.append({g: [p + shift for p in ps] for g, ps in example.layouts[row].items()})
            prompts.append(example.prompts[row])
            padding.append(example.padding[row] + shift)
            meta.append(example.meta[row])
    return Example(inputs, layouts, prompts, padding, meta)


def _zero_pad_to(tensor: torch.Tensor, trailing: list[int]) -> torch.Tensor:
    """`tensor` zero-padded at the end of every dimension after the first to the sizes `trailing`."""
    padding = []
    for size, target in zip(reversed(tensor.shape[1:]), reversed(trailing), strict=True):
        padding += [0, target - size]
    return torch.nn.functional.pad(tensor, padding)


def text_layout(
    offsets: list[tuple[int, int]], spans: dict[str, list[tuple[int, int]]]
) -> dict[str, list[int]]:
    """Token indices of each group: tokens whose character span `[s, e)` overlaps one of the group's spans.

    Zero-width tokens (BOS, other added specials) belong to no group.
    """
    layout: dict[str, list[int]] = {}
    for group, group_spans in spans.items():
        layout[group] = [
            i
            for i, (start, end) in enumerate(offsets)
            if end > start and any(start < span_end and end > span_start for span_start, span_end in group_spans)
        ]
    return layout


def check_image(image) -> Image.Image:
    """`image` (a PIL image, or the path of an image file) as an RGB PIL image, or an InputError naming what was
    given instead."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise InputError(f"image file {str(path)!r} cannot be read as an image ({error})") from None
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL.Image.Image or the path of an image file; got "
                         f"{type(image).__name__}: {str(image)[:60]!r}")
    if image.width < 1 or image.height < 1:
        raise InputError(f"image {_image_name(image)}is {image.width}x{image.height} pixels; it must have at least "
                         "one pixel each way")
    try:
        image.load()  # an image opened lazily reads its file only now: a truncated one fails here
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"image {_image_name(image)}cannot be read ({error})") from None


def _image_name(image: Image.Image) -> str:
    """`'path' ` for an image opened from a file, else "" — for error messages."""
    filename = getattr(image, "filename", "")
    return f"{str(filename)!r} " if filename else ""


def check_box(box, image_width: int, image_height: int, tolerance: float = 1.0) -> tuple[float, float, float, float]:
    """`box` as floats `(x, y, w, h)`, or an InputError naming it when it is malformed or outside the image."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"box {box!r} is not (x, y, w, h)") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise InputError(f"box {box!r} has a value that is not a finite number")
    if w <= 0 or h <= 0:
        raise InputError(f"box {box!r} has non-positive width or height")
    if x < -tolerance or y < -tolerance or x + w > image_width + tolerance or y + h > image_height + tolerance:
        raise InputError(f"box {box!r} (x, y, w, h) lies outside the {image_width}x{image_height} image")
    return x, y, w, h


def overlapping(rectangles: torch.Tensor, boxes) -> torch.Tensor:
    """Boolean `[n_patches]`: which rectangles `[n, 4]` overlap any `(x, y, w, h)` box with positive area."""
    hit = torch.zeros(len(rectangles), dtype=torch.bool)
    for x, y, w, h in boxes:
        ix = torch.minimum(rectangles[:, 2], torch.tensor(x + w)) - torch.maximum(rectangles[:, 0], torch.tensor(x))
        iy = torch.minimum(rectangles[:, 3], torch.tensor(y + h)) - torch.maximum(rectangles[:, 1], torch.tensor(y))
        hit |= (ix > 0) & (iy > 0)
    return hit


# The groups `token_layout` adds from boxes: an example prepared without boxes lacks them (and one whose object
# has more patches than the rest of the image lacks `random_patches`).
BOX_GROUPS = frozenset({"object", "other_patches", "random_patches"})
# The group `Model.prepare` adds from the question's object names (GQA's annotations); an example prepared
# without names, or whose question spells none of them, lacks it.
WORD_GROUPS = frozenset({"object_word"})
OPTIONAL_GROUPS = BOX_GROUPS | WORD_GROUPS


def word_spans(question: str, names: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
    """Character spans of each of `names` in `question` (shifted by `start`, where the question begins in the
    prompt): its first occurrence as a whole word, or as its plural, case-insensitive, as GQA's annotations
    name a question's objects ("cube" in "Are there any cubes …?"). A name the question does not spell is
    skipped."""
    spans = []
    for name in names:
        name = name.strip() if isinstance(name, str) else ""
        found = re.search(rf"(?<!\w){re.escape(name)}s?(?!\w)", question, flags=re.IGNORECASE) if name else None
        if found is not None:
            spans.append((start + found.start(), start + found.end()))
    return sorted(set(spans))


def random_patches(objects: list[int], others: list[int], question: str, seed: int) -> list[int] | None:
    """`len(objects)` positions drawn without replacement from `others`, sorted — the same for the same inputs in
    any process (the draw is seeded by a SHA-256 of `seed`, `question` and `objects`, not Python's salted
    `hash`); None when `others` holds fewer positions than `objects`."""
    if len(others) < len(objects):
        return None
    key = json.dumps([seed, question, objects]).encode()
    draw = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return sorted(draw.sample(others, len(objects)))


def token_layout(
    adapter: Adapter,
    prompt: str,
    spans: dict[str, list[tuple[int, int]]],
    encoding: Encoding,
    image: Image.Image,
    boxes: Sequence[Sequence[float]] | None = None,
    *,
    question: str = "",
    control_seed: int = 0,
) -> Layout:
    """Every token group of one processed prompt.

    Args:
        adapter: the model's bound adapter (image positions, extra image groups, patch rectangles).
        prompt: the rendered prompt, before the processor expanded the image placeholder.
        spans: per template group, its character spans in `prompt` (`PromptTemplate.render`).
        encoding: the processor's output for `prompt` and where each token came from (`Adapter.encode`).
        image: the original image (for boxes).
        boxes: `(x, y, w, h)` in original pixels; they add `object` (by the rule of
            `adapter.preprocessing.object_patches`), `other_patches` and `random_patches`.
        question: the question, mixed into the seed of `random_patches` (so different questions draw differently).
        control_seed: the seed of `random_patches`.
    """
    ids = encoding.inputs["input_ids"][0]
    image_positions = adapter.image_positions(ids)
    if encoding.spans is None:
        layout = _aligned_text_layout(adapter, prompt, spans, ids, image_positions)
    else:
        layout = _text_layout(encoding, spans, image_positions)
    layout["image"] = image_positions.tolist()
    layout["last"] = [len(ids) - 1]
    groups = adapter.image_groups(ids, encoding.inputs)
    layout.update({name: positions.tolist() for name, positions in groups.items()})
    if boxes is not None:
        if not len(boxes):
            raise InputError("boxes is empty: give at least one (x, y, w, h) box, or None for no object groups")
        checked = [check_box(box, image.width, image.height) for box in boxes]
        rectangles = adapter.patch_rectangles(image, encoding.inputs)
        if len(rectangles) != len(image_positions):
            raise InputError(
                f"{len(rectangles)} patch rectangles for {len(image_positions)} image tokens; "
                f"the {adapter.family} adapter's geometry does not match its processor"
            )
        is_patch = rectangles.isfinite().all(-1)
        if adapter.preprocessing.object_patches == "red-mask":
            hit = adapter.red_mask_patches(image, encoding.inputs, checked)
            if len(hit) != len(image_positions):
                raise InputError(f"{len(hit)} red-mask patches for {len(image_positions)} image tokens; the "
                                 f"{adapter.family} adapter's mask does not match its processor")
        else:
            hit = overlapping(rectangles, checked)
        hit &= is_patch
        layout["object"] = image_positions[hit].tolist()
        layout["other_patches"] = image_positions[~hit & is_patch].tolist()
        control = random_patches(layout["object"], layout["other_patches"], question, control_seed)
        if control is not None:
            layout["random_patches"] = control
    return layout


def _text_layout(encoding: Encoding, spans, image_positions: torch.Tensor) -> Layout:
    """Groups from each token's span in the prompt; `image_markers` for the placeholder's non-image tokens."""
    groups = text_layout([tuple(span) for span in encoding.spans.tolist()], spans)
    placeholder = set(groups.pop("image", [])) | set(torch.nonzero(encoding.expanded).flatten().tolist())
    markers = sorted(placeholder - set(image_positions.tolist()))
    if markers:
        groups["image_markers"] = markers
    return groups


def _aligned_text_layout(adapter: Adapter, prompt: str, spans, ids: torch.Tensor,
                         image_positions: torch.Tensor) -> Layout:
    """Text groups from the tokenizer's character offsets on the unexpanded prompt, mapped onto `ids`
    (for processors that do not report offsets)."""
    encoded = adapter.tokenizer(prompt, return_offsets_mapping=True)
    image_span = spans.pop("image", [])
    plain = [
        (token, offset)
        for token, offset in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        if not any(offset[0] < end and offset[1] > start for start, end in image_span)
        and token != adapter.image_token_id
    ]
    is_image = torch.zeros(len(ids), dtype=torch.bool)
    is_image[image_positions] = True
    text_positions = torch.nonzero(~is_image).flatten()
    plain_ids = [token for token, _ in plain]
    if plain_ids != ids[text_positions].tolist():
        raise InputError(
            "the processor's text tokens differ from the tokenizer's on the same prompt; "
            f"cannot place token groups for prompt {prompt[:80]!r}…"
        )
    groups = text_layout([offset for _, offset in plain], spans)
    return {group: text_positions[indices].tolist() for group, indices in groups.items()}

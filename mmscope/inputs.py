"""Model inputs with their token layout: which positions hold the image, the question, the last token …

`Example` carries the tensors a Hugging Face model takes (`.inputs`) and, per batch row, a mapping from
token-group name to sorted positions in the language model's sequence (`.layouts`). Groups come from the
prompt template's named parts (matched by the tokenizer's character offsets), from the image-token ids, and —
when bounding boxes are given — from the geometry of the image processor (`object`, `other_patches`).

Batches are left-padded, as for generation, so the last prompt token of every row sits at position -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmscope.errors import LayoutError, known

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
                raise LayoutError(f"unknown token group {group!r}; known: {known(sorted(layout))}")
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

"""The measures several experiments share, in a module of their own so that no experiment imports another.

A knockout's `Flow` (a named source → target direction, swept by knockout and probe) and `knockout_scores` (the
columns every knockout row ends with, Δp% among them: knockout and the knockout maps); a clean → corrupted
patch's `corrupted_example` (the same question about another scene's image) and `restored_share` (the share of
p(answer) a patch restores, NaN where the corruption moved p by less than `MIN_EFFECT`): patch and the patching
maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmscope.data.errors import DataError
from mmscope.experiments.declarations import flow_ends
from mmscope.experiments.runner import Question
from mmscope.interventions import Knockout
from mmscope.layout import Example
from mmscope.model import Model

MIN_EFFECT = 0.05


@dataclass(frozen=True)
class Flow:
    """A named knockout direction: information may no longer move from `source` to `target`."""

    source: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    @classmethod
    def parse(cls, text: str) -> Flow:
        """A flow from its name, `source->target`."""
        return cls(*flow_ends(text))

    def knockout(self, layers: Sequence[int]) -> Knockout:
        """The knockout of this flow in `layers`."""
        # Blocking last->last must block the last position's attention to itself, the only edge it names.
        return Knockout(self.source, self.target, tuple(layers), keep_self=self.source != self.target)


def knockout_scores(layers: Sequence[int], p_clean: float, p_ko: float) -> dict:
    """The columns every knockout row ends with: the window's first and last layer, p(answer) clean and under
    the knockout, and Δp% = (p_ko − p_clean) / p_clean · 100."""
    return {"first_layer": layers[0], "last_layer": layers[-1], "p_clean": p_clean, "p_ko": p_ko,
            "delta_pct": (p_ko - p_clean) / p_clean * 100.0}


def corrupting_row(dataset, index: int) -> dict:
    """The next row with a different image (the corrupted run's image)."""
    for offset in range(1, len(dataset)):
        other = dataset[(index + offset) % len(dataset)]
        if other["image_id"] != dataset[index]["image_id"]:
            return other
    raise DataError(f"patching needs at least two different images in the data; all {len(dataset)} questions "
                    f"are about image {dataset[index]['image_id']!r}")


def corrupted_example(model: Model, dataset, question: Question, *, same_size: bool = False) -> tuple[dict, Example]:
    """The corrupting row (`corrupting_row`) and the corrupted example: the same question and boxes about its
    image — resized to the clean image's size with `same_size`, so that every image token shows the same part
    of the frame in both runs (an any-resolution family then cuts both into the same tiles)."""
    clean = question.example
    other = corrupting_row(dataset, question.index)
    image = other["image"].convert("RGB")
    if same_size:
        image = image.resize(clean.meta[0]["image_size"])
    return other, model.prepare(image, question.row["question"], boxes=clean.meta[0]["boxes"])


def restored_share(p_clean: float, p_corrupted: float, p_patched: float) -> float:
    """(p_patched − p_corrupted) / (p_clean − p_corrupted); NaN where the corruption moved p by less than
    `MIN_EFFECT`."""
    effect = p_clean - p_corrupted
    return (p_patched - p_corrupted) / effect if abs(effect) >= MIN_EFFECT else float("nan")

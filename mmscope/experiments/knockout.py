"""Knockout sweep: where does information flow from the image and the question to the answer?

For each correctly answered question, each flow (source group → target group) and each centre layer c, attention
from every target to every source position is blocked in the window `knockout_window(c, k, L)`, and the
probability of the first token of the clean greedy answer at the last position is compared with the clean one:
Δp% = (p_knockout − p_clean) / p_clean · 100. A large drop at centre c means the flow matters around layer c.
This is the protocol of Zhang et al. (CVPR 2025), "Cross-modal Information Flow in Multimodal LLMs".

All variants of one example run through the sweep engine, which computes the shared clean prefix once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmscope.errors import InterventionError, known
from mmscope.experiments.answers import clean_answer
from mmscope.experiments.common import example_of, resumable_loop, row_ids
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.runs import RunDir
from mmscope.interventions import Knockout, knockout_window
from mmscope.model import Model

STUDY_FLOWS = (
    "image->last",
    "question->last",
    "last->last",
    "image->question",
    "object->question",
    "other_patches->question",
)


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
        parts = text.split("->")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise InterventionError(f"flow {text!r} must read 'source->target', e.g. 'image->last'")
        return cls(parts[0].strip(), parts[1].strip())

    def knockout(self, layers: Sequence[int]) -> Knockout:
        # Blocking last->last must block the last position's attention to itself, the only edge it names.
        return Knockout(self.source, self.target, tuple(layers), keep_self=self.source != self.target)


def knockout_rows(model: Model, index: int, row: dict, flows: Sequence[Flow], window: int, *,
                  include_all: bool = False, engine: str = "prefix") -> list[dict] | None:
    """All (flow × centre layer) rows of one example, or None when it is skipped (answered wrongly)."""
    example = example_of(model, row)
    answer = clean_answer(model, example, row["answer"])
    if not answer.correct and not include_all:
        return None
    groups = set(example.groups())
    usable = [flow for flow in flows if {flow.source, flow.target} <= groups]
    variants = [
        Variant((flow.name, center), (flow.knockout(knockout_window(center, window, model.n_layers)),))
        for flow in usable
        for center in range(model.n_layers)
    ]
    clean, probs = run_variants(model, example, variants, engine=engine)
    p_clean = clean.probs[answer.first_token].item()
    ids = row_ids(index, row)
    rows = []
    for variant, variant_probs in zip(variants, probs, strict=True):
        flow, center = variant.key
        p_ko = variant_probs[answer.first_token].item()
        layers = variant.interventions[0].layers
        rows.append({
            **ids,
            "generated": answer.text,
            "correct": answer.correct,
            "flow": flow,
            "center": center,
            "window": window,
            "first_layer": layers[0],
            "last_layer": layers[-1],
            "p_clean": p_clean,
            "p_ko": p_ko,
            "delta_pct": (p_ko - p_clean) / p_clean * 100.0,
        })
    return rows


def check_flows(flows: Sequence[str]) -> list[Flow]:
    parsed = [Flow.parse(flow) for flow in flows]
    if not parsed:
        raise InterventionError(f"no flows given; the study's are: {known(STUDY_FLOWS)}")
    return parsed


def run_knockout(model: Model, dataset, run: RunDir, flows: Sequence[str] = STUDY_FLOWS, window: int = 9, *,
                 include_all: bool = False, engine: str = "prefix") -> dict[str, int]:
    """Sweep every example of `dataset` into `run` (resumable). Returns counts of used and skipped examples."""
    parsed = check_flows(flows)
    return resumable_loop(
        run, dataset,
        lambda index, row: knockout_rows(model, index, row, parsed, window, include_all=include_all, engine=engine),
        desc="knockout",
    )

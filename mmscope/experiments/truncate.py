"""Truncation sweep: how good is the answer if the model stops after layer ℓ?

For each layer ℓ the decoder exits early (`Truncate(ℓ)`: later layers skipped, final norm and lm_head applied)
and we record the probability of the clean answer's first token and whether it is still the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmscope.experiments.engine import ENGINES, Variant, run_variants
from mmscope.experiments.figures import curves
from mmscope.experiments.options import QuestionOptions, check_choice, engine_option
from mmscope.experiments.runner import Experiment, PerQuestion, Question, Sweep, Variants, questions
from mmscope.interventions import Truncate
from mmscope.model import Model


@dataclass(frozen=True)
class TruncateOptions(QuestionOptions):
    """`mmscope truncate`: the sweep engine."""

    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("engine", self.engine, ENGINES)


def truncate_variants(options: TruncateOptions, model: Model) -> Variants:
    """An early exit after every layer."""
    layers = list(range(model.n_layers))
    return Variants({"layers": layers}, tuple(Variant((layer,), (Truncate(layer),)) for layer in layers))


def truncate_rows(sweep: Sweep[TruncateOptions], question: Question) -> list[dict]:
    """p(answer) and whether it is still the top token, exiting after each layer of one question."""
    clean, probs = run_variants(sweep.model, question.example, question.variants, engine=sweep.options.engine)
    token = question.answer.first_token
    p_clean = clean.probs[token].item()
    return [
        {"layer": layer, "p_clean": p_clean, "p_answer": variant_probs[token].item(),
         "top1": float(variant_probs.argmax().item() == token)}
        for (layer,), variant_probs in zip((variant.key for variant in question.variants), probs, strict=True)
    ]


def truncate_figure(summary: pd.DataFrame, path: Path, options: TruncateOptions) -> Path:
    """Mean p(answer) ± 95% CI after early exit against the layer, one panel per category."""
    return curves(summary.assign(curve="p(answer)"), path, x="layer", hue="curve", panel="category",
                  ylabel="p(answer) after early exit", title="Truncation sweep")


def truncate_findings(table: pd.DataFrame, summary: pd.DataFrame, options: TruncateOptions) -> list[str]:
    """The share of questions whose answer is still top-1, per category × layer."""
    top1 = table.groupby(["category", "layer"])["top1"].mean().unstack("layer")
    return ["", "Answer still top-1 when exiting after layer ℓ (share):",
            top1.to_string(float_format=lambda v: f"{v:.2f}")]


TRUNCATE = Experiment(
    name="truncate",
    help="Early exit after each layer: p(answer) and whether it is still the top token.",
    options=TruncateOptions,
    data=questions,
    work=PerQuestion(truncate_rows, truncate_variants),
    value="p_answer",
    by=("category", "layer"),
    figure=truncate_figure,
    findings=truncate_findings,
    desc="truncation",
)

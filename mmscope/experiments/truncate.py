"""Truncation sweep: how good is the answer if the model stops after layer ℓ?

For each layer ℓ the decoder exits early (`Truncate(ℓ)`: later layers skipped, final norm and lm_head applied)
and we record the probability of the clean answer's first token and whether it is still the argmax.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmscope.experiments import declarations
from mmscope.experiments.declarations import TruncateOptions  # declared without torch; kept importable from here
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.figures import PROBABILITY, curves
from mmscope.experiments.runner import Experiment, Finished, PerQuestion, Question, Sweep, Variants, questions
from mmscope.experiments.runs import summarize
from mmscope.interventions import Truncate
from mmscope.model import Model


def truncate_variants(options: TruncateOptions, model: Model, dataset=None) -> Variants:
    """An early exit after every layer (the same for every question of `dataset`)."""
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


def top1_summary(table: pd.DataFrame, options: TruncateOptions) -> pd.DataFrame:
    """The share of questions whose answer is still the top token, per category × layer: its mean, 95% CI (as
    `--ci` asks) and n, from the rows' `top1`."""
    return summarize(table, ["category", "layer"], "top1", ci=getattr(options, "ci", None) or "normal",
                     seed=getattr(options, "seed", 0))


def truncate_figure(run: Finished[TruncateOptions], path: Path) -> Path:
    """The share of questions whose answer is still top-1 after early exit ± 95% CI (clipped to [0, 1]) against
    the layer, one panel per category, from the run's rows (its summary, which the figure does not draw, holds
    the mean p(answer))."""
    shares = top1_summary(run.table, run.options)
    return curves(shares.assign(curve="answer still top-1"), path, x="layer", hue="curve", panel="category",
                  ylabel="share with the answer top-1", limits=PROBABILITY,
                  title="Truncation sweep: exit after layer ℓ (share of questions, 95% CI)")


def truncate_findings(table: pd.DataFrame, summary: pd.DataFrame, options: TruncateOptions) -> list[str]:
    """The share of questions whose answer is still top-1, per category × layer."""
    top1 = table.groupby(["category", "layer"])["top1"].mean().unstack("layer")
    return ["", "Answer still top-1 when exiting after layer ℓ (share):",
            top1.to_string(float_format=lambda v: f"{v:.2f}")]


TRUNCATE = Experiment(
    command=declarations.TRUNCATE,
    data=questions,
    work=PerQuestion(truncate_rows, truncate_variants),
    value="p_answer",
    by=("category", "layer"),
    figure=truncate_figure,
    findings=truncate_findings,
    desc="truncation",
)

"""Knockout sweep: where does information flow from the image and the question to the answer?

For each correctly answered question, each flow (source group → target group) and each centre layer c, attention
from every target to every source position is blocked in the window `knockout_window(c, k, L)`, and the
probability of the first token of the clean greedy answer at the last position is compared with the clean one:
Δp% = (p_knockout − p_clean) / p_clean · 100. A large drop at centre c means the flow matters around layer c.
This is the protocol of Zhang et al. (CVPR 2025), "Cross-modal Information Flow in Multimodal LLMs".

A control the study lacked runs by default: `random_patches->question` blocks as many image patches as the
object's, drawn at random outside the object (seeded by `--seed`, the question and the object), so the report
can set the object flow's drop beside that of any patches of its size.

All variants of one example run through the sweep engine, which computes the shared clean prefix once.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmscope.experiments import declarations
from mmscope.experiments.declarations import (  # the options, declared without torch; kept importable from here
    CONTROL_GROUP,
    DEFAULT_FLOWS,
    KnockoutOptions,
    default_window,
)
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.figures import DELTA_PCT, curves
from mmscope.experiments.options import OptionError
from mmscope.experiments.references import read_reference
from mmscope.experiments.runner import Experiment, Finished, PerQuestion, Question, Sweep, Variants, questions
from mmscope.experiments.scores import Flow, knockout_scores
from mmscope.interventions import knockout_window
from mmscope.model import Model


def knockout_variants(options: KnockoutOptions, model: Model, dataset=None) -> Variants:
    """Every flow × centre layer, each blocking its flow in the window around the centre (the same for every
    question of `dataset`)."""
    flows = [Flow.parse(flow) for flow in options.flows]
    widest = 2 * model.n_layers - 2  # any wider and the window around every centre holds all layers
    if options.window > widest:
        raise OptionError(f"window {options.window} (--window) blocks all {model.n_layers} layers of {model.name} "
                          f"at every centre, so the sweep could show nothing; choose 1 to {widest}")
    centers = list(range(model.n_layers))
    variants = tuple(
        Variant((flow.name, center), (flow.knockout(knockout_window(center, options.window, model.n_layers)),))
        for flow in flows
        for center in centers
    )
    parameters = {"flows": [flow.name for flow in flows], "window": options.window, "centers": centers}
    return Variants(parameters, variants, named_by="--flow")


def knockout_rows(sweep: Sweep[KnockoutOptions], question: Question) -> list[dict]:
    """The (flow × centre layer) rows of one question; flows between groups it lacks are left out."""
    variants = question.variants
    clean, probs = run_variants(sweep.model, question.example, variants, engine=sweep.options.engine)
    token = question.answer.first_token
    p_clean = clean.probs[token].item()
    rows = []
    for variant, variant_probs in zip(variants, probs, strict=True):
        flow, center = variant.key
        p_ko = variant_probs[token].item()
        layers = variant.interventions[0].layers
        rows.append({
            "generated": question.answer.text,
            "correct": question.answer.correct,
            "flow": flow,
            "center": center,
            "window": sweep.options.window,
            **knockout_scores(layers, p_clean, p_ko),
        })
    return rows


def knockout_figure(run: Finished[KnockoutOptions], path: Path) -> Path:
    """Mean Δp% ± 95% CI against the centre layer, one curve per flow (in the order the flows were asked for,
    which the legend keeps), one panel per category; with `--reference`, the published curve dashed over the
    panels and flow it names."""
    summary, options = run.summary, run.options
    overlay = read_reference(options.reference) if options.reference is not None else None
    band = "bootstrap" if options.ci == "bootstrap" else "normal"
    return curves(summary, path, x="center", hue="flow", panel="category", ylabel="Δp (%)",
                  title=f"Attention knockout, window {options.window} (95% CI, {band})", zero_line=True,
                  overlay=overlay, limits=DELTA_PCT, hue_order=list(getattr(options, "flows", None) or ()))


def knockout_findings(table: pd.DataFrame, summary: pd.DataFrame, options: KnockoutOptions) -> list[str]:
    """Per category and flow, the centre layer with the largest mean drop, and that drop."""
    worst = summary.loc[summary.groupby(["category", "flow"])["mean"].idxmin()]
    findings = worst.rename(columns={"center": "worst center", "mean": "mean Δp %"})
    findings = findings.pivot(index="category", columns="flow", values=["worst center", "mean Δp %"])
    merged = pd.DataFrame({
        flow: [f"L{int(findings.loc[c, ('worst center', flow)])}: {findings.loc[c, ('mean Δp %', flow)]:+.1f}"
               for c in findings.index]
        for flow in table["flow"].unique()  # in the order the flows were asked for
    }, index=findings.index)
    lines = ["", "Largest mean drop of p(answer) per category and flow (centre layer, Δp %):", merged.to_string()]
    lines += control_findings(summary)
    if options.reference is not None:
        categories = set(table["category"])
        curves_of = read_reference(options.reference)
        drawn = [curve for curve in curves_of if curve.category is None or curve.category in categories]
        missed = sorted({curve.category for curve in curves_of} - {curve.category for curve in drawn})
        lines += ["", f"reference curve drawn dashed: {options.reference}" if drawn else
                  f"reference {options.reference} not drawn: it is for {', '.join(missed)}, which this run has "
                  "no panel of"]
    return lines


def control_findings(summary: pd.DataFrame) -> list[str]:
    """Per category, the object flow's largest mean drop beside its matched random-patch control's at the same
    centre: whether the object's patches matter more than any patches of that many."""
    lines = []
    for flow in sorted(summary["flow"].unique()):
        source, _, target = flow.partition("->")
        control = f"{CONTROL_GROUP}->{target}"
        if source != "object" or control not in set(summary["flow"]):
            continue
        rows = []
        for category, part in summary.groupby("category", sort=True):
            own = part[part["flow"] == flow]
            worst = own.loc[own["mean"].idxmin()]
            matched = part[(part["flow"] == control) & (part["center"] == worst["center"])]
            if matched.empty:
                continue
            rows.append({"category": category, "centre": int(worst["center"]), flow: worst["mean"],
                         control: matched["mean"].iloc[0],
                         "difference": worst["mean"] - matched["mean"].iloc[0]})
        if rows:
            table = pd.DataFrame(rows).set_index("category")
            lines += ["", f"{flow} against its control (as many random patches outside the object), at the object "
                          "flow's worst centre (mean Δp %):", table.to_string(float_format=lambda v: f"{v:+.1f}")]
    return lines


KNOCKOUT = Experiment(
    command=declarations.KNOCKOUT,
    data=questions,
    work=PerQuestion(knockout_rows, knockout_variants),
    value="delta_pct",
    by=("category", "flow", "center"),
    figure=knockout_figure,
    findings=knockout_findings,
    desc="knockout",
    prints_table=True,
)

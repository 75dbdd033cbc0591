"""Activation-patching sweep: which (layer, token group) carries the image information the answer needs?

Each correctly answered question runs twice in one batch: clean, and corrupted — the same question about the
image of another scene. For every layer ℓ and token group g, the clean residual stream at (ℓ, g) is patched
into the corrupted run, and we measure how much of the clean answer's probability comes back:

    restored = (p_patched − p_corrupted) / (p_clean − p_corrupted)

1 means the patched activation alone restores the clean answer; 0 means it carries nothing the corruption
removed. Examples where the corruption barely changes p (|p_clean − p_corrupted| < 0.05) are dropped from the
ratio, as the ratio is meaningless there; their raw probabilities stay in the table.

Every (group, layer) patch is a `CachedPatch` variant of the corrupted example, reading the clean run as its
source: the sweep engine runs the clean and the corrupted example once each and every patch from the first
position and layer it touches (`--engine naive`: one full forward per patch from a cached clean run).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmscope.experiments import declarations
from mmscope.experiments.declarations import (  # the options, declared without torch; kept importable from here
    PATCH_GROUPS,
    PatchOptions,
)
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.figures import heatmap
from mmscope.experiments.runner import Experiment, Finished, PerQuestion, Question, Sweep, Variants, questions
from mmscope.experiments.scores import MIN_EFFECT, corrupted_example, restored_share
from mmscope.interventions import CachedPatch
from mmscope.model import Model


def patch_variants(options: PatchOptions, model: Model, dataset=None) -> Variants:
    """Every token group × layer, each patching the clean run's `site` into the corrupted run (the same for
    every question of `dataset`)."""
    layers = list(range(model.n_layers))
    variants = tuple(Variant((group, layer), (CachedPatch(options.site, (layer,), group),))
                     for group in options.groups for layer in layers)
    return Variants({"site": options.site, "groups": list(options.groups), "layers": layers}, variants,
                    named_by="--group")


def patch_rows(sweep: Sweep[PatchOptions], question: Question) -> list[dict]:
    """p_patched and the share restored for every (group, layer) of one question; groups it lacks are left out."""
    model, clean = sweep.model, question.example
    other, corrupted = corrupted_example(model, sweep.dataset, question)
    run, probs = run_variants(model, corrupted, question.variants, source=clean, engine=sweep.options.engine)
    token = question.answer.first_token
    p_clean, p_corrupted = run.source.probs[token].item(), run.probs[token].item()
    rows = []
    for variant, patched in zip(question.variants, probs, strict=True):
        group, layer = variant.key
        p_patched = patched[token].item()
        rows.append({
            "corrupting_image_id": str(other["image_id"]), "site": sweep.options.site, "group": group,
            "layer": layer, "p_clean": p_clean, "p_corrupted": p_corrupted, "p_patched": p_patched,
            "restored": restored_share(p_clean, p_corrupted, p_patched),
        })
    return rows


def restored_matrix(summary: pd.DataFrame) -> pd.DataFrame:
    """The mean share restored, group × layer."""
    return summary.pivot(index="group", columns="layer", values="mean")


def patch_figure(run: Finished[PatchOptions], path: Path) -> Path:
    """A group × layer heatmap of the mean share restored, each group's n (the examples whose corruption moved
    p(answer) enough to restore) beside its name."""
    summary, site = run.summary, getattr(run.options, "site", None)
    return heatmap(restored_matrix(summary), path,
                   title="Clean → corrupted activation patching" + (f" of the {site}" if site else ""),
                   colorbar="share of p(answer) restored",
                   n=summary.pivot(index="group", columns="layer", values="n"))


def patch_findings(table: pd.DataFrame, summary: pd.DataFrame, options: PatchOptions) -> list[str]:
    """How many examples the means average (those whose corruption moved p(answer) too little to restore are
    left out, counted), and the mean share restored per group × layer."""
    moved = table.groupby("example")["restored"].apply(lambda values: values.notna().any())
    averaged = ([f"the means average {int(moved.sum())} of {len(moved)} examples: {int((~moved).sum())} left out "
                 f"because the corrupted image moved p(answer) by less than {MIN_EFFECT:g} (nothing to restore)"]
                if not moved.all() else [f"the means average all {len(moved)} examples"])
    return [*averaged, "", "Share of the clean answer probability restored (mean):",
            restored_matrix(summary).to_string(float_format=lambda v: f"{v:+.2f}")]


PATCH = Experiment(
    command=declarations.PATCH,
    data=questions,
    work=PerQuestion(patch_rows, patch_variants),
    value="restored",
    by=("group", "layer"),
    figure=patch_figure,
    findings=patch_findings,
    desc="patching",
)

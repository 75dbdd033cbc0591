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
import torch

from mmscope.experiments import declarations
from mmscope.experiments.declarations import (  # the options, declared without torch; kept importable from here
    PATCH_GROUPS,
    PatchOptions,
)
from mmscope.experiments.attribution import agreement_lines, agreement_scalars, patch_attribution, verify_estimates
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.figures import estimate_scatter, heatmap, heatmaps, n_text
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
    """p_patched and the share restored for every (group, layer) of one question; groups it lacks are left out.
    With `--estimate atp`, `estimated_rows`."""
    if sweep.options.estimate is not None:
        return estimated_rows(sweep, question)
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


def estimated_rows(sweep: Sweep[PatchOptions], question: Question) -> list[dict]:
    """Every (group, layer) patch estimated to first order (`patch_attribution` summed over the group's
    positions: one forward and one backward of the corrupted run, one forward of the clean one), the largest
    |estimates| and a random sample of the others run exactly; unverified rows hold NaN for p_patched, restored
    and exact. The corrupting image is resized to the clean one's size, so both runs hold their tokens at the
    same positions."""
    options, model, clean = sweep.options, sweep.model, question.example
    other, corrupted = corrupted_example(model, sweep.dataset, question, same_size=True)
    token = question.answer.first_token
    cache = model.cache(clean, [options.site])
    grid = patch_attribution(model, corrupted, cache, [options.site], range(model.n_layers), token,
                             options.metric)[options.site]  # [layers, positions]
    variants = question.variants
    estimates = torch.stack([grid[layer, corrupted.positions(group, 0)].sum()
                             for group, layer in (variant.key for variant in variants)])
    found = verify_estimates(model, corrupted, variants.__getitem__, estimates, token, top=options.verify,
                             sampled=options.verify_random, seed=options.seed + question.index,
                             metric=options.metric, source=clean, engine=options.engine)
    p_clean, p_corrupted = found.p_source, found.p_example
    rows = []
    for variant, verified, p_patched in zip(variants, found.columns, found.p, strict=True):
        group, layer = variant.key
        rows.append({"corrupting_image_id": str(other["image_id"]), "site": options.site, "group": group,
                     "layer": layer, "p_clean": p_clean, "p_corrupted": p_corrupted, "p_patched": p_patched,
                     "restored": restored_share(p_clean, p_corrupted, p_patched), "metric": options.metric,
                     **verified})
    return rows


def restored_matrix(summary: pd.DataFrame) -> pd.DataFrame:
    """The mean share restored, group × layer."""
    return summary.pivot(index="group", columns="layer", values="mean")


def patch_values(table: pd.DataFrame) -> pd.Series:
    """Each row's value: the share restored, or (`--estimate`) the estimated change of the metric."""
    return table["estimate"] if "estimate" in table else table["restored"]


def patch_figure(run: Finished[PatchOptions], path: Path) -> Path | list[Path]:
    """A group × layer heatmap of the mean share restored, each group's n (the examples whose corruption moved
    p(answer) enough to restore) beside its name; with `--estimate`, `estimate_figures`."""
    if getattr(run.options, "estimate", None):
        return estimate_figures(run, path)
    summary, site = run.summary, getattr(run.options, "site", None)
    return heatmap(restored_matrix(summary), path,
                   title="Clean → corrupted activation patching" + (f" of the {site}" if site else ""),
                   colorbar="share of p(answer) restored",
                   n=summary.pivot(index="group", columns="layer", values="n"))


def estimate_figures(run: Finished[PatchOptions], path: Path) -> list[Path]:
    """`patch.png`: the mean estimated change of the metric per group × layer beside the mean exact change of
    the verified patches (blank where none was verified; n per cell); `patch_estimates.png`: estimate against
    exact for every verified patch, a panel per group."""
    table, options = run.table, run.options
    quantity = "Δp(answer)" if options.metric == "prob" else "Δ log p(answer)"
    verified = table[table["verified"] != ""]
    panels = {f"estimated {quantity} (first order, n={table['example'].nunique()})":
              table.pivot_table(index="group", columns="layer", values="estimate", aggfunc="mean"),
              f"exact {quantity}, verified patches ({n_text(verified.groupby(['group', 'layer']).size())} per cell)":
              verified.pivot_table(index="group", columns="layer", values="exact", aggfunc="mean")
              .reindex(index=sorted(table["group"].unique()), columns=sorted(table["layer"].unique()))}
    first = heatmaps(panels, path, colorbar=quantity, rows="token group", columns="layer", per_row=1,
                     title=f"Clean → corrupted patching of the {options.site}: attribution estimate and exact check "
                           f"(--verify {options.verify}, --verify-random {options.verify_random})")
    scatter = estimate_scatter(table, path.parent / "patch_estimates.png", panel=["group"], quantity=quantity,
                               title=f"Patching the {options.site}: first-order estimate against exact effect")
    return [first, scatter]


def patch_findings(table: pd.DataFrame, summary: pd.DataFrame, options: PatchOptions) -> list[str]:
    """How many examples the means average (those whose corruption moved p(answer) too little to restore are
    left out, counted), and the mean share restored per group × layer; with `--estimate`, the mean estimate per
    group × layer and how well it agrees with the exact effects."""
    if getattr(options, "estimate", None):
        matrix = table.pivot_table(index="group", columns="layer", values="estimate", aggfunc="mean")
        return [f"the means average all {table['example'].nunique()} examples", "",
                f"Estimated change of {options.metric}(answer) by patching (mean, first order):",
                matrix.to_string(float_format=lambda v: f"{v:+.3f}"),
                *agreement_lines(table, [], f"Estimates (Δ {options.metric}, every group × layer)"),
                "  (patch_estimates.png: estimate against exact, a panel per group)"]
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
    values=patch_values,  # with --estimate: the estimate
    scalars=lambda table: agreement_scalars(table, []) if "estimate" in table else {},
    figure=patch_figure,
    findings=patch_findings,
    desc="patching",
)

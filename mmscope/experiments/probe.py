"""Probe sweep: which layers linearly encode global (image–text entailment) vs local (object) information?

Following Tao et al. (2024), "Probing Multimodal Large Language Models for Global and Local Semantic
Representations": for every layer, a linear probe (or small MLP) is trained on frozen, pooled hidden states —
  * entailment: (image, statement) → does the image entail the statement? (true captions vs hard negatives
    with one attribute, object or relation swapped); features pooled at the last token and over the text;
  * objects: image → which object categories are present (multi-hot); features pooled over the image tokens
    and at the last token.
The study found intermediate layers best for entailment, while object information peaks earlier.

Not a per-question sweep: its data are the probe datasets built from one split's scene graphs, and its unit
of work (one part of the run folder) is one task × pooling, each training a probe per layer. Its rows are
already one score per layer, so its summary relabels them (no confidence interval: a probe has one held-out
score). Probes may be trained on features read under an intervention (`probe_rows(..., interventions=)`),
e.g. after an image→question knockout, to see how the edit changes what each layer encodes.

The study had no control. With `--controls` (the default; `--no-controls` skips them, two thirds of the
training) every layer's probe is also trained on a shuffled-label baseline and on a control task (Hewitt &
Liang, 2019; `mmscope.probes.train`), and its row gains `shuffled_accuracy`, `control_accuracy` and
`selectivity` = accuracy − control_accuracy (and `shuffled_f1`, `control_f1` for objects). A control task
needs input *types* that recur across the image-grouped split:
  * entailment: the type is the statement's text — "There is a red cube." gets one random true/false label
    whatever image it is asked about, so a probe can score on it only by recognising the sentence;
  * objects: the input text is one fixed prompt, and the image id never recurs across the split, so neither
    is a type; the type is the image's *set of object names* (its label row), and each set gets one random
    label set drawn from the task's — an arbitrary relabelling of the sets, which a probe learns only as far as
    the layer separates the sets and its capacity lets it memorise the mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from mmscope.errors import known, suggest
from mmscope.experiments import declarations
from mmscope.experiments.declarations import ProbeOptions, flow_ends  # declared without torch
from mmscope.experiments.figures import PROBABILITY, curves, curves_with_controls, heatmaps
from mmscope.experiments.knockout import Flow
from mmscope.experiments.options import OptionError
from mmscope.experiments.runner import Experiment, Work
from mmscope.experiments.workspace import probe_datasets
from mmscope.interventions import Intervention, knockout_window
from mmscope.model import Model
from mmscope.probes import ProbeConfig, layer_features, layerwise
from mmscope.probes.train import edited_layerwise
from mmscope.sites import EMBEDDINGS, layer_name

OBJECT_PROMPT = "What objects are in the image?"
POOLINGS = {"entailment": ("last", "text"), "objects": ("image", "last")}


def control_types(task: str, dataset) -> list[str]:
    """The control task's input type of each example (module docstring): the statement's text for entailment,
    the image's object names (e.g. `cube,sphere`; `""` for none) for objects."""
    if task == "entailment":
        return list(dataset["statement"])
    names = dataset.features["label_ids"].feature.names
    return [",".join(names[i] for i in ids) for ids in dataset["label_ids"]]


def probe_rows(model: Model, task: str, dataset, pooling: str, config: ProbeConfig,
               interventions: Sequence[Intervention] = (), controls: bool = False,
               edits: dict[tuple[str, int], Sequence[Intervention]] | None = None, retrain: bool = False) -> list[dict]:
    """Per-layer probe scores for one task and pooling; with `controls`, also its control arms' and selectivity.
    With `edits` ((flow, centre) → the interventions of that edit), the rows gain an `edit` column ("clean" for
    the rows above) and, per edit × layer, the clean probe scored on features read under the edit (and with
    `retrain` a probe fitted on them): `edited_layerwise`'s columns, with the edit's flow and `center`."""
    images = dataset["image"]
    if task == "entailment":
        texts, labels, multilabel = list(dataset["statement"]), torch.tensor(dataset["label"]), False
    else:
        texts = [OBJECT_PROMPT] * len(dataset)
        labels, multilabel = torch.tensor(dataset["labels"]), True
    features = layer_features(model, images, texts, pooling, interventions=interventions)
    types = control_types(task, dataset) if controls else None
    base = {"task": task, "pooling": pooling, "probe": config.kind, "n": len(dataset)}
    groups = list(dataset["image_id"])
    rows = [{**base, **({"edit": "clean"} if edits else {}), **scores}
            for scores in layerwise(features, labels, multilabel, config=config, groups=groups,
                                    controls=controls, types=types, first_layer=EMBEDDINGS)]
    if edits:
        edited = {key: layer_features(model, images, texts, pooling, interventions=[*interventions, *applied],
                                      progress=False)
                  for key, applied in edits.items()}
        for scores in edited_layerwise(features, edited, labels, multilabel, config=config, groups=groups,
                                       retrain=retrain, first_layer=EMBEDDINGS):
            flow, center = scores.pop("edit")
            rows.append({**base, "edit": flow, "center": center, **scores})
    return rows


def probe_edits(options: ProbeOptions, model: Model) -> dict[tuple[str, int], tuple[Intervention, ...]]:
    """Every --flow × --center, each blocking its flow in the window around the centre (as knockout does)."""
    return {(flow, center): (Flow.parse(flow).knockout(knockout_window(center, options.window, model.n_layers)),)
            for flow in options.flows or () for center in options.centers or ()}


def probe_data(options: ProbeOptions) -> dict:
    """The probe datasets of `--data`'s split: entailment statements and object labels over `--n-images`."""
    return probe_datasets(options.data, options.split, options.n_images, options.seed)


def probe_work(model: Model, options: ProbeOptions, datasets: dict) -> Work:
    """One unit per task × pooling, over the probe datasets."""
    units = [(task, pooling) for task in datasets for pooling in POOLINGS[task]]
    config = ProbeConfig(kind=options.probe_kind, seed=options.seed)
    edits = probe_edits(options, model)
    held = [group for group in model.groups if group not in ("object", "other_patches", "random_patches")]
    for flow in options.flows or ():
        for group in flow_ends(flow):
            if group not in held:
                raise OptionError(f"unknown token group {group!r} (--flow); the probes' examples (no object boxes) "
                                  f"hold {known(held)}{suggest(group, held)}")

    def rows(index: int) -> list[dict]:
        task, pooling = units[index]
        return probe_rows(model, task, datasets[task], pooling, config, controls=options.controls, edits=edits,
                          retrain=options.retrain)

    described = f"{len(datasets['objects'])} images, {len(datasets['entailment'])} statements"
    if edits:
        described += f", {len(edits)} edits ({len(options.flows)} flows × {len(options.centers)} centres)"
    record = {"flows": options.flows, "window": options.window, "centers": options.centers,
              "example": [ko.to_dict() for ko in next(iter(edits.values()))]} if edits else {}
    return Work(len(units), rows, described, record)


def with_curves(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `curve` column naming its task and pooling, e.g. `entailment / last`."""
    return table.assign(curve=table["task"] + " / " + table["pooling"])


CONTROLS = {"control_accuracy": "control task", "shuffled_accuracy": "shuffled labels"}


def probe_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The held-out accuracy per curve and layer (`mean`), its 95% bootstrap interval over held-out images
    (`ci_low`, `ci_high`) and the examples it was measured on (`n`); with controls, also `control_accuracy`,
    `shuffled_accuracy`, `selectivity` and its interval (`selectivity_low`, `selectivity_high`)."""
    clean = table[table["edit"] == "clean"] if "edit" in table else table
    controlled = [column for column in (*CONTROLS, "selectivity", "selectivity_low", "selectivity_high")
                  if column in clean]
    renamed = with_curves(clean).rename(columns={"accuracy": "mean", "accuracy_low": "ci_low",
                                                 "accuracy_high": "ci_high"})
    summary = renamed[["curve", "layer", "mean", "ci_low", "ci_high", "n", *controlled]]
    if "edit" not in table:
        return summary
    edited = with_curves(table[table["edit"] != "clean"])
    named = edited["curve"] + " | " + edited["edit"] + " @" + edited["center"].astype(int).astype(str) + " " + edited["mode"]
    edits = edited.assign(curve=named, probed=edited["curve"], mean=edited["delta_accuracy"], ci_low=edited["delta_low"],
                          ci_high=edited["delta_high"])
    columns = ["curve", "layer", "mean", "ci_low", "ci_high", "n", "probed", "edit", "center", "mode", "accuracy",
               "clean_accuracy"]
    return pd.concat([summary.assign(edit="clean"), edits[columns]], ignore_index=True)


HELD_OUT = "examples per task, a quarter held out by image"  # what a probe's n counts (layerwise's split)


def probe_figure(summary: pd.DataFrame, path: Path, options: ProbeOptions) -> Path | list[Path]:
    """Held-out accuracy against the layer, one curve per task × pooling; with controls, each curve's control
    task (dashed) and shuffled-label baseline (dotted) beside it, and a second panel of selectivity. With edits,
    also `probe_edits.png`: Δaccuracy per edit centre × probed layer, a panel per task × pooling × flow × mode."""
    if "edit" in summary:
        edits = summary[summary["edit"] != "clean"]
        clean = summary[summary["edit"] == "clean"].dropna(axis=1, how="all").drop(columns="edit")
        drawn = probe_figure(clean, path, options)
        panels = {f"{probed} · {edit} ({mode})": part.astype({"center": int}).pivot(index="center", columns="layer",
                                                                                  values="mean")
                  for (probed, edit, mode), part in edits.groupby(["probed", "edit", "mode"], sort=True)}
        n = int(edits["n"].min())
        others = heatmaps(panels, path.with_name("probe_edits.png"), colorbar="Δ held-out accuracy (edit − clean)",
                          title=f"Probes under attention knockout, window {options.window}: what each probed "
                                f"layer still encodes (n ≥ {n} examples per task)", rows="edit centre",
                          columns="probed layer")
        return [drawn, others]
    if "selectivity" in summary:
        return curves_with_controls(summary, path, x="layer", hue="curve", controls=CONTROLS,
                                    difference="selectivity", ylabel="held-out accuracy",
                                    title="Layer-wise probes and their controls\n95% bootstrap intervals over "
                                          "held-out images", n_note=HELD_OUT)
    return curves(summary, path, x="layer", hue="curve", panel=None, ylabel="held-out accuracy",
                  title="Layer-wise probes (95% bootstrap interval over held-out images)", limits=PROBABILITY,
                  n_note=f" {HELD_OUT}")


def _by_layer(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """`column` as a layer × curve table."""
    return table.dropna(subset=[column]).pivot_table(index="layer", columns="curve", values=column)


def _printed(pivot: pd.DataFrame) -> str:
    """A layer × curve table as printed, the embeddings' row named."""
    return pivot.rename(index=layer_name).to_string(float_format="{:.3f}".format)


def _with_intervals(table: pd.DataFrame, column: str) -> str:
    """`column` and its 95% interval (`<column>_low`, `<column>_high`) as a printed layer × curve table."""
    part = table.dropna(subset=[column])
    cells = part.assign(cell=[f"{value:.3f} [{low:.2f}, {high:.2f}]" for value, low, high in
                              zip(part[column], part[f"{column}_low"], part[f"{column}_high"], strict=True)])
    return cells.pivot(index="layer", columns="curve", values="cell").rename(index=layer_name).to_string()


def best_layer_lines(table: pd.DataFrame) -> list[str]:
    """Per curve, the best layer only where it beats its control beyond the 95% intervals: the largest
    selectivity among layers whose selectivity interval lies above 0 (with a control task), or the largest
    accuracy among layers whose interval lies above the shuffled-label baseline's (without one); without
    controls, the largest accuracy, said to be unchecked. Otherwise, plainly, that no layer does."""
    lines = []
    for curve, part in table.groupby("curve", sort=True):
        part = part.set_index("layer")
        if "selectivity" in part and part["selectivity"].notna().all():
            beating, by, note = part[part["selectivity_low"] > 0], "selectivity", "its control task"
        elif "shuffled_accuracy" in part:
            beating, by = part[part["accuracy_low"] > part["shuffled_accuracy_high"]], "accuracy"
            note = "the shuffled-label baseline"
        else:
            beating, by, note = part, "accuracy", None
        if beating.empty:
            lines.append(f"  {curve}: no layer beats {note} beyond the 95% intervals")
            continue
        layer = beating[by].idxmax()
        row = beating.loc[layer]
        scores = ("selectivity", "accuracy") if by == "selectivity" else ("accuracy",)
        said = ", ".join(f"{name} {row[name]:.3f} [{row[name + '_low']:.2f}, {row[name + '_high']:.2f}]"
                         for name in scores)
        why = ("" if by == "selectivity" else ", above the shuffled-label baseline's interval" if note else
               " (no control was run to test it against: --controls)")
        lines.append(f"  {curve} → {layer_name(layer)}: {said}{why}")
    return lines


def probe_findings(table: pd.DataFrame, summary: pd.DataFrame, options: ProbeOptions) -> list[str]:
    """Accuracy per layer of each curve with its 95% interval, and the object probes' micro-F1; with controls,
    the selectivity (with its interval) and the shuffled-label baseline per layer; the best layer of each curve,
    named only where it beats its control beyond the intervals (`best_layer_lines`); with edits,
    `edit_findings`."""
    edits = table[table["edit"] != "clean"] if "edit" in table else None
    if edits is not None:
        table = table[table["edit"] == "clean"].dropna(axis=1, how="all")
    table = with_curves(table)
    lines = ["Held-out probe accuracy by layer [95% bootstrap interval over held-out images] (embeddings, then "
             "after each decoder layer 0 … L−1):", _with_intervals(table, "accuracy")]
    if "f1" in table:
        lines += ["", "object recognition micro-F1:", _printed(_by_layer(table, "f1"))]
    if "selectivity" in table:
        lines += ["", "Selectivity (accuracy − control-task accuracy) by layer [95% interval]:",
                  _with_intervals(table, "selectivity")]
    if "shuffled_accuracy" in table:
        lines += ["", "shuffled-label baseline (the same probe on permuted labels) by layer:",
                  _printed(_by_layer(table, "shuffled_accuracy"))]
    lines += ["", "best layer (where it beats its control beyond the 95% intervals):", *best_layer_lines(table)]
    return lines + edit_findings(with_curves(edits), options.window) if edits is not None else lines


def edit_findings(edits: pd.DataFrame, window: int) -> list[str]:
    """Per probed curve × flow × mode, the largest drop of held-out accuracy an edit causes (centre, layer, its
    interval), and whether the layers below each window kept the clean scores exactly (transfer: they must)."""
    lines = ["", "Δ held-out accuracy under each edit (edit − clean; transfer: the clean probe on edited features, "
                 "retrained: a probe fitted on them) — the largest drop:"]
    for (curve, flow, mode), part in edits.groupby(["curve", "edit", "mode"], sort=True):
        worst = part.loc[part["delta_accuracy"].idxmin()]
        if worst["delta_accuracy"] >= 0:
            lines.append(f"  {curve} · {flow} ({mode}): no drop at any centre or probed layer (largest change "
                         f"{part['delta_accuracy'].abs().max():+.3f})")
            continue
        lines.append(f"  {curve} · {flow} ({mode}): {worst['delta_accuracy']:+.3f} [{worst['delta_low']:+.2f}, "
                     f"{worst['delta_high']:+.2f}] at centre {int(worst['center'])}, probed layer "
                     f"{layer_name(int(worst['layer']))} (clean {worst['clean_accuracy']:.3f})")
    transfer = edits[edits["mode"] == "transfer"]
    below = transfer[transfer["layer"] < (transfer["center"] - window // 2).clip(lower=0)]
    unchanged = int((below["delta_accuracy"] == 0).sum())
    lines.append(f"layers below each window (the edit cannot reach them): {unchanged} of {len(below)} transfer "
                 "scores equal the clean ones exactly")
    return lines


PROBE = Experiment(
    command=declarations.PROBE,
    data=probe_data,
    work=probe_work,
    value="accuracy",
    by=("curve", "layer"),
    figure=probe_figure,
    findings=probe_findings,
    desc="probes",
    summarize=probe_summary,
)

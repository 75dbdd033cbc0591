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
already one score per layer, so its summary relabels them, with each score's 95% bootstrap interval over the
held-out images (`mmscope.probes.train`).

Under edits (`--flow` knockouts in a window around each `--center`, `--truncate` exits after it) every probe
fitted on clean features is also scored on the features read under each edit (transfer) and, with
`--retrain`, refitted on them; the rows gain the edit, its centre, its first layer and Δaccuracy. The edited
features come from the sweep engine (`variant_features`): one clean pass per example, the edits as rows of
batched suffix passes, every depth below an edit's first layer the clean pass's own value — so the transfer
score of a layer no edit reaches equals the clean one exactly.

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmscope.errors import InputError, known, suggest
from mmscope.experiments import declarations
from mmscope.experiments.declarations import ProbeOptions, flow_ends  # declared without torch
from mmscope.experiments.engine import Variant, variant_features
from mmscope.experiments.figures import PROBABILITY, curves, curves_with_controls, heatmaps
from mmscope.experiments.options import OptionError
from mmscope.experiments.runner import Experiment, Finished, Work
from mmscope.experiments.scores import Flow
from mmscope.experiments.workspace import probe_datasets
from mmscope.interventions import Intervention, Truncate, knockout_window
from mmscope.layout import OPTIONAL_GROUPS
from mmscope.model import Model, check_interventions
from mmscope.probes import POOLINGS as FEATURE_POOLINGS
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


def probe_inputs(task: str, dataset) -> tuple[list, list[str], torch.Tensor, bool]:
    """A task's images, texts, labels and whether they are multi-hot: the statements and their truth for
    entailment, one fixed prompt and each image's object set for objects."""
    if task == "entailment":
        return dataset["image"], list(dataset["statement"]), torch.tensor(dataset["label"]), False
    return dataset["image"], [OBJECT_PROMPT] * len(dataset), torch.tensor(dataset["labels"]), True


Edits = dict[tuple[str, int], Sequence[Intervention]]  # (edit name, centre) → the interventions of that edit


@dataclass
class TaskFeatures:
    """One task's features per pooling, `[N, L + 1, D]`: `clean`, and under each edit (`edited[key][pooling]`)."""

    clean: dict[str, torch.Tensor]
    edited: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)


def task_features(model: Model, task: str, dataset, poolings: Sequence[str], interventions: Sequence[Intervention] = (),
                  edits: Edits | None = None, engine: str = "prefix", progress: bool = True) -> TaskFeatures:
    """The features of every pooling of `task`. Without `edits`, read in padded batches (`layer_features`). With
    them, through the sweep engine, one example at a time: each example's clean pass, and every edit a variant
    of it (`variant_features`), so a layer below an edit's first one is the clean pass's own value; under
    `interventions` too, each edit adds its own to them and "clean" is a variant of its own."""
    images, texts, _, _ = probe_inputs(task, dataset)
    if not edits:
        return TaskFeatures({pooling: layer_features(model, images, texts, pooling, interventions=interventions,
                                                     progress=progress) for pooling in poolings})
    unknown = [pooling for pooling in poolings if pooling not in FEATURE_POOLINGS]
    if unknown:
        raise InputError(f"unknown pooling(s) {unknown}; known: {known(FEATURE_POOLINGS)}")
    check_interventions(interventions)
    variants = [Variant(key, (*interventions, *applied)) for key, applied in edits.items()]
    if interventions:
        variants.insert(0, Variant(("clean", -1), tuple(interventions)))
    groups = {pooling: FEATURE_POOLINGS[pooling] for pooling in poolings}
    clean: dict[str, list] = {pooling: [] for pooling in poolings}
    edited: dict[tuple, dict[str, list]] = {key: {pooling: [] for pooling in poolings} for key in edits}
    for image, text in tqdm(zip(images, texts, strict=True), total=len(texts), desc=f"{task} features",
                            unit="example", disable=not progress):
        example = model.prepare(image.convert("RGB"), text)
        ran, under = variant_features(model, example, variants, sorted(set(groups.values())), engine=engine)
        for pooling, group in groups.items():
            clean[pooling].append(under[group][0] if interventions else ran[group])
            for row, key in enumerate(edits, start=1 if interventions else 0):
                edited[key][pooling].append(under[group][row])
    return TaskFeatures({pooling: torch.stack(rows).cpu() for pooling, rows in clean.items()},
                        {key: {pooling: torch.stack(rows).cpu() for pooling, rows in by.items()}
                         for key, by in edited.items()})


def probe_rows(model: Model, task: str, dataset, pooling: str, config: ProbeConfig,
               interventions: Sequence[Intervention] = (), controls: bool = False, edits: Edits | None = None,
               retrain: bool = False, engine: str = "prefix", features: TaskFeatures | None = None) -> list[dict]:
    """Per-layer probe scores for one task and pooling; with `controls`, also its control arms' and selectivity.
    With `edits` ((edit name, centre) → the interventions of that edit), the rows gain an `edit` column ("clean"
    for the rows above) and, per edit × layer, the clean probe scored on features read under the edit (and with
    `retrain` a probe fitted on them): `edited_layerwise`'s columns, with the edit's name, `center` and
    `edited_from` (its first layer: every probed layer below it reads the clean features). `features`: the
    task's, when already read (`task_features`)."""
    _, _, labels, multilabel = probe_inputs(task, dataset)
    features = features or task_features(model, task, dataset, [pooling], interventions, edits, engine)
    clean = features.clean[pooling]
    types = control_types(task, dataset) if controls else None
    base = {"task": task, "pooling": pooling, "probe": config.kind, "n": len(dataset)}
    groups = list(dataset["image_id"])
    rows = [{**base, **({"edit": "clean"} if edits else {}), **scores}
            for scores in layerwise(clean, labels, multilabel, config=config, groups=groups,
                                    controls=controls, types=types, first_layer=EMBEDDINGS)]
    if edits:
        edited = {key: by[pooling] for key, by in features.edited.items()}
        for scores in edited_layerwise(clean, edited, labels, multilabel, config=config, groups=groups,
                                       retrain=retrain, first_layer=EMBEDDINGS):
            key = scores.pop("edit")
            reach = min((intervention.first_layer() for intervention in edits[key]), default=model.n_layers)
            rows.append({**base, "edit": key[0], "center": key[1], "edited_from": reach, **scores})
    return rows


def probe_edits(options: ProbeOptions, model: Model) -> Edits:
    """Every --flow × --center, each blocking its flow in the window around the centre (as knockout does), and
    with --truncate, an exit after each centre layer (as truncate does)."""
    edits: Edits = {(flow, center): (Flow.parse(flow).knockout(knockout_window(center, options.window,
                                                                               model.n_layers)),)
                    for flow in options.flows or () for center in options.centers or ()}
    if options.truncate:
        edits |= {("truncate", center): (Truncate(center),) for center in options.centers}
    return edits


def probe_data(options: ProbeOptions) -> dict:
    """The probe datasets of `--data`'s split: entailment statements and object labels over `--n-images`."""
    return probe_datasets(options.data, options.split, options.n_images, options.seed)


def probe_work(model: Model, options: ProbeOptions, datasets: dict) -> Work:
    """One unit per task × pooling, over the probe datasets."""
    units = [(task, pooling) for task in datasets for pooling in POOLINGS[task]]
    config = ProbeConfig(kind=options.probe_kind, seed=options.seed)
    edits = probe_edits(options, model)
    held = [group for group in model.groups if group not in OPTIONAL_GROUPS]
    for flow in options.flows or ():
        for group in flow_ends(flow):
            if group not in held:
                raise OptionError(f"unknown token group {group!r} (--flow); the probes' examples (no object boxes or "
                                  f"names) hold {known(held)}{suggest(group, held)}")

    features: dict[str, TaskFeatures] = {}  # per task: every pooling's features, read once

    def rows(index: int) -> list[dict]:
        task, pooling = units[index]
        if task not in features:
            features.clear()  # one task's at a time
            features[task] = task_features(model, task, datasets[task], POOLINGS[task], edits=edits,
                                           engine=options.engine)
        return probe_rows(model, task, datasets[task], pooling, config, controls=options.controls, edits=edits,
                          retrain=options.retrain, features=features[task])

    described = f"{len(datasets['objects'])} images, {len(datasets['entailment'])} statements"
    record = {}
    if edits:
        kinds = [*(options.flows or ()), *(["truncate"] if options.truncate else [])]
        described += f", {len(edits)} edits ({', '.join(kinds)} at {len(options.centers)} centres each)"
        record = {"flows": options.flows, "truncate": options.truncate, "window": options.window,
                  "centers": options.centers, "example": [edit.to_dict() for edit in next(iter(edits.values()))]}
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


def probe_figure(run: Finished[ProbeOptions], path: Path) -> Path | list[Path]:
    """Held-out accuracy against the layer, one curve per task × pooling; with controls, each curve's control
    task (dashed) and shuffled-label baseline (dotted) beside it, and a second panel of selectivity. With edits,
    also `probe_edits.png`: Δaccuracy per edit centre × probed layer, a panel per task × pooling × flow × mode."""
    summary, options = run.summary, run.options
    if "edit" in summary:
        edits = summary[summary["edit"] != "clean"]
        clean = summary[summary["edit"] == "clean"].dropna(axis=1, how="all").drop(columns="edit")
        drawn = probe_figure(dataclasses.replace(run, summary=clean), path)
        panels = {f"{probed} · {edit} ({mode})": part.astype({"center": int}).pivot(index="center", columns="layer",
                                                                                  values="mean")
                  for (probed, edit, mode), part in edits.groupby(["probed", "edit", "mode"], sort=True)}
        n = int(edits["n"].min())
        others = heatmaps(panels, path.with_name("probe_edits.png"), colorbar="Δ held-out accuracy (edit − clean)",
                          title=f"Probes under {edits_named(options)}: what each probed layer still encodes "
                                f"(n ≥ {n} examples per task)", rows="edit centre",
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


def edits_named(options: ProbeOptions) -> str:
    """The run's edits in words, e.g. `attention knockout (window 2) and truncation`."""
    named = [f"attention knockout (window {options.window})"] if options.flows else []
    return " and ".join(named + (["truncation (exit after the centre layer)"] if options.truncate else []))


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
    return lines + edit_findings(with_curves(edits)) if edits is not None else lines


def edit_findings(edits: pd.DataFrame) -> list[str]:
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
    below = transfer[transfer["layer"] < transfer["edited_from"]]
    unchanged = int((below["delta_accuracy"] == 0).sum())
    lines.append(f"layers below each edit's first layer (it cannot reach them): {unchanged} of {len(below)} "
                 "transfer scores equal the clean ones exactly")
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

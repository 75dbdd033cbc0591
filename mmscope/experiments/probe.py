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

from mmscope.experiments import declarations
from mmscope.experiments.declarations import ProbeOptions  # declared without torch; kept importable from here
from mmscope.experiments.figures import PROBABILITY, curves, curves_with_controls
from mmscope.experiments.runner import Experiment, Work
from mmscope.experiments.workspace import probe_datasets
from mmscope.interventions import Intervention
from mmscope.model import Model
from mmscope.probes import ProbeConfig, layer_features, layerwise
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
               interventions: Sequence[Intervention] = (), controls: bool = False) -> list[dict]:
    """Per-layer probe scores for one task and pooling; with `controls`, also its control arms' and selectivity."""
    images = dataset["image"]
    if task == "entailment":
        texts, labels, multilabel = list(dataset["statement"]), torch.tensor(dataset["label"]), False
    else:
        texts = [OBJECT_PROMPT] * len(dataset)
        labels, multilabel = torch.tensor(dataset["labels"]), True
    features = layer_features(model, images, texts, pooling, interventions=interventions)
    types = control_types(task, dataset) if controls else None
    return [
        {"task": task, "pooling": pooling, "probe": config.kind, "n": len(dataset), **scores}
        for scores in layerwise(features, labels, multilabel, config=config, groups=list(dataset["image_id"]),
                                controls=controls, types=types, first_layer=EMBEDDINGS)
    ]


def probe_data(options: ProbeOptions) -> dict:
    """The probe datasets of `--data`'s split: entailment statements and object labels over `--n-images`."""
    return probe_datasets(options.data, options.split, options.n_images, options.seed)


def probe_work(model: Model, options: ProbeOptions, datasets: dict) -> Work:
    """One unit per task × pooling, over the probe datasets."""
    units = [(task, pooling) for task in datasets for pooling in POOLINGS[task]]
    config = ProbeConfig(kind=options.probe_kind, seed=options.seed)

    def rows(index: int) -> list[dict]:
        task, pooling = units[index]
        return probe_rows(model, task, datasets[task], pooling, config, controls=options.controls)

    described = f"{len(datasets['objects'])} images, {len(datasets['entailment'])} statements"
    return Work(len(units), rows, described)


def with_curves(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `curve` column naming its task and pooling, e.g. `entailment / last`."""
    return table.assign(curve=table["task"] + " / " + table["pooling"])


CONTROLS = {"control_accuracy": "control task", "shuffled_accuracy": "shuffled labels"}


def probe_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The held-out accuracy per curve and layer (`mean`) and the examples it was measured on (`n`); with
    controls, also `control_accuracy`, `shuffled_accuracy` and `selectivity`."""
    controlled = [column for column in (*CONTROLS, "selectivity") if column in table]
    return with_curves(table).rename(columns={"accuracy": "mean"})[["curve", "layer", "mean", "n", *controlled]]


HELD_OUT = "examples per task, a quarter held out by image"  # what a probe's n counts (layerwise's split)


def probe_figure(summary: pd.DataFrame, path: Path, options: ProbeOptions) -> Path:
    """Held-out accuracy against the layer, one curve per task × pooling; with controls, each curve's control
    task (dashed) and shuffled-label baseline (dotted) beside it, and a second panel of selectivity."""
    if "selectivity" in summary:
        return curves_with_controls(summary, path, x="layer", hue="curve", controls=CONTROLS,
                                    difference="selectivity", ylabel="held-out accuracy",
                                    title="Layer-wise probes and their controls", n_note=HELD_OUT)
    bandless = summary.assign(ci_low=summary["mean"], ci_high=summary["mean"])
    return curves(bandless, path, x="layer", hue="curve", panel=None, ylabel="held-out accuracy",
                  title="Layer-wise probes", limits=PROBABILITY, n_note=f" {HELD_OUT}")


def _by_layer(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """`column` as a layer × curve table."""
    return table.dropna(subset=[column]).pivot_table(index="layer", columns="curve", values=column)


def _printed(pivot: pd.DataFrame) -> str:
    """A layer × curve table as printed, the embeddings' row named."""
    return pivot.rename(index=layer_name).to_string(float_format="{:.3f}".format)


def _best_layers(pivot: pd.DataFrame) -> str:
    return ", ".join(f"{curve} → {layer_name(pivot[curve].idxmax())}" for curve in pivot.columns)


def probe_findings(table: pd.DataFrame, summary: pd.DataFrame, options: ProbeOptions) -> list[str]:
    """Accuracy per layer of each curve, the best layer of each, and the object probes' micro-F1; with controls,
    the selectivity and the shuffled-label baseline per layer, and the best layer by selectivity."""
    table = with_curves(table)
    pivot = _by_layer(table, "accuracy")
    lines = ["Held-out probe accuracy by layer (embeddings, then after each decoder layer 0 … L−1):", _printed(pivot),
             "", "best layer: " + _best_layers(pivot)]
    if "f1" in table:
        lines += ["", "object recognition micro-F1:", _printed(_by_layer(table, "f1"))]
    if "selectivity" in table:
        selectivity = _by_layer(table, "selectivity")
        lines += ["", "Selectivity (accuracy − control-task accuracy) by layer:", _printed(selectivity), "",
                  "best layer by selectivity: " + _best_layers(selectivity)]
    if "shuffled_accuracy" in table:
        lines += ["", "shuffled-label baseline (the same probe on permuted labels) by layer:",
                  _printed(_by_layer(table, "shuffled_accuracy"))]
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

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from mmscope.experiments.figures import curves
from mmscope.experiments.options import (
    check_at_least,
    check_choice,
    data_option,
    model_option,
    option,
    out_option,
    seed_option,
    split_option,
    wandb_option,
)
from mmscope.experiments.runner import Experiment, Work
from mmscope.experiments.workspace import probe_datasets
from mmscope.interventions import Intervention
from mmscope.model import Model
from mmscope.probes import ProbeConfig, layer_features, layerwise

OBJECT_PROMPT = "What objects are in the image?"
POOLINGS = {"entailment": ("last", "text"), "objects": ("image", "last")}
PROBE_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class ProbeOptions:
    """`mmscope probe`: the model, the scene graphs' split, how many images, which probe, and the run folder."""

    model: str = model_option()
    data: Path | None = data_option()
    split: str = split_option()
    n_images: int = option(300, "Images (scenes) to build the probe datasets from.")
    probe_kind: str = option("linear", "linear or mlp.", flag="--probe")
    out: Path | None = out_option()
    wandb: bool = wandb_option()
    seed: int = seed_option()

    def __post_init__(self) -> None:
        check_choice("probe", self.probe_kind, PROBE_KINDS)
        check_at_least("n_images", self.n_images, 1)


def probe_rows(model: Model, task: str, dataset, pooling: str, config: ProbeConfig,
               interventions: Sequence[Intervention] = ()) -> list[dict]:
    """Per-layer probe scores for one task and pooling."""
    images = dataset["image"]
    if task == "entailment":
        texts, labels, multilabel = list(dataset["statement"]), torch.tensor(dataset["label"]), False
    else:
        texts = [OBJECT_PROMPT] * len(dataset)
        labels, multilabel = torch.tensor(dataset["labels"]), True
    features = layer_features(model, images, texts, pooling, interventions=interventions)
    return [
        {"task": task, "pooling": pooling, "probe": config.kind, "n": len(dataset), **scores}
        for scores in layerwise(features, labels, multilabel, config=config, groups=list(dataset["image_id"]))
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
        return probe_rows(model, task, datasets[task], pooling, config)

    described = f"{len(datasets['objects'])} images, {len(datasets['entailment'])} statements"
    return Work(len(units), rows, described)


def with_curves(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `curve` column naming its task and pooling, e.g. `entailment / last`."""
    return table.assign(curve=table["task"] + " / " + table["pooling"])


def probe_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The held-out accuracy per curve and layer (`mean`) and the examples it was measured on (`n`)."""
    return with_curves(table).rename(columns={"accuracy": "mean"})[["curve", "layer", "mean", "n"]]


def probe_figure(summary: pd.DataFrame, path: Path, options: ProbeOptions) -> Path:
    """Held-out accuracy against the layer, one curve per task × pooling."""
    bandless = summary.assign(ci_low=summary["mean"], ci_high=summary["mean"])
    return curves(bandless, path, x="layer", hue="curve", panel=None, ylabel="held-out accuracy",
                  title="Layer-wise probes")


def probe_findings(table: pd.DataFrame, summary: pd.DataFrame, options: ProbeOptions) -> list[str]:
    """Accuracy per layer of each curve, the best layer of each, and the object probes' micro-F1."""
    table = with_curves(table)
    pivot = table.pivot_table(index="layer", columns="curve", values="accuracy")
    best = {curve: int(pivot[curve].idxmax()) for curve in pivot.columns}
    lines = ["Held-out probe accuracy by layer (layer 0 = embeddings):",
             pivot.to_string(float_format=lambda v: f"{v:.3f}"), "",
             "best layer: " + ", ".join(f"{curve} → {layer}" for curve, layer in best.items())]
    if "f1" in table:
        f1 = table.dropna(subset=["f1"]).pivot_table(index="layer", columns="curve", values="f1")
        lines += ["", "object recognition micro-F1:", f1.to_string(float_format=lambda v: f"{v:.3f}")]
    return lines


PROBE = Experiment(
    name="probe",
    help="Layer-wise probes: image–text entailment (global) vs object recognition (local).",
    options=ProbeOptions,
    data=probe_data,
    work=probe_work,
    value="accuracy",
    by=("curve", "layer"),
    figure=probe_figure,
    findings=probe_findings,
    desc="probes",
    summarize=probe_summary,
)

"""Probe sweep: which layers linearly encode global (image–text entailment) vs local (object) information?

Following Tao et al. (2024), "Probing Multimodal Large Language Models for Global and Local Semantic
Representations": for every layer, a linear probe (or small MLP) is trained on frozen, pooled hidden states —
  * entailment: (image, statement) → does the image entail the statement? (true captions vs hard negatives
    with one attribute, object or relation swapped); features pooled at the last token by default;
  * objects: image → which object categories are present (multi-hot); features pooled over image tokens.
The study found intermediate layers best for entailment, while object information peaks earlier.

Probes may be trained on features read under an intervention (`interventions=`), e.g. after an image→question
knockout, to see how the edit changes what each layer encodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmscope.experiments.runs import RunDir
from mmscope.interventions import Intervention
from mmscope.model import Model
from mmscope.probes import ProbeConfig, layer_features, layerwise

OBJECT_PROMPT = "What objects are in the image?"
TASKS = ("entailment", "objects")


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


def run_probe(model: Model, datasets: dict, run: RunDir, poolings: dict[str, Sequence[str]],
              config: ProbeConfig = ProbeConfig(), interventions: Sequence[Intervention] = ()) -> dict[str, int]:
    """Train probes for each task in `datasets` and each of its poolings; resumable per (task, pooling)."""
    units = [(task, pooling) for task in datasets for pooling in poolings[task]]
    for index, (task, pooling) in enumerate(units):
        if not run.done(index):
            run.write_part(index, probe_rows(model, task, datasets[task], pooling, config, interventions))
    return run.counts()

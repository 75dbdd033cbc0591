"""Train one simple probe per layer on frozen features, and score it on held-out examples.

A probe is a linear map (or a one-hidden-layer MLP) trained with AdamW on standardised features — full batch,
a fixed number of epochs, weight decay as the only regulariser. Single-label tasks (image–text entailment) use
cross-entropy and report accuracy; multi-label tasks (object recognition, multi-hot targets) use a
per-label binary cross-entropy and report exact-match accuracy and micro-F1.

Reading the result: a probe measures what is *linearly decodable* from a layer, not what the model uses.
Compare layers against each other and against a baseline (the embeddings), not in absolute terms.

Controls (`layerwise(..., controls=True)`) say how much of an accuracy the probe's own capacity would reach
without the information asked about. Each trains the very same probe (config, seed, features, split) on other
labels, through the same `fit_probe`:
  * the *shuffled-label baseline* (`shuffled_labels`): the labels permuted at random within each side of the
    split (whole rows for multi-hot labels), so every label keeps its frequency on both sides while the link
    between an input and its label is broken; it scores about what the majority class (the most common label
    set) scores;
  * the *control task* (Hewitt & Liang, 2019, "Designing and Interpreting Probes with Control Tasks";
    `control_labels`): every input *type* gets one label drawn at random from the task's label distribution,
    the same for all its occurrences. The labels can be learnt only by memorising which type is which, so its
    accuracy is what the probe's capacity and the features' encoding of the type give with no task knowledge.
    **Selectivity** = accuracy − control-task accuracy: a high accuracy of low selectivity says more about
    the probe than about the layer. Hewitt & Liang's types are words; what a type is here is the caller's
    choice (`types`), one that recurs across the image-grouped split (see `mmscope.experiments.probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProbeConfig:
    kind: str = "linear"  # or "mlp"
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    hidden: int = 64
    seed: int = 0


def _probe(dim: int, outputs: int, config: ProbeConfig) -> torch.nn.Module:
    if config.kind == "linear":
        return torch.nn.Linear(dim, outputs)
    if config.kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(dim, config.hidden), torch.nn.GELU(),
                                   torch.nn.Linear(config.hidden, outputs))
    raise ValueError(f"unknown probe kind {config.kind!r}; known: linear, mlp")


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              multilabel: bool, config: ProbeConfig = ProbeConfig()) -> dict[str, float]:
    """Train on `train_x [N, D]` → `train_y` (`[N]` classes, or `[N, C]` multi-hot) and score on the test set."""
    torch.manual_seed(config.seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    outputs = train_y.shape[1] if multilabel else int(max(train_y.max(), test_y.max())) + 1
    probe = _probe(train_x.shape[1], outputs, config)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()
    target = train_y.float() if multilabel else train_y.long()
    for _ in range(config.epochs):
        optimizer.zero_grad()
        loss_fn(probe(train_x), target).backward()
        optimizer.step()
    with torch.no_grad():
        logits = probe(test_x)
    if not multilabel:
        return {"accuracy": (logits.argmax(-1) == test_y).float().mean().item()}
    predicted, truth = logits > 0, test_y.bool()
    true_positive = (predicted & truth).sum().item()
    precision_denominator, recall_denominator = predicted.sum().item(), truth.sum().item()
    f1 = 2 * true_positive / max(1, precision_denominator + recall_denominator)
    return {"accuracy": (predicted == truth).all(-1).float().mean().item(), "f1": f1}


def split(groups: Sequence[str], test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) example indices: a seeded draw of `test_fraction` of the distinct `groups` is held out whole."""
    generator = torch.Generator().manual_seed(seed)
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=generator).tolist()
    held_out = {names[i] for i in order[: max(1, int(len(names) * test_fraction))]}
    test = torch.tensor([i for i, g in enumerate(groups) if g in held_out])
    train = torch.tensor([i for i, g in enumerate(groups) if g not in held_out])
    return train, test


def shuffled_labels(labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`labels` (`[N]`, or `[N, C]` multi-hot: whole rows move) permuted within `train`, then within `test`, by
    `torch.randperm` on one generator seeded with `seed`: each side keeps its labels' frequencies exactly."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = labels.clone()
    for side in (train, test):
        shuffled[side] = labels[side[torch.randperm(len(side), generator=generator)]]
    return shuffled


def control_labels(labels: torch.Tensor, types: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each distinct type of `types` (one per example), in sorted order, takes
    the label (`[N]`) or label row (`[N, C]`) of an example drawn uniformly — i.e. a draw from the task's label
    distribution — by `torch.randint(N, (n_types,))` on a generator seeded with `seed`; every occurrence of
    the type carries it."""
    if len(types) != len(labels):
        raise ValueError(f"need one type per example: {len(types)} types for {len(labels)} labels")
    generator = torch.Generator().manual_seed(seed)
    names = sorted(set(types))
    drawn = torch.randint(len(labels), (len(names),), generator=generator)
    index = {name: i for i, name in enumerate(names)}
    return labels[drawn[torch.tensor([index[t] for t in types])]]


def layerwise(features: torch.Tensor, labels: torch.Tensor, multilabel: bool, test_fraction: float = 0.25,
              config: ProbeConfig = ProbeConfig(), groups: Sequence[str] | None = None, *, controls: bool = False,
              types: Sequence[str] | None = None, first_layer: int = 0) -> list[dict[str, float]]:
    """One probe per layer of `features [N, L, D]`; a seeded split holds out `test_fraction` of the examples.
    Rows are numbered from `first_layer` (−1 when the first features are the embeddings, `mmscope.sites`).

    With `groups` (e.g. image ids) whole groups are held out, so that a true statement and its hard negative
    about the same image never sit on both sides of the split (a probe could otherwise learn the pair).

    With `controls`, each layer's row also holds the same probe's scores on the shuffled-label baseline
    (`shuffled_accuracy`, and `shuffled_f1` for multi-hot labels) and, where the task has input `types` (one
    per example; None: it has no meaningful control task), on the control task (`control_accuracy`,
    `control_f1`) and `selectivity` = accuracy − control_accuracy. Both are seeded with `config.seed`.
    """
    if types is not None and not controls:
        raise ValueError("types name the control task's inputs: pass controls=True with them")
    groups = groups if groups is not None else [str(i) for i in range(len(features))]
    train, test = split(groups, test_fraction, config.seed)
    arms = {"": labels}
    if controls:
        arms["shuffled_"] = shuffled_labels(labels, train, test, config.seed)
        if types is not None:
            arms["control_"] = control_labels(labels, types, config.seed)
    rows = []
    for layer in range(features.shape[1]):
        row: dict[str, float] = {"layer": first_layer + layer}
        for prefix, target in arms.items():
            scores = fit_probe(features[train, layer], target[train], features[test, layer], target[test],
                               multilabel, config)
            row |= {prefix + name: value for name, value in scores.items()}
        if "control_accuracy" in row:
            row["selectivity"] = row["accuracy"] - row["control_accuracy"]
        rows.append(row)
    return rows

"""Train one simple probe per layer on frozen features, and score it on held-out examples.

A probe is a linear map (or a one-hidden-layer MLP) trained with AdamW on standardised features — full batch,
a fixed number of epochs, weight decay as the only regulariser. Single-label tasks (image–text entailment) use
cross-entropy and report accuracy; multi-label tasks (object recognition, multi-hot targets) use a
per-label binary cross-entropy and report exact-match accuracy and micro-F1.

Reading the result: a probe measures what is *linearly decodable* from a layer, not what the model uses.
Compare layers against each other and against a baseline (layer 0, the embeddings), not in absolute terms.
"""

from __future__ import annotations

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


def layerwise(features: torch.Tensor, labels: torch.Tensor, multilabel: bool, test_fraction: float = 0.25,
              config: ProbeConfig = ProbeConfig(), groups: list[str] | None = None) -> list[dict[str, float]]:
    """One probe per layer of `features [N, L, D]`; a seeded split holds out `test_fraction` of the examples.

    With `groups` (e.g. image ids) whole groups are held out, so that a true statement and its hard negative
    about the same image never sit on both sides of the split (a probe could otherwise learn the pair).
    """
    generator = torch.Generator().manual_seed(config.seed)
    groups = groups if groups is not None else [str(i) for i in range(len(features))]
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=generator).tolist()
    held_out = {names[i] for i in order[: max(1, int(len(names) * test_fraction))]}
    test = torch.tensor([i for i, g in enumerate(groups) if g in held_out])
    train = torch.tensor([i for i, g in enumerate(groups) if g not in held_out])
    return [
        {"layer": layer, **fit_probe(features[train, layer], labels[train], features[test, layer], labels[test],
                                     multilabel, config)}
        for layer in range(features.shape[1])
    ]

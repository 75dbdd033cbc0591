"""Train one simple probe per layer on frozen features, to convergence, and score it on held-out examples.

A probe is scikit-learn's, in a `Pipeline` after a `StandardScaler`:
  * `linear` (the default): `LogisticRegressionCV` — multinomial for single-label tasks (image–text entailment),
    one-vs-rest for multi-hot ones (object recognition) — solved to convergence (lbfgs), its L2 strength C
    chosen among `ProbeConfig.Cs` values by cross-validation *within the training side* of the split, on folds
    of whole groups (images: `GroupKFold`), so no image's statements sit on both sides of a fold;
  * `mlp`: `MLPClassifier` with one hidden layer and early stopping on a seeded validation slice of the
    training side.
Single-label tasks report accuracy; multi-label tasks exact-match accuracy (every label right) and micro-F1.

Reading the result: a probe measures what is *linearly decodable* from a layer, not what the model uses.
Compare layers against each other and against a baseline (the embeddings), not in absolute terms; each score
carries a 95% bootstrap interval over the held-out *images* (`layerwise`).

Controls (`layerwise(..., controls=True)`) say how much of an accuracy the probe's own capacity would reach
without the information asked about. Each trains the very same probe (config, seed, features, split, folds) on
other labels, through the same `probe_predictions`:
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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmscope.errors import MMScopeError, known, suggest

PROBE_KINDS = ("linear", "mlp")
BOOTSTRAP_SAMPLES = 1000


class ProbeError(MMScopeError, ValueError):
    """A probe configuration or probe input that cannot be used (an unknown kind, types that do not fit the labels)."""


@dataclass(frozen=True)
class ProbeConfig:
    """Which probe, and how it is fitted: the inverse L2 strengths `Cs` tried by `folds`-fold group
    cross-validation within the training side (linear); `hidden` units, early stopping (mlp); `seed` for the
    split, the controls and the MLP."""

    kind: str = "linear"
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    folds: int = 3
    max_iter: int = 1000
    hidden: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ProbeError(f"unknown probe kind {self.kind!r}; known: {known(PROBE_KINDS)}"
                             f"{suggest(self.kind, PROBE_KINDS)}")


def make_probe(config: ProbeConfig, multilabel: bool, folds):
    """The unfitted scikit-learn probe (a pipeline: standardisation, then the classifier); `folds` are the
    (train, validation) index pairs its cross-validation uses."""
    if config.kind == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=(config.hidden,), early_stopping=True, validation_fraction=0.15, max_iter=500,
            n_iter_no_change=20, random_state=config.seed))
    linear = LogisticRegressionCV(Cs=list(config.Cs), cv=folds, max_iter=config.max_iter, scoring="accuracy")
    return make_pipeline(StandardScaler(), OneVsRestClassifier(linear) if multilabel else linear)


def group_folds(groups: Sequence[str], folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` (train, validation) splits of whole groups (at most one fold per group; at least 2)."""
    count = max(2, min(folds, len(set(groups))))
    return list(GroupKFold(n_splits=count).split(np.zeros(len(groups)), groups=list(groups)))


def probe_predictions(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, multilabel: bool,
                      config: ProbeConfig = ProbeConfig(), groups: Sequence[str] | None = None) -> np.ndarray:
    """Fit a probe on `train_x [N, D]` → `train_y` (`[N]` classes, or `[N, C]` multi-hot) and predict the test
    examples (`[M]` or `[M, C]`); `groups` (one per training example, e.g. image ids) keep the cross-validation
    folds whole (default: every example its own group)."""
    return fitted_probe(train_x, train_y, multilabel, config, groups)(test_x)


def fitted_probe(train_x: torch.Tensor, train_y: torch.Tensor, multilabel: bool, config: ProbeConfig = ProbeConfig(),
                 groups: Sequence[str] | None = None):
    """A probe fitted as `probe_predictions` fits it: a function from features `[M, D]` to predictions, to score
    the same probe on several feature sets (clean, and read under each edit)."""
    groups = list(groups) if groups is not None else [str(i) for i in range(len(train_x))]
    x, y = train_x.double().numpy(), train_y.numpy()
    if not multilabel and len(np.unique(y)) < 2:  # one class on the training side: that is the prediction
        return lambda test_x: np.full(len(test_x), y[0])
    probe = make_probe(config, multilabel, group_folds(groups, config.folds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fold's largest C on separable features
        warnings.filterwarnings("ignore", message="Label .* present in all training examples")  # an object always or never there
        warnings.filterwarnings("ignore", message="The least populated class")
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of coming defaults
        probe.fit(x, y)
    return lambda test_x: probe.predict(test_x.double().numpy())


def correct_of(predicted: np.ndarray, truth: np.ndarray, multilabel: bool) -> np.ndarray:
    """Per example, whether the prediction is right (every label of a multi-hot row)."""
    return (predicted == truth).all(-1) if multilabel else predicted == truth


def scores_of(predicted: np.ndarray, truth: np.ndarray, multilabel: bool) -> dict[str, float]:
    """Accuracy (exact match for multi-hot labels) and, for multi-hot labels, micro-F1."""
    accuracy = float(correct_of(predicted, truth, multilabel).mean())
    if not multilabel:
        return {"accuracy": accuracy}
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    f1 = 2 * (predicted & truth).sum() / max(1, predicted.sum() + truth.sum())
    return {"accuracy": accuracy, "f1": float(f1)}


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              multilabel: bool, config: ProbeConfig = ProbeConfig(),
              groups: Sequence[str] | None = None) -> dict[str, float]:
    """Train on `train_x [N, D]` → `train_y` (`[N]` classes, or `[N, C]` multi-hot) and score on the test set
    (`probe_predictions`, `scores_of`)."""
    predicted = probe_predictions(train_x, train_y, test_x, multilabel, config, groups)
    return scores_of(predicted, test_y.numpy(), multilabel)


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
        raise ProbeError(f"need one type per example: {len(types)} types for {len(labels)} labels")
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
    about the same image never sit on both sides of the split (a probe could otherwise learn the pair), and the
    probe's cross-validation folds keep them whole too.

    Each score has a 95% percentile-bootstrap interval over the held-out groups (`accuracy_low`,
    `accuracy_high`): the same `BOOTSTRAP_SAMPLES` resamples of held-out images, seeded with `config.seed`,
    for every layer and arm, so intervals of a layer and its control are computed on the same draws.

    With `controls`, each layer's row also holds the same probe's scores on the shuffled-label baseline
    (`shuffled_accuracy`, and `shuffled_f1` for multi-hot labels) and, where the task has input `types` (one
    per example; None: it has no meaningful control task), on the control task (`control_accuracy`,
    `control_f1`) and `selectivity` = accuracy − control_accuracy, with its own interval (`selectivity_low`,
    `selectivity_high`: the difference on each resample). Both are seeded with `config.seed`.
    """
    if types is not None and not controls:
        raise ProbeError("types name the control task's inputs: pass controls=True with them")
    groups = list(groups) if groups is not None else [str(i) for i in range(len(features))]
    train, test = split(groups, test_fraction, config.seed)
    arms = {"": labels}
    if controls:
        arms["shuffled_"] = shuffled_labels(labels, train, test, config.seed)
        if types is not None:
            arms["control_"] = control_labels(labels, types, config.seed)
    train_groups = [groups[i] for i in train.tolist()]
    resamples = group_resamples([groups[i] for i in test.tolist()], config.seed)
    rows = []
    for layer in range(features.shape[1]):
        row: dict[str, float] = {"layer": first_layer + layer}
        correct = {}
        for prefix, target in arms.items():
            truth = target[test].numpy()
            predicted = probe_predictions(features[train, layer], target[train], features[test, layer], multilabel,
                                          config, train_groups)
            row |= {prefix + name: value for name, value in scores_of(predicted, truth, multilabel).items()}
            correct[prefix] = correct_of(predicted, truth, multilabel)
            low, high = interval(resampled_means(correct[prefix], resamples))
            row |= {f"{prefix}accuracy_low": low, f"{prefix}accuracy_high": high}
        if "control_accuracy" in row:
            row["selectivity"] = row["accuracy"] - row["control_accuracy"]
            difference = resampled_means(correct[""], resamples) - resampled_means(correct["control_"], resamples)
            row["selectivity_low"], row["selectivity_high"] = interval(difference)
        rows.append(row)
    return rows


def group_resamples(groups: Sequence[str], seed: int, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """`[samples, n]` weights of the `n` examples: how often each one's group is drawn in each of `samples`
    resamples of the distinct groups with replacement (`numpy.random.default_rng(seed)`)."""
    names = {name: i for i, name in enumerate(sorted(set(groups)))}
    index = np.array([names[g] for g in groups])
    drawn = np.random.default_rng(seed).integers(0, len(names), size=(samples, len(names)))
    counts = np.stack([np.bincount(row, minlength=len(names)) for row in drawn])  # [samples, groups]
    return counts[:, index]


def resampled_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of `values [n]` in each resample (`weights [samples, n]`)."""
    totals = weights.sum(1)
    return (weights @ values.astype(float)) / np.maximum(totals, 1)


def interval(means: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of resampled means."""
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def edited_layerwise(features: torch.Tensor, edits: dict, labels: torch.Tensor, multilabel: bool,
                     test_fraction: float = 0.25, config: ProbeConfig = ProbeConfig(),
                     groups: Sequence[str] | None = None, *, retrain: bool = False,
                     first_layer: int = 0) -> list[dict]:
    """How edits shift what each layer's probe reads: for every edit (`edits`: name → its features `[N, L, D]`,
    read from the same examples under the edit) and layer, the probe fitted on the clean `features` scored on
    the edited features of the held-out examples (`mode` "transfer"), and with `retrain` a probe fitted and
    scored on edited features ("retrained"). Each row keeps the clean probe's accuracy beside it
    (`clean_accuracy`), and `delta_accuracy` = accuracy − clean_accuracy with a 95% interval (`delta_low`,
    `delta_high`) over the same resamples of held-out images as `layerwise`'s. Split, folds and seeds are
    `layerwise`'s, so `clean_accuracy` is its `accuracy`; a layer the edit does not reach has the clean features,
    and so `delta_accuracy` exactly 0 under transfer."""
    groups = list(groups) if groups is not None else [str(i) for i in range(len(features))]
    train, test = split(groups, test_fraction, config.seed)
    train_groups = [groups[i] for i in train.tolist()]
    resamples = group_resamples([groups[i] for i in test.tolist()], config.seed)
    truth = labels[test].numpy()
    rows = []
    for layer in range(features.shape[1]):
        probe = fitted_probe(features[train, layer], labels[train], multilabel, config, train_groups)
        clean = correct_of(probe(features[test, layer]), truth, multilabel)
        for name, edited in edits.items():
            modes = {"transfer": lambda edited=edited: probe(edited[test, layer])}
            if retrain:
                modes["retrained"] = lambda edited=edited: probe_predictions(
                    edited[train, layer], labels[train], edited[test, layer], multilabel, config, train_groups)
            for mode, predict in modes.items():
                right = correct_of(predict(), truth, multilabel)
                low, high = interval(resampled_means(right, resamples) - resampled_means(clean, resamples))
                rows.append({"layer": first_layer + layer, "edit": name, "mode": mode, "accuracy": float(right.mean()),
                             "clean_accuracy": float(clean.mean()), "delta_accuracy": float(right.mean() - clean.mean()),
                             "delta_low": low, "delta_high": high})
    return rows

"""mmscope.probes on features built here: the probes' controls (shuffled-label baseline, Hewitt & Liang's control
task, selectivity) against the documented seed rules rebuilt in these tests, the bootstrap intervals against
scipy's bootstrap over images, and the scores of edited features — no model involved."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from mmscope.probes import ProbeConfig, control_labels, fit_probe, layerwise, probe_predictions, shuffled_labels
from mmscope.probes.train import edited_layerwise, group_resamples, interval, resampled_means


def held_out_split(groups: list[str], seed: int, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-grouped split as `layerwise` documents it: a seeded permutation of the sorted group names, the
    first quarter held out."""
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {names[i] for i in order[: max(1, int(len(names) * test_fraction))]}
    return (torch.tensor([i for i, g in enumerate(groups) if g not in held]),
            torch.tensor([i for i, g in enumerate(groups) if g in held]))


def by_seed_rule(labels: torch.Tensor, types: list[str], train, test, seed: int):
    """The shuffled and control labels the docstrings promise, rebuilt by hand."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = labels.clone()
    shuffled[train] = labels[train[torch.randperm(len(train), generator=generator)]]
    shuffled[test] = labels[test[torch.randperm(len(test), generator=generator)]]
    names = sorted(set(types))
    drawn = torch.randint(len(labels), (len(names),), generator=torch.Generator().manual_seed(seed))
    control = torch.stack([labels[drawn[names.index(t)]] for t in types])
    return shuffled, control


def statements(n: int = 240, n_types: int = 24, seed: int = 3):
    """Synthetic entailment: labels, a statement type per example (two per image), and features whose layer 1
    holds the label in one coordinate (layer 0 is noise)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=generator)
    types = [f"statement {i % n_types}" for i in range(n)]
    features = torch.randn(n, 2, 6, generator=generator)
    features[:, 1, 0] = 2.0 * labels - 1
    return features, labels, types, [f"image {i // 2}" for i in range(n)]


def test_selectivity_is_accuracy_minus_the_control_task_the_seed_rule_gives():
    features, labels, types, groups = statements()
    config = ProbeConfig(seed=5)
    rows = layerwise(features, labels, False, config=config, groups=groups, controls=True, types=types)
    train, test = held_out_split(groups, config.seed)
    shuffled, control = by_seed_rule(labels, types, train, test, config.seed)
    folds = [groups[i] for i in train.tolist()]  # the probe's cross-validation keeps images whole
    for layer, row in enumerate(rows):
        x_train, x_test = features[train, layer], features[test, layer]
        accuracy = fit_probe(x_train, labels[train], x_test, labels[test], False, config, folds)["accuracy"]
        control_accuracy = fit_probe(x_train, control[train], x_test, control[test], False, config, folds)["accuracy"]
        shuffled_accuracy = fit_probe(x_train, shuffled[train], x_test, shuffled[test], False, config,
                                      folds)["accuracy"]
        scores = {key: row[key] for key in ("layer", "accuracy", "shuffled_accuracy", "control_accuracy",
                                            "selectivity")}
        assert scores == {"layer": layer, "accuracy": accuracy, "shuffled_accuracy": shuffled_accuracy,
                          "control_accuracy": control_accuracy, "selectivity": accuracy - control_accuracy}
        for arm in ("", "shuffled_", "control_"):
            assert row[f"{arm}accuracy_low"] <= row[f"{arm}accuracy"] <= row[f"{arm}accuracy_high"]
        assert row["selectivity_low"] <= row["selectivity"] <= row["selectivity_high"]
    # The label lies in one coordinate of layer 1 and the statement's identity nowhere: all accuracy, no control.
    assert rows[1]["accuracy"] == 1.0
    assert 0.3 <= rows[1]["control_accuracy"] <= 0.7 and 0.3 <= rows[1]["shuffled_accuracy"] <= 0.7
    assert rows[1]["selectivity"] >= 0.3


def test_a_layer_that_only_knows_which_statement_it_is_has_no_selectivity():
    # Features: the statement's one-hot; the label is a function of the statement. The probe memorises any
    # statement → label map, the task's and the control task's alike: accuracy 1, control accuracy 1, selectivity 0.
    n_types, n = 8, 160
    type_ids = torch.arange(n) % n_types
    features = torch.nn.functional.one_hot(type_ids, n_types).float()[:, None, :]
    labels = (type_ids % 2 == 0).long()
    types = [f"statement {t}" for t in type_ids.tolist()]
    groups = [f"image {i // 2}" for i in range(n)]
    [row] = layerwise(features, labels, False, groups=groups, controls=True, types=types)
    assert (row["accuracy"], row["control_accuracy"], row["selectivity"]) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_shuffled_baseline_keeps_each_sides_label_frequencies_and_follows_the_seed(multilabel):
    generator = torch.Generator().manual_seed(0)
    labels = (torch.randint(2, (60, 4), generator=generator) if multilabel
              else torch.randint(3, (60,), generator=generator))
    train, test = held_out_split([str(i // 3) for i in range(60)], seed=1)
    shuffled = shuffled_labels(labels, train, test, seed=7)

    def rows(values):
        return Counter(tuple(row) if multilabel else int(row) for row in values.tolist())

    for side in (train, test):
        assert rows(shuffled[side]) == rows(labels[side])  # whole rows moved, within their side
    assert not torch.equal(shuffled, labels)
    assert torch.equal(shuffled, shuffled_labels(labels, train, test, seed=7))
    assert not torch.equal(shuffled, shuffled_labels(labels, train, test, seed=8))


def test_the_control_task_gives_every_type_one_label_drawn_by_the_seed():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (90, 3), generator=generator)
    types = [f"type {i % 12}" for i in range(90)]
    control = control_labels(labels, types, seed=4)
    by_type = {}
    for kind, row in zip(types, control.tolist(), strict=True):
        assert by_type.setdefault(kind, row) == row  # the same type always carries the same label
    assert {tuple(row) for row in control.tolist()} <= {tuple(row) for row in labels.tolist()}
    assert len(set(map(tuple, by_type.values()))) > 1
    assert torch.equal(control, control_labels(labels, types, seed=4))
    assert not torch.equal(control, control_labels(labels, types, seed=5))
    _, expected = by_seed_rule(labels, types, torch.tensor([], dtype=torch.long), torch.arange(90), seed=4)
    assert torch.equal(control, expected)
    with pytest.raises(ValueError, match="one type per example"):
        control_labels(labels, types[:-1])


def test_without_controls_the_rows_keep_their_columns():
    features, labels, types, groups = statements(n=80)
    [row] = layerwise(features[:, :1], labels, False, groups=groups)
    assert list(row) == ["layer", "accuracy", "accuracy_low", "accuracy_high"]
    multi = torch.stack([labels, 1 - labels], dim=1)
    [row] = layerwise(features[:, :1], multi, True, groups=groups, controls=True)  # no types: no control task
    assert list(row) == ["layer", "accuracy", "f1", "accuracy_low", "accuracy_high", "shuffled_accuracy",
                         "shuffled_f1", "shuffled_accuracy_low", "shuffled_accuracy_high"]
    with pytest.raises(ValueError, match="controls=True"):
        layerwise(features, labels, False, groups=groups, types=types)


def image_bootstrap(correct: np.ndarray, images: list[str]) -> tuple[float, float]:
    """The 95% percentile interval of accuracy over images, by scipy's bootstrap: each image's hits and size
    resampled together (paired), accuracy = hits / statements of the resample; its own generator, 20,000 draws."""
    names = sorted(set(images))
    hits = np.array([sum(c for c, image in zip(correct, images, strict=True) if image == name) for name in names])
    sizes = np.array([images.count(name) for name in names], dtype=float)
    found = stats.bootstrap((hits, sizes), lambda h, n, axis=-1: h.sum(axis) / n.sum(axis), paired=True,
                            vectorized=True, method="percentile", n_resamples=20_000,
                            random_state=np.random.default_rng(12345))
    return found.confidence_interval.low, found.confidence_interval.high


def test_each_score_has_a_bootstrap_interval_over_held_out_images():
    """Against scipy's bootstrap over images (`image_bootstrap`), to Monte-Carlo error: on statements whose
    correctness is shared within an image, where resampling statements instead would give a far narrower interval;
    and on a layer's held-out predictions."""
    rng = np.random.default_rng(0)
    images = [f"image {i}" for i in range(40) for _ in range(4)]
    correct = np.repeat(rng.random(40) < 0.6, 4).astype(float)
    ours = interval(resampled_means(correct, group_resamples(images, seed=3)))
    assert ours == pytest.approx(image_bootstrap(correct, images), abs=0.03)
    per_statement = stats.bootstrap((correct,), np.mean, method="percentile", n_resamples=20_000,
                                    random_state=np.random.default_rng(1)).confidence_interval
    assert ours[1] - ours[0] > 1.6 * (per_statement.high - per_statement.low)  # images, not statements, resampled

    features, labels, types, groups = statements(n=120)
    config = ProbeConfig(seed=2)
    rows = layerwise(features, labels, False, config=config, groups=groups)
    train, test = held_out_split(groups, config.seed)
    folds = [groups[i] for i in train.tolist()]
    predicted = probe_predictions(features[train, 0], labels[train], features[test, 0], False, config, folds)
    held_out = (predicted == labels[test].numpy()).astype(float)
    # 30 held-out statements: accuracies move in steps of 1/30, so the percentiles may differ by one step
    assert (rows[0]["accuracy_low"], rows[0]["accuracy_high"]) == pytest.approx(
        image_bootstrap(held_out, [groups[i] for i in test.tolist()]), abs=0.05)
    assert rows[0]["accuracy_high"] - rows[0]["accuracy_low"] > 0.05  # noise features: a wide interval
    assert rows[1]["accuracy_low"] == rows[1]["accuracy_high"] == 1.0  # the label in one coordinate


def test_edited_features_are_scored_by_the_clean_probe_and_unreached_layers_shift_by_exactly_nothing():
    features, labels, types, groups = statements(n=160)  # layer 1 holds the label
    features = torch.cat([features, features[:, 1:]], dim=1)  # layers 0 (noise), 1, 2 (both hold the label)
    edited = features.clone()
    edited[:, 2] = torch.randn(edited[:, 2].shape, generator=torch.Generator().manual_seed(9))  # the edit reaches 2
    config = ProbeConfig(seed=1)
    clean = layerwise(features, labels, False, config=config, groups=groups)
    rows = edited_layerwise(features, {"edit": edited}, labels, False, config=config, groups=groups, retrain=True)
    transfer = {row["layer"]: row for row in rows if row["mode"] == "transfer"}
    retrained = {row["layer"]: row for row in rows if row["mode"] == "retrained"}
    for layer in (0, 1):  # before the edit's first layer: the clean features, the clean scores
        assert transfer[layer]["delta_accuracy"] == 0.0 and transfer[layer]["delta_low"] == 0.0
        assert transfer[layer]["accuracy"] == clean[layer]["accuracy"] == transfer[layer]["clean_accuracy"]
    assert transfer[2]["clean_accuracy"] == 1.0 and transfer[2]["accuracy"] < 0.8  # the label is gone from layer 2
    assert transfer[2]["delta_high"] < 0  # and the interval says so
    assert retrained[1]["accuracy"] == 1.0 and retrained[2]["accuracy"] < 0.8  # not decodable there at all
    identity = edited_layerwise(features, {"none": features.clone()}, labels, False, config=config, groups=groups)
    assert all(row["delta_accuracy"] == 0.0 for row in identity)  # an edit that changes nothing

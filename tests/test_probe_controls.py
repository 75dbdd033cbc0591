"""Control baselines for the layer-wise probes: the shuffled-label baseline, Hewitt & Liang's control task and
selectivity, checked against the documented seed rules rebuilt here and `fit_probe` called directly."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from mmscope.experiments.probe import PROBE, ProbeOptions, control_types
from mmscope.experiments.runner import run
from mmscope.probes import ProbeConfig, control_labels, fit_probe, layer_features, layerwise, shuffled_labels, split


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
    config = ProbeConfig(epochs=150, seed=5)
    rows = layerwise(features, labels, False, config=config, groups=groups, controls=True, types=types)
    train, test = held_out_split(groups, config.seed)
    shuffled, control = by_seed_rule(labels, types, train, test, config.seed)
    for layer, row in enumerate(rows):
        x_train, x_test = features[train, layer], features[test, layer]
        accuracy = fit_probe(x_train, labels[train], x_test, labels[test], False, config)["accuracy"]
        control_accuracy = fit_probe(x_train, control[train], x_test, control[test], False, config)["accuracy"]
        shuffled_accuracy = fit_probe(x_train, shuffled[train], x_test, shuffled[test], False, config)["accuracy"]
        assert row == {"layer": layer, "accuracy": accuracy, "shuffled_accuracy": shuffled_accuracy,
                       "control_accuracy": control_accuracy, "selectivity": accuracy - control_accuracy}
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
    assert list(row) == ["layer", "accuracy"]
    multi = torch.stack([labels, 1 - labels], dim=1)
    [row] = layerwise(features[:, :1], multi, True, groups=groups, controls=True)  # no types: no control task
    assert list(row) == ["layer", "accuracy", "f1", "shuffled_accuracy", "shuffled_f1"]
    with pytest.raises(ValueError, match="controls=True"):
        layerwise(features, labels, False, groups=groups, types=types)


def test_probe_command_reports_selectivity_from_a_control_task_on_the_features(embedded, world, tmp_path):
    printed = []
    options = ProbeOptions(data=world, split="test", n_images=12, out=tmp_path / "probe")
    run_dir = run(PROBE, options, printed.append)
    report = "\n".join(printed)
    assert "best layer by selectivity:" in report and "shuffled-label baseline" in report
    table = pd.read_parquet(run_dir.folder / "results.parquet")
    assert sorted(table["layer"].unique()) == list(range(-1, embedded.n_layers))  # the embeddings are layer -1
    assert "\nembeddings " in report
    assert set(table["task"]) == {"entailment", "objects"}
    assert (table["selectivity"] == table["accuracy"] - table["control_accuracy"]).all()
    assert table[["control_accuracy", "shuffled_accuracy"]].notna().all().all()
    summary = pd.read_csv(run_dir.folder / "summary.csv")
    assert {"control_accuracy", "shuffled_accuracy", "selectivity"} <= set(summary.columns)
    # One layer's control-task score, recomputed from the model's features and the seed rule.
    data = PROBE.data(options)["entailment"]
    layer = embedded.n_layers // 2  # after decoder layer `layer`: the features' point layer + 1 (0 = embeddings)
    features = layer_features(embedded, data["image"], list(data["statement"]), "last", progress=False)[:, layer + 1]
    groups, labels = list(data["image_id"]), torch.tensor(data["label"])
    train, test = held_out_split(groups, options.seed)
    control = control_labels(labels, control_types("entailment", data), options.seed)
    expected = fit_probe(features[train], control[train], features[test], control[test], False,
                         ProbeConfig(seed=options.seed))["accuracy"]
    at = (table["task"] == "entailment") & (table["pooling"] == "last") & (table["layer"] == layer)
    [row] = table[at].itertuples()
    assert row.control_accuracy == expected
    # An object image's type is its set of object names, read here off its multi-hot labels.
    objects = PROBE.data(options)["objects"]
    names = objects.features["label_ids"].feature.names
    assert control_types("objects", objects) == [",".join(name for name, on in zip(names, row, strict=True) if on)
                                                 for row in objects["labels"]]

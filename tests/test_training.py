"""The training recipe's auxiliary targets, checked against the scene graphs read independently."""

from __future__ import annotations

import json

import pytest

from mmscope.data.synthetic import load_synthetic
from mmscope.models.build import TinyLlavaSpec, build_llava, build_word_tokenizer
from mmscope.models.train import IGNORE, Batcher, SceneTargets


@pytest.fixture(scope="module")
def batch_and_rows(tmp_path_factory):
    from mmscope.data import synthesize

    folder = tmp_path_factory.mktemp("train-world")
    synthesize(folder, 40, seed=7, image_size=64, progress=False)
    rows = load_synthetic(folder, "train")
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]))
    spec = TinyLlavaSpec(image_size=64, patch_size=8, text_layers=2, vision_layers=1)
    _, processor = build_llava(tokenizer, spec)
    world = json.loads((folder / "world.json").read_text())
    graphs = json.loads((folder / "sceneGraphs" / "train_sceneGraphs.json").read_text())
    targets = SceneTargets(folder / "sceneGraphs" / "train_sceneGraphs.json", world["vocabulary"], grid=8, image_size=64)
    indices = list(range(min(48, len(rows))))
    return Batcher(processor, rows, targets)(indices), rows.select(indices), tokenizer, world["vocabulary"], graphs


def test_mention_targets_sit_on_the_mentioned_word_and_describe_that_object(batch_and_rows):
    batch, rows, tokenizer, vocabulary, graphs = batch_and_rows
    checked = absent = 0
    for b, row in enumerate(rows):
        for m, (name, object_id) in enumerate(zip(row["object_names"], row["object_ids"])):
            position = int(batch["mention_positions"][b, m])
            token = tokenizer.convert_ids_to_tokens(int(batch["input_ids"][b, position]))
            assert token in (name, f"{name}s"), (row["question"], name, token)
            labels = batch["mention_labels"][b, m].tolist()
            if not object_id:
                assert labels[0] == 0 and all(label == IGNORE for label in labels[1:])
                absent += 1
                continue
            obj = graphs[row["image_id"]]["objects"][object_id]
            present, shape, color, size, material, column, row_bin = labels
            assert present == 1
            assert vocabulary["shapes"][shape] == obj["name"]
            assert {vocabulary["colors"][color], vocabulary["sizes"][size], vocabulary["materials"][material]} \
                == set(obj["attributes"])
            assert (column, row_bin) == (int((obj["x"] + obj["w"] / 2) // 8), int((obj["y"] + obj["h"] / 2) // 8))
            checked += 1
        for m in range(len(row["object_names"]), batch["mention_positions"].shape[1]):
            assert int(batch["mention_positions"][b, m]) == -1
    assert checked > 20 and absent > 0


def test_patch_targets_mark_the_patch_under_each_object_centre(batch_and_rows):
    batch, rows, _, vocabulary, graphs = batch_and_rows
    for b, row in enumerate(rows):
        objects = list(graphs[row["image_id"]]["objects"].values())
        labels = batch["patch_labels"][b]
        for obj in objects:
            patch = int((obj["y"] + obj["h"] / 2) // 8) * 8 + int((obj["x"] + obj["w"] / 2) // 8)
            assert vocabulary["shapes"][int(labels[patch, 0]) - 1] == obj["name"]
        assert (labels[:, 0] > 0).sum() >= len(objects)  # every object covers at least its centre patch
        assert set(labels[:, 4].tolist()) == {0, 1} and set(labels[:, 5].tolist()) == {0, 1}  # image halves

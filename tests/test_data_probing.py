"""Probe datasets: entailment pairs and object labels from the synthetic world's scene graphs and from COCO files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from data_fixtures import synthetic_world
from PIL import Image

from mmscope.data import (
    coco_entailment_dataset,
    coco_object_recognition_dataset,
    entailment_dataset,
    object_recognition_dataset,
)
from mmscope.data.errors import DataError, MalformedFileError, MissingImageError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory)


@pytest.fixture(scope="module")
def graphs(world):
    return json.loads(world.scene_graphs["train"].read_text())


@pytest.fixture(scope="module")
def pairs(world):
    return entailment_dataset(world.scene_graphs["train"], world.images, seed=1)


# ------------------------------------------------------------------------------- synthetic world


def holds(statement, graph):
    """Is `statement` true of the scene? Relations are judged from the boxes, not the graph's relation list."""
    objects = list(graph["objects"].values())
    match = re.fullmatch(r"There is an? (\w+) (to the left of|to the right of|above|below) an? (\w+)\.", statement)
    if match:
        subject, relation, reference = match.groups()
        for s in (o for o in objects if o["name"] == subject):
            for r in (o for o in objects if o["name"] == reference):
                dx = (s["x"] + s["w"] / 2) - (r["x"] + r["w"] / 2)
                dy = (s["y"] + s["h"] / 2) - (r["y"] + r["h"] / 2)
                if {"to the left of": dx < 0, "to the right of": dx > 0, "above": dy < 0, "below": dy > 0}[relation]:
                    return True
        return False
    attribute, name = re.fullmatch(r"There is an? (\w+) (\w+)\.", statement).groups()
    return any(o["name"] == name and attribute in o["attributes"] for o in objects)


def test_every_statement_is_true_or_false_of_its_scene_as_labelled(pairs, graphs):
    for row in pairs:
        assert holds(row["statement"], graphs[row["image_id"]]) == (row["label"] == 1), row["statement"]


def test_labels_are_balanced_overall_and_for_each_kind_of_swap(pairs):
    counts = Counter(zip(pairs["negative_kind"], pairs["label"]))
    for kind in ("attribute", "object", "relation"):
        assert counts[kind, 0] == counts[kind, 1] > 50
    kinds = Counter(pairs["negative_kind"])
    assert max(kinds.values()) - min(kinds.values()) <= 0.1 * max(kinds.values())
    assert pairs.features["label"].names == ["false", "true"]


def test_each_false_statement_differs_from_its_true_one_in_one_swap(pairs):
    by_pair = {}
    for row in pairs:
        by_pair.setdefault(row["pair_id"], {})[row["label"]] = row
    assert all(set(pair) == {0, 1} for pair in by_pair.values())
    for pair in by_pair.values():
        true, false = pair[1]["statement"], pair[0]["statement"]
        kind = pair[0]["negative_kind"]
        if kind == "relation":
            assert re.sub(r"left|right|above|below", "_", true) == re.sub(r"left|right|above|below", "_", false)
        else:
            changed = [i for i, (a, b) in enumerate(zip(true.split(), false.split())) if a != b]
            assert len(true.split()) == len(false.split()) and len(changed) == 1, (true, false)
            assert changed[0] == (len(true.split()) - 2 if kind == "attribute" else len(true.split()) - 1)


def test_entailment_images_decode_and_the_seed_fixes_the_statements(world, pairs):
    assert pairs[0]["image"].size == (96, 96)
    again = entailment_dataset(world.scene_graphs["train"], None, seed=1)
    other = entailment_dataset(world.scene_graphs["train"], None, seed=2)
    assert again["statement"] == pairs["statement"] and "image" not in again.column_names
    assert other["statement"] != pairs["statement"]


def test_entailment_kinds_can_be_restricted_and_unknown_kinds_are_named(world):
    with pytest.warns(UserWarning, match=r"skipped \d+ of 24 images .* that gave no statement"):
        only = entailment_dataset(world.scene_graphs["val"], None, kinds=["relation"])  # one-object scenes: none
    assert set(only["negative_kind"]) == {"relation"}
    with pytest.raises(DataError, match=r"unknown statement kind\(s\) \['colour'\]; known: attribute, object"):
        entailment_dataset(world.scene_graphs["val"], None, kinds=["colour"])


def test_object_labels_are_the_shapes_in_each_scene(world, graphs):
    dataset = object_recognition_dataset(world.scene_graphs["train"], world.images)
    names = dataset.features["label_ids"].feature.names
    assert names == ["cone", "cube", "cylinder", "sphere"]
    for row in dataset:
        present = {o["name"] for o in graphs[row["image_id"]]["objects"].values()}
        assert row["labels"] == [int(name in present) for name in names]
        assert [names[i] for i in row["label_ids"]] == sorted(present)
    assert len(dataset) == len(graphs) and dataset[0]["image"].size == (96, 96)


def test_object_labels_follow_the_given_categories(world):
    dataset = object_recognition_dataset(world.scene_graphs["val"], None, categories=["sphere", "cube"])
    assert dataset.features["label_ids"].feature.names == ["sphere", "cube"]
    assert all(len(labels) == 2 for labels in dataset["labels"])
    with pytest.raises(DataError, match=r"distinct names; repeated: \['cube'\]"):
        object_recognition_dataset(world.scene_graphs["val"], None, categories=["cube", "cube"])


# ------------------------------------------------------------------------------------------ COCO

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 35, "name": "skis", "supercategory": "sports"},
    {"id": 42, "name": "surfboard", "supercategory": "sports"},
    {"id": 63, "name": "couch", "supercategory": "furniture"},
    {"id": 65, "name": "bed", "supercategory": "furniture"},
]
IMAGES = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (139, 285, 632)]
OBJECTS = {139: [18, 63], 285: [1, 42, 1], 632: [17]}
CAPTIONS = {139: ["A dog lying on a red couch.", "A dog on the left side of a couch.", "A sleepy dog."],
            285: ["A man riding a surfboard."], 632: ["Nothing to see here."]}


def write_coco(folder: Path, images=(139, 285, 632)) -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    annotations = [{"id": 1000 + n, "image_id": image_id, "category_id": category, "bbox": [1.0, 2.0, 10.0, 8.0],
                    "area": 80.0, "iscrowd": 0, "segmentation": [[1.0, 2.0, 11.0, 2.0, 11.0, 10.0]]}
                   for n, (image_id, category) in enumerate((i, c) for i, cs in OBJECTS.items() for c in cs)]
    instances = folder / "instances_val2017.json"
    instances.write_text(json.dumps({"info": {}, "licenses": [], "images": IMAGES, "annotations": annotations,
                                     "categories": CATEGORIES}))
    captions = folder / "captions_val2017.json"
    captions.write_text(json.dumps({"info": {}, "licenses": [], "images": IMAGES, "annotations": [
        {"id": 2000 + n, "image_id": image_id, "caption": caption}
        for n, (image_id, caption) in enumerate((i, c) for i, cs in CAPTIONS.items() for c in cs)]}))
    image_folder = folder / "val2017"
    image_folder.mkdir(exist_ok=True)
    for image_id in images:
        Image.new("RGB", (40, 30), "gray").save(image_folder / f"{image_id:012d}.jpg")
    return captions, instances, image_folder


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


def test_coco_object_labels_are_multi_hot_in_category_id_order(coco):
    _, instances, images = coco
    dataset = coco_object_recognition_dataset(instances, images)
    names = dataset.features["label_ids"].feature.names
    assert names == ["person", "cat", "dog", "skis", "surfboard", "couch", "bed"]
    labels = {row["image_id"]: row["labels"] for row in dataset}
    assert labels == {"139": [0, 0, 1, 0, 0, 1, 0], "285": [1, 0, 0, 0, 1, 0, 0], "632": [0, 1, 0, 0, 0, 0, 0]}
    assert dataset[0]["image"].size == (40, 30)


def test_coco_negatives_swap_one_word_for_an_absent_object_another_colour_or_the_opposite_side(coco):
    captions, instances, images = coco
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 captions"):  # 2 for image 139, 1 each for 285, 632
        dataset = coco_entailment_dataset(captions, instances, images, seed=0, captions_per_image=2)
    rows = list(dataset)
    assert Counter(row["label"] for row in rows) == {0: 3, 1: 3}
    colours = {"white", "black", "blue", "green", "brown", "yellow", "gray", "orange", "pink", "purple", "silver",
               "gold", "tan"}
    allowed = {("dog", "cat"), ("couch", "bed"), ("left", "right"), ("surfboard", "skis")} | {
        ("red", colour) for colour in colours}
    by_pair = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], {})[row["label"]] = row["statement"]
    for pair in by_pair.values():
        assert pair[1] in CAPTIONS[139] + CAPTIONS[285]
        true, false = re.findall(r"\w+", pair[1]), re.findall(r"\w+", pair[0])
        swapped = [(a, b) for a, b in zip(true, false) if a != b]
        assert len(true) == len(false) and len(swapped) == 1 and swapped[0] in allowed, pair
    assert by_pair["285-0"] == {1: "A man riding a surfboard.", 0: "A man riding a skis."}


def test_coco_missing_images_are_named_or_skipped_with_a_count(tmp_path):
    captions, instances, images = write_coco(tmp_path, images=(139, 285))
    with pytest.raises(MissingImageError, match=r"image '632': image file .*000000000632.jpg is missing"):
        coco_object_recognition_dataset(instances, images)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 images whose image file is missing"):
        assert len(coco_object_recognition_dataset(instances, images, on_missing_image="skip")) == 2


def test_coco_annotations_pointing_nowhere_are_named(tmp_path):
    captions, instances, _ = write_coco(tmp_path)
    data = json.loads(instances.read_text())
    data["annotations"][0]["category_id"] = 99
    instances.write_text(json.dumps(data))
    with pytest.raises(MalformedFileError, match=r"annotation 1000 has category_id 99, which 'categories' does not"):
        coco_entailment_dataset(captions, instances, None)
    data = json.loads(captions.read_text())
    data["annotations"][0]["image_id"] = 5
    captions.write_text(json.dumps(data))
    with pytest.raises(MalformedFileError, match=r"caption 2000 is about image 5, which its 'images' does not list"):
        coco_entailment_dataset(captions, write_coco(tmp_path / "ok")[1], None)


def test_a_relation_to_an_object_the_image_lacks_is_named(tmp_path):
    graphs = tmp_path / "val_sceneGraphs.json"
    graphs.write_text(json.dumps({"7": {"width": 9, "height": 9, "objects": {
        "1": {"name": "cube", "x": 0, "y": 0, "w": 3, "h": 3, "attributes": ["red"],
              "relations": [{"name": "to the left of", "object": "2"}]}}}}))
    with pytest.raises(MalformedFileError, match=r"image '7', object '1': relations point to object\(s\) \['2'\]"):
        entailment_dataset(graphs, None)

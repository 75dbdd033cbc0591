"""The synthetic world: GQA layout, answers re-derived from the scene graphs, balance, splits, images."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest
from data_fixtures import clear_error, synthetic_world
from PIL import Image

from mmscope.data import CATEGORIES, category_of, load_synthetic, synthesize
from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError
from mmscope.data.synthetic.questions import BUCKETS, OTHER


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory)


@pytest.fixture(scope="module")
def vocabulary(world):
    return json.loads(world.world.read_text())["vocabulary"]


@pytest.fixture(scope="module")
def graphs(world):
    return {split: json.loads(path.read_text()) for split, path in world.scene_graphs.items()}


@pytest.fixture(scope="module")
def rows(world):
    return {split: list(load_synthetic(world.root, split)) for split in world.questions}


# ----------------------------------------------------------------- an independent answer oracle
#
# Each template is parsed from the question text and answered from the scene-graph JSON alone.


def kind_of(value, vocabulary):
    return next(kind for kind, plural in (("color", "colors"), ("size", "sizes"), ("material", "materials"))
                if value in vocabulary[plural])


def centre(obj):
    return obj["x"] + obj["w"] / 2, obj["y"] + obj["h"] / 2


def the(objects, name):
    (obj,) = [o for o in objects if o["name"] == name]
    return obj


def described(objects, words):
    (obj,) = [o for o in objects if set(words.split()) <= set(o["attributes"])]
    return obj


def pick(options, truth):
    assert sum(o == truth for o in options) == 1, (options, truth)
    return truth


def oracle(question, graph, vocabulary):
    """(answer, names of the objects the question is about) computed from the scene graph."""
    objects = list(graph["objects"].values())
    size = graph["width"]
    patterns = [
        (r"Is the (\w+) (?:made of )?(\w+) or (\w+)\?",
         lambda o, a, b: (pick([a, b], next(x for x in the(objects, o)["attributes"] if x in (a, b))), [o])),
        (r"What (?:color|size|material) is the (\w+), (\w+) or (\w+)\?",
         lambda o, a, b: (pick([a, b], next(x for x in the(objects, o)["attributes"] if x in (a, b))), [o])),
        (r"(?:What is this, a|Is this a) (\w+) or a (\w+)\?",
         lambda a, b: (len(objects) == 1 and pick([a, b], objects[0]["name"]), ["this"])),
        (r"(?:What is|Which shape is) the ([\w ]+) object, a (\w+) or a (\w+)\?",
         lambda d, a, b: (pick([a, b], described(objects, d)["name"]), ["object"])),
        (r"Is the (\w+) to the (left|right) or to the (left|right) of the (\w+)\?",
         lambda s, a, b, r: (horizontal(the(objects, s), the(objects, r), size), [s, r])),
        (r"Is the (\w+) (above|below) or (above|below) the (\w+)\?",
         lambda s, a, b, r: (vertical(the(objects, s), the(objects, r), size), [s, r])),
        (r"What do (?:both )?the (\w+) and the (\w+) have in common\?",
         lambda a, b: (common(the(objects, a), the(objects, b), vocabulary), [a, b])),
        (r"Is there a (\w+) or a (\w+) that is (?:made of )?(\w+)\?",
         lambda a, b, v: (exists(objects, a, b, v), [a, b])),
        (r"Are there any (\w+)s or (\w+)s that are (?:made of )?(\w+)\?",
         lambda a, b, v: (exists(objects, a, b, v), [a, b])),
        (r"(?:On which side (?:of the (?:photo|image) )?is the (\w+)|Which side of the image is the (\w+) on)\?",
         lambda o1, o2: (image_side(the(objects, o1 or o2), size), [o1 or o2])),
        (r"(?:What (color|size) is the (\w+)|What is the (color|size) of the (\w+))\?",
         lambda k1, o1, k2, o2: (next(x for x in the(objects, o1 or o2)["attributes"]
                                      if kind_of(x, vocabulary) == (k1 or k2)), [o1 or o2])),
        (r"(?:What is the (\w+) made of|What material is the (\w+))\?",
         lambda o1, o2: (next(x for x in the(objects, o1 or o2)["attributes"] if x in vocabulary["materials"]),
                         [o1 or o2])),
        (r"(?:What shape is|What is the shape of) the ([\w ]+) object\?",
         lambda d: (described(objects, d)["name"], ["object"])),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(*match.groups())
    raise AssertionError(f"no template matches {question!r}")


def horizontal(subject, reference, size):
    dx = centre(subject)[0] - centre(reference)[0]
    assert abs(dx) >= 0.1 * size, "left/right asked about a near tie"
    return "left" if dx < 0 else "right"


def vertical(subject, reference, size):
    dy = centre(subject)[1] - centre(reference)[1]
    assert abs(dy) >= 0.1 * size, "above/below asked about a near tie"
    return "above" if dy < 0 else "below"


def common(first, second, vocabulary):
    (shared,) = set(first["attributes"]) & set(second["attributes"])
    return kind_of(shared, vocabulary)


def exists(objects, first, second, value):
    return "yes" if any(o["name"] in (first, second) and value in o["attributes"] for o in objects) else "no"


def image_side(obj, size):
    offset = centre(obj)[0] - size / 2
    assert abs(offset) >= 0.1 * size, "side of the image asked about an object near the middle"
    return "left" if offset < 0 else "right"


# ------------------------------------------------------------------------------------------- tests


def test_files_are_written_in_the_official_gqa_layout(world):
    root = world.root
    for split in ("train", "val", "test"):
        assert world.questions[split] == root / "questions" / f"{split}_balanced_questions.json"
        assert world.scene_graphs[split] == root / "sceneGraphs" / f"{split}_sceneGraphs.json"
    assert len(list((root / "images").glob("*.jpg"))) == 240
    meta = json.loads(world.world.read_text())
    assert meta["vocabulary"] == {"shapes": ["cube", "sphere", "cylinder", "cone"],
                                  "colors": ["red", "green", "blue", "yellow", "purple", "gray"],
                                  "sizes": ["small", "large"], "materials": ["metal", "rubber"]}
    record = next(iter(json.loads(world.questions["train"].read_text()).values()))
    assert {"imageId", "question", "answer", "fullAnswer", "types", "annotations", "semantic",
            "semanticStr"} <= set(record)
    assert set(record["types"]) == {"structural", "semantic", "detailed"}


def test_every_answer_rederived_from_the_scene_graph_matches(rows, graphs, vocabulary):
    checked = 0
    for split, split_rows in rows.items():
        for row in split_rows:
            answer, names = oracle(row["question"], graphs[split][row["image_id"]], vocabulary)
            assert row["answer"] == answer, row["question"]
            assert row["object_names"] == names, row["question"]
            checked += 1
    assert checked > 1500


def test_object_boxes_are_the_scene_graph_boxes_of_the_named_objects(rows, graphs):
    for split, split_rows in rows.items():
        for row in split_rows:
            objects = graphs[split][row["image_id"]]["objects"]
            for object_id, box in zip(row["object_ids"], row["object_boxes"], strict=True):
                if object_id:
                    obj = objects[object_id]
                    assert box == [obj["x"], obj["y"], obj["w"], obj["h"]]
                else:  # LogicalObj may name a shape the scene lacks
                    assert box == [] and row["category"] == "LogicalObj"
            assert (row["image_width"], row["image_height"]) == (96, 96)


def test_all_six_categories_appear_in_every_split_and_extras_have_no_category(rows):
    for split, split_rows in rows.items():
        counts = Counter(row["category"] for row in split_rows)
        assert set(counts) == {*CATEGORIES, None}
        spread = 0.1 if split == "train" else 0.25  # val/test have only 24 scenes each
        assert max(counts.values()) - min(counts.values()) <= spread * max(counts.values()), (split, counts)
    extras = {row["detailed_type"] for split_rows in rows.values() for row in split_rows if row["category"] is None}
    assert extras == {"directOf", "material"}


def test_every_question_belongs_to_the_one_bucket_that_writes_its_type_and_has_one_of_its_answers(world, rows):
    writers = defaultdict(list)
    for bucket in BUCKETS:
        for detailed in bucket.detailed_types:
            writers[detailed].append(bucket)
    assert all(len(buckets) == 1 for buckets in writers.values())
    assert [bucket.name for bucket in BUCKETS] == [*CATEGORIES, OTHER]
    asked = Counter()
    for row in (row for split_rows in rows.values() for row in split_rows):
        (bucket,) = writers[row["detailed_type"]]
        assert category_of(row["detailed_type"]) == row["category"] == (None if bucket.name == OTHER else bucket.name)
        assert row["answer"] in bucket.answers, (bucket.name, row["question"])
        asked[bucket.name, row["answer"]] += 1
    assert set(asked) == {(bucket.name, answer) for bucket in BUCKETS for answer in bucket.answers}
    assert json.loads(world.world.read_text())["answers"] == {b.name: list(b.answers) for b in BUCKETS}


def test_binary_answers_are_balanced_in_every_split(rows):
    for split_rows in rows.values():
        groups = defaultdict(Counter)
        for row in split_rows:
            if row["category"] in ("LogicalObj", "QueryAttr"):
                groups[row["category"]][row["answer"]] += 1
            if row["category"] == "ChooseRel":
                groups["ChooseRel " + ("horizontal" if "left" in row["question"] else "vertical")][row["answer"]] += 1
        assert len(groups) == 4
        for name, answers in groups.items():
            assert len(answers) == 2 and max(answers.values()) / answers.total() <= 0.55, (name, answers)


def test_multi_valued_answers_are_even(rows):
    answers = defaultdict(Counter)
    for row in rows["train"]:
        answers[row["category"]][row["answer"]] += 1
    assert set(answers["ChooseCat"]) == {"cube", "sphere", "cylinder", "cone"}
    assert max(answers["ChooseCat"].values()) / answers["ChooseCat"].total() <= 0.3
    assert set(answers["CompareAttr"]) == {"color", "size", "material"}
    assert max(answers["CompareAttr"].values()) / answers["CompareAttr"].total() <= 0.38


def test_choose_questions_answer_the_true_option_and_its_position_is_balanced(rows):
    first = Counter()
    for row in rows["train"]:
        if row["category"] in ("ChooseAttr", "ChooseCat", "ChooseRel"):
            assert row["answer"] == row["true_option"] != row["false_option"]
            words = re.findall(r"\w+", row["question"])
            true_at, false_at = words.index(row["true_option"]), words.index(row["false_option"])
            first[row["category"], true_at < false_at] += 1
    for category in ("ChooseAttr", "ChooseCat", "ChooseRel"):
        share = first[category, True] / (first[category, True] + first[category, False])
        assert 0.45 <= share <= 0.55, (category, share)


def test_the_question_text_never_contains_the_answer_of_an_open_question(rows):
    for split_rows in rows.values():
        for row in split_rows:
            if row["true_option"] is None:
                assert row["answer"] not in re.findall(r"\w+", row["question"].lower()), row["question"]


def test_the_wording_of_a_binary_question_does_not_predict_its_answer(rows):
    """Group questions by their wording with the vocabulary masked: no template leans to one answer."""
    mask = re.compile(r"\b(cubes?|spheres?|cylinders?|cones?|red|green|blue|yellow|purple|gray|small|large|metal|"
                      r"rubber)\b")
    by_template = defaultdict(Counter)
    for split_rows in rows.values():
        for row in split_rows:
            if row["category"] in ("LogicalObj", "QueryAttr"):
                by_template[mask.sub("_", row["question"])][row["answer"]] += 1
    assert len(by_template) >= 6
    for template, answers in by_template.items():
        if answers.total() >= 40:
            assert max(answers.values()) / answers.total() <= 0.65, (template, answers)


def test_splits_share_no_scene_and_no_question(world, rows, graphs):
    images = {split: set(graph) for split, graph in graphs.items()}
    assert sorted(len(ids) for ids in images.values()) == [24, 24, 192]
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    for split, split_rows in rows.items():
        assert {row["image_id"] for row in split_rows} <= images[split]
    question_ids = [row["question_id"] for split_rows in rows.values() for row in split_rows]
    assert len(question_ids) == len(set(question_ids))
    assert all(re.fullmatch(r"\d{8}", qid) for qid in question_ids) and "00000000" in question_ids


def test_objects_are_large_separate_and_inside_the_image(graphs):
    for graph in (g for split in graphs.values() for g in split.values()):
        boxes = [(o["x"], o["y"], o["w"], o["h"]) for o in graph["objects"].values()]
        names = [o["name"] for o in graph["objects"].values()]
        assert 1 <= len(boxes) <= 4 and len(set(names)) == len(names)
        for i, (x, y, w, h) in enumerate(boxes):
            assert w >= 16 and 0 <= x and x + w <= 96 and 0 <= y and y + h <= 96
            for (x2, y2, w2, h2) in boxes[i + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "overlapping objects"


def test_images_show_each_object_in_its_colour_inside_its_box(world, graphs):
    rgb = json.loads(world.world.read_text())["colors_rgb"]
    for image_id, graph in list(graphs["val"].items())[:12]:
        image = Image.open(world.images / f"{image_id}.jpg").convert("RGB")
        assert image.size == (96, 96)
        for obj in graph["objects"].values():
            color = next(a for a in obj["attributes"] if a in rgb)
            crop = image.crop((obj["x"], obj["y"], obj["x"] + obj["w"], obj["y"] + obj["h"]))
            near = Counter(name for pixel in crop.getdata() for name, value in rgb.items()
                           if sum(abs(p - q) for p, q in zip(pixel, value)) < 60)
            assert near.most_common(1)[0][0] == color, (image_id, obj["name"], color, near)
            assert near[color] >= 0.15 * obj["w"] * obj["h"], (image_id, obj["name"], color, near)


def test_the_same_seed_writes_the_same_files_and_another_seed_does_not(tmp_path):
    first = synthesize(tmp_path / "a", 12, seed=5, image_size=64, workers=1, progress=False)
    again = synthesize(tmp_path / "b", 12, seed=5, image_size=64, workers=2, progress=False)
    other = synthesize(tmp_path / "c", 12, seed=6, image_size=64, workers=1, progress=False)
    for split in ("train", "val", "test"):
        assert first.questions[split].read_bytes() == again.questions[split].read_bytes()
        assert first.scene_graphs[split].read_bytes() == again.scene_graphs[split].read_bytes()
    assert [p.read_bytes() for p in sorted(first.images.iterdir())] == [
        p.read_bytes() for p in sorted(again.images.iterdir())]
    assert first.questions["train"].read_bytes() != other.questions["train"].read_bytes()
    assert Image.open(next(first.images.iterdir())).size == (64, 64)


def test_refuses_to_overwrite_and_rejects_bad_settings(tmp_path, world):
    with pytest.raises(DataError, match=r"already holds questions, sceneGraphs, images, world.json; pass overwrite"):
        synthesize(world.root, 10, progress=False)
    with pytest.raises(DataError, match=r"split fractions must be positive and sum to 1"):
        synthesize(tmp_path / "w", 10, splits=(("train", 0.9), ("val", 0.2)), progress=False)
    with pytest.raises(DataError, match=r"n_scenes=3 is too few for splits"):
        synthesize(tmp_path / "w", 3, splits=(("train", 0.9), ("val", 0.05), ("test", 0.05)), progress=False)


def test_load_synthetic_names_unknown_splits_and_non_worlds(tmp_path, world):
    with pytest.raises(DataError, match=r"unknown split 'dev' .*; known: train, val, test"):
        load_synthetic(world.root, "dev")
    with pytest.raises(DataError) as error:
        load_synthetic(world.root, "tset")
    assert clear_error(error) == (f"unknown split 'tset' of the synthetic world {world.root}; known: train, val, test; "
                                  "did you mean 'test'?")
    with pytest.raises(DataFileNotFoundError, match=r"is not a synthetic world: .*world.json is missing"):
        load_synthetic(tmp_path, "train")


@pytest.mark.parametrize(("text", "problem"), [
    ("", "is empty"),
    ('{"format": "mmscope synthetic GQA world", "splits": {"train": {"scenes"', "is not valid JSON (Expecting ':' "),
    ('{"format": "mmscope synthetic GQA world"}', "needs 'splits' (split name -> counts), as `mmscope data synth` "
                                                  "writes it; found keys format"),
    ("[1, 2]", "needs 'splits' (split name -> counts), as `mmscope data synth` writes it; found list"),
])
def test_a_broken_world_json_is_named(tmp_path, text, problem):
    (tmp_path / "world.json").write_text(text)
    with pytest.raises(MalformedFileError) as error:
        load_synthetic(tmp_path, "train")
    assert clear_error(error).startswith(f"world file {tmp_path / 'world.json'} {problem}")


def test_a_world_drawn_split_by_split_equals_one_drawn_whole(tmp_path):
    """`render=` draws only the splits asked for (the embedded model's first run needs only its test split);
    `render_splits` draws the others later, and every file equals a whole world's, byte for byte."""
    from mmscope.data.synthetic.writing import render_splits, rendered_splits

    whole = synthesize(tmp_path / "whole", 40, seed=9, image_size=64, workers=1, progress=False)
    part = synthesize(tmp_path / "part", 40, seed=9, image_size=64, workers=1, progress=False, render=["test"])
    test_ids = set(json.loads(part.scene_graphs["test"].read_text()))
    assert {path.stem for path in part.images.glob("*.jpg")} == test_ids
    assert rendered_splits(part.root) == ["test"] and rendered_splits(tmp_path / "missing") is None
    for split in ("train", "val", "test"):
        assert part.questions[split].read_bytes() == whole.questions[split].read_bytes()
    render_splits(part.root, ["val", "test"], workers=1, progress=False)
    assert rendered_splits(part.root) == ["test", "val"]
    val_ids = set(json.loads(part.scene_graphs["val"].read_text()))
    assert {path.stem for path in part.images.glob("*.jpg")} == test_ids | val_ids
    for image_id in val_ids | test_ids:
        assert (part.images / f"{image_id}.jpg").read_bytes() == (whole.images / f"{image_id}.jpg").read_bytes()
    with pytest.raises(DataError, match="split 'dev' is not one of"):
        render_splits(part.root, ["dev"], progress=False)

"""load_questions and probe_datasets, the experiments' doors to the data: every bad input is refused up front
with one line naming the folder or file and what would be valid."""

from __future__ import annotations

import json

import pytest
from data_fixtures import QUESTIONS, STUDY_FOLDER, clear_error, synthetic_world, write_gqa
from PIL import Image

from mmscope.data import load_gqa, load_study_csvs, sources
from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError
from mmscope.errors import suggest
from mmscope.experiments.workspace import load_questions, probe_datasets

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory)


def test_suggest_names_the_closest_option_case_aside():
    assert suggest("tset", ["train", "val", "test"]) == "; did you mean 'test'?"
    assert suggest("Val", ["train", "val"]) == "; did you mean 'val'?"
    assert suggest("dev", ["train", "val", "test"]) == ""


def test_a_gqa_folder_gives_its_split_with_images(tmp_path):
    root = write_gqa(tmp_path)
    dataset = load_questions(root, "val")
    assert sorted(dataset["question_id"]) == sorted(set(QUESTIONS) - {"999"})
    assert dataset[0]["image"].size in {(500, 375), (405, 500)}


def test_the_study_csvs_need_the_images_folder(tmp_path):
    with pytest.raises(DataError) as error:
        load_questions(STUDY_FOLDER, "val")
    assert clear_error(error) == (f"{STUDY_FOLDER} is the study's CSV folder: its questions name GQA images but the "
                                  "folder does not hold them; pass the GQA images folder too (--images)")
    images = tmp_path / "images"
    images.mkdir()
    for image_id in set(load_study_csvs(STUDY_FOLDER, categories=["CompareAttr"])["image_id"]):
        Image.new("RGB", (8, 8)).save(images / f"{image_id}.jpg")
    dataset = load_questions(STUDY_FOLDER, "val", images=images, categories=["CompareAttr"], limit=3)
    assert len(dataset) == 3 and dataset[0]["image"].size == (8, 8)


def test_questions_without_an_answer_are_refused_though_load_gqa_keeps_them(tmp_path):
    root = write_gqa(tmp_path)
    questions = root / "questions" / "val_balanced_questions.json"
    unanswered = {qid: {**record, "answer": ""} if qid in ("0123", "777") else record
                  for qid, record in QUESTIONS.items()}
    questions.write_text(json.dumps(unanswered))
    assert sorted(load_gqa(questions)["answer"]).count("") == 2
    with pytest.raises(DataError) as error:
        load_questions(root, "val")
    assert clear_error(error) == (f"2 of 6 questions in {questions} have no answer (the first: question '0123'); "
                                  "experiments score answers, so they need a split with answers (GQA's test and "
                                  "challenge files carry none)")


def test_a_split_whose_questions_carry_neither_answers_nor_types_is_refused(tmp_path):
    root = write_gqa(tmp_path)
    questions = root / "questions" / "test_balanced_questions.json"
    questions.write_text(json.dumps({qid: {"imageId": r["imageId"], "question": r["question"], "isBalanced": True}
                                     for qid, r in QUESTIONS.items()}))
    assert load_gqa(questions)["answer"] == [""] * len(QUESTIONS)
    with pytest.raises(DataError) as error:
        load_questions(root, "test")
    assert clear_error(error).startswith(f"{questions} holds no questions of ChooseAttr, ChooseCat, ChooseRel, "
                                         "CompareAttr, LogicalObj, QueryAttr (questions without types.detailed")


@pytest.mark.parametrize(("split", "hint"), [("vla", "; did you mean 'val'?"), ("dev", "; did you mean 'testdev'?"),
                                             ("train", "")])
def test_an_unknown_gqa_split_lists_the_splits_of_the_folder(tmp_path, split, hint):
    root = write_gqa(tmp_path)
    (root / "testdev_all_questions.json").write_text(json.dumps(QUESTIONS))
    with pytest.raises(DataError) as error:
        load_questions(root, split)
    assert clear_error(error) == f"unknown split {split!r} of the GQA folder {root}; known: val, testdev{hint}"


def test_a_folder_without_questions_or_images_is_named(tmp_path):
    with pytest.raises(DataFileNotFoundError) as error:
        load_questions(tmp_path, "val")
    message = clear_error(error)
    assert message.startswith(f"{tmp_path} is neither a synthetic world (world.json), the study's CSV folder "
                              "(GQA_*.csv), a GQA folder")
    assert message.endswith("nor a table of questions (a .jsonl, .csv or .parquet file, metadata.jsonl, a saved "
                            "dataset)")
    with pytest.raises(DataFileNotFoundError, match=r"data folder '.*nowhere' does not exist"):
        load_questions(tmp_path / "nowhere")
    root = write_gqa(tmp_path / "gqa")
    for image in (root / "images").iterdir():
        image.unlink()
    (root / "images").rmdir()
    with pytest.raises(DataFileNotFoundError) as error:
        load_questions(root, "val")
    assert clear_error(error) == f"the GQA folder {root} has no images/ folder; pass the GQA images folder (--images)"


def test_an_unknown_synthetic_split_suggests_the_closest(world):
    with pytest.raises(DataError) as error:
        load_questions(world.root, "tset")
    assert clear_error(error).endswith("; known: train, val, test; did you mean 'test'?")


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_and_n_images_must_be_at_least_one(world, limit):
    with pytest.raises(DataError) as error:
        load_questions(world.root, "test", limit=limit)
    assert clear_error(error) == f"limit {limit} (--limit): must be at least 1, or omit it for all questions"
    with pytest.raises(DataError) as error:
        probe_datasets(world.root, "test", n_images=limit)
    assert clear_error(error) == f"n_images {limit} (--n-images): must be at least 1"
    with pytest.raises(DataError) as error:
        sources.load_questions(world.root, "test", limit=limit)
    assert clear_error(error) == f"limit {limit}: must be at least 1, or None for all questions"
    with pytest.raises(DataError) as error:
        sources.probe_datasets(world.root, "test", n_images=limit)
    assert clear_error(error) == f"n_images {limit}: must be at least 1"


def test_the_data_sources_read_a_path_as_the_experiments_door_does(world):
    by_source = sources.load_questions(world.root, "test", limit=2)
    assert by_source["question_id"] == load_questions(world.root, "test", limit=2)["question_id"]
    with pytest.raises(DataFileNotFoundError):
        sources.load_questions(world.root / "nowhere")


def test_probe_datasets_name_an_unknown_split_and_a_missing_images_folder(world, tmp_path):
    with pytest.raises(DataError) as error:
        probe_datasets(world.root, "tset")
    assert clear_error(error) == (f"unknown split 'tset' of the scene graphs in {world.root}; known: test, train, val; "
                                  "did you mean 'test'?")
    (tmp_path / "val_sceneGraphs.json").write_text(world.scene_graphs["val"].read_text())
    with pytest.raises(DataFileNotFoundError) as error:
        probe_datasets(tmp_path, "val")
    assert clear_error(error).startswith(f"{tmp_path} has no images/ folder; the probe datasets need the images")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileNotFoundError) as error:
        probe_datasets(empty, "val")
    assert clear_error(error) == f"no scene-graph files (val_sceneGraphs.json …) in {empty} or {empty}/sceneGraphs"


def test_a_corrupt_image_is_named_when_the_experiment_reads_the_row(tmp_path):
    root = write_gqa(tmp_path)
    broken = root / "images" / "2354786.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = load_questions(root, "val", limit=1)
    with pytest.raises(MalformedFileError) as error:
        [row["image"].convert("RGB") for row in dataset]
    assert clear_error(error).startswith(f"image file {broken.resolve()} is not a readable image (")

"""load_gqa on a hand-written fixture in GQA's official layout, on the study's real programs, and on bad input."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import QUESTIONS, SCENE_GRAPHS, STUDY_FOLDER, clear_error, question, write_gqa

from mmscope.data import CATEGORIES, count_answers, load_gqa, load_study_csvs
from mmscope.data.errors import (
    DataError,
    DataFileNotFoundError,
    MalformedFileError,
    MissingImageError,
    UnknownCategoryError,
)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Path:
    return write_gqa(tmp_path_factory.mktemp("gqa"))


@pytest.fixture(scope="module")
def loaded(gqa):
    dataset = load_gqa(gqa / "questions/val_balanced_questions.json", gqa / "sceneGraphs/val_sceneGraphs.json",
                       gqa / "images")
    return {row["question_id"]: row for row in dataset}


def test_question_ids_stay_strings_with_their_leading_zeros(loaded):
    assert set(loaded) == set(QUESTIONS)


def test_detailed_types_map_onto_the_six_categories_and_others_get_none(loaded):
    categories = {qid: row["category"] for qid, row in loaded.items()}
    assert categories == {"05451384": "ChooseAttr", "201307251": "ChooseRel", "0123": "ChooseCat",
                          "777": "CompareAttr", "0888": "LogicalObj", "02452198": "QueryAttr", "999": None}
    assert loaded["0888"]["detailed_type"] == "existThatOrC"


def test_central_objects_come_in_question_order_with_scene_graph_boxes(loaded):
    relation = loaded["201307251"]
    assert relation["object_names"] == ["surfer", "surfboard"]
    assert relation["object_ids"] == ["429128", "429134"]
    assert relation["object_boxes"] == [[290, 77, 74, 110], [258, 157, 43, 22]]
    assert (relation["image_width"], relation["image_height"]) == (500, 375)
    assert loaded["0123"]["object_boxes"] == [[111, 71, 198, 323]]
    assert loaded["777"]["object_names"] == ["marker", "post"]
    assert loaded["02452198"]["object_boxes"] == [[337, 23, 162, 310]]


def test_an_object_the_image_lacks_has_no_id_and_no_box(loaded):
    logical = loaded["0888"]
    assert logical["object_names"] == ["grass", "mud"]
    assert logical["object_ids"] == ["3899215", ""]
    assert logical["object_boxes"] == [[32, 312, 214, 147], []]


def test_choose_questions_get_true_and_false_options_in_answer_form(loaded):
    assert (loaded["05451384"]["true_option"], loaded["05451384"]["false_option"]) == ("empty", "full")
    assert (loaded["201307251"]["true_option"], loaded["201307251"]["false_option"]) == ("right", "left")
    assert (loaded["0123"]["true_option"], loaded["0123"]["false_option"]) == ("bird", "cat")
    assert loaded["02452198"]["true_option"] is None and loaded["777"]["false_option"] is None


def test_answers_are_lower_case_and_full_answers_kept(loaded):
    assert loaded["02452198"]["answer"] == "right"
    assert loaded["05451384"]["full_answer"] == "The jar is empty."
    assert loaded["201307251"]["full_answer"] == ""


def test_images_decode_lazily_to_pil_from_the_images_folder(loaded, gqa):
    row = loaded["0123"]
    assert row["image"].size == (405, 500)
    assert row["image_path"] == str((gqa / "images" / "2375429.jpg").resolve())


def test_without_scene_graphs_or_images_boxes_are_unknown_and_image_path_is_the_file_name(gqa):
    dataset = load_gqa(gqa / "questions/val_balanced_questions.json")
    row = next(r for r in dataset if r["question_id"] == "201307251")
    assert "image" not in dataset.column_names
    assert row["image_path"] == "2354786.jpg"
    assert row["object_names"] == ["surfer", "surfboard"] and row["object_boxes"] == [[], []]
    assert (row["image_width"], row["image_height"]) == (0, 0)


def test_categories_selects_rows_and_unknown_names_are_rejected(gqa):
    questions = gqa / "questions/val_balanced_questions.json"
    assert sorted(load_gqa(questions, categories=["ChooseRel", "QueryAttr"])["question_id"]) == [
        "02452198", "201307251"]
    with pytest.raises(UnknownCategoryError, match=r"unknown category 'ChoseAttr'; known: ChooseAttr, ChooseCat"):
        load_gqa(questions, categories=["ChoseAttr"])


def test_an_empty_category_selection_is_refused(gqa):
    with pytest.raises(DataError, match=r"an empty category selection selects no questions; name some of ChooseAttr"):
        load_gqa(gqa / "questions/val_balanced_questions.json", categories=[])


@pytest.mark.parametrize(("name", "hint"), [("ChooseAtr", "; did you mean 'ChooseAttr'?"),
                                            ("queryattr", "; did you mean 'QueryAttr'?"), ("colour", "")])
def test_an_unknown_category_suggests_the_closest_name(gqa, name, hint):
    with pytest.raises(UnknownCategoryError) as error:
        load_gqa(gqa / "questions/val_balanced_questions.json", categories=[name])
    assert str(error.value) == (f"unknown category {name!r}; known: ChooseAttr, ChooseCat, ChooseRel, CompareAttr, "
                                f"LogicalObj, QueryAttr{hint}")


def test_sharded_all_questions_files_load_together(tmp_path):
    items = list(QUESTIONS.items())
    shards = []
    for i in range(2):
        shard = tmp_path / f"val_all_questions_{i}.json"
        shard.write_text(json.dumps(dict(items[i::2])))
        shards.append(shard)
    assert sorted(load_gqa(shards)["question_id"]) == sorted(QUESTIONS)


def test_an_edited_file_is_read_again_not_served_from_the_cache(tmp_path):
    questions = tmp_path / "val_balanced_questions.json"
    questions.write_text(json.dumps({"1": QUESTIONS["0123"]}))
    assert load_gqa(questions)["answer"] == ["bird"]
    questions.write_text(json.dumps({"1": {**QUESTIONS["0123"], "answer": "cat"}}))
    os.utime(questions, ns=(1, 10**18))
    assert load_gqa(questions)["answer"] == ["cat"]


# ----------------------------------------------------------------------------------------- bad inputs


def test_missing_questions_file_is_named(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="questions file .*nope.json does not exist"):
        load_gqa(tmp_path / "nope.json")


def test_truncated_json_names_the_file(tmp_path):
    broken = tmp_path / "val_balanced_questions.json"
    broken.write_text(json.dumps(QUESTIONS)[:-40])
    with pytest.raises(MalformedFileError, match=r"val_balanced_questions.json is not valid JSON"):
        load_gqa(broken)


def test_a_file_cut_off_mid_record_names_the_file_and_the_last_question_read(tmp_path):
    broken = tmp_path / "val_balanced_questions.json"
    text = json.dumps(QUESTIONS)
    broken.write_text(text[: text.index('"0123"') + 40])
    for read in (load_gqa, count_answers):
        with pytest.raises(MalformedFileError) as error:
            read(broken)
        assert clear_error(error, broken) == (f"questions file {broken} is not valid JSON after entry '201307251': "
                                              "the file ends part-way (truncated?)")


def test_invalid_bytes_are_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "val_balanced_questions.json"
    broken.write_bytes(b'{"1": {"imageId": "1", "question": "\xff"}}')
    with pytest.raises(MalformedFileError, match=r"is not valid JSON: lexical error: invalid bytes in UTF8") as error:
        load_gqa(broken)
    clear_error(error, broken)


@pytest.mark.parametrize("text", ["", "  \n"])
def test_an_empty_questions_file_is_named(tmp_path, text):
    empty = tmp_path / "val_balanced_questions.json"
    empty.write_text(text)
    with pytest.raises(MalformedFileError) as error:
        load_gqa(empty)
    assert clear_error(error, empty).endswith("expected a JSON object ({id: record, …}), found an empty file")


def test_a_json_list_instead_of_an_object_is_rejected(tmp_path):
    wrong = tmp_path / "questions.json"
    wrong.write_text(json.dumps(list(QUESTIONS.values())))
    with pytest.raises(MalformedFileError, match=r"questions.json: expected a JSON object .* found '\['"):
        load_gqa(wrong)


def test_a_record_without_a_question_or_with_bad_types_names_the_question(tmp_path):
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps({"0042": {k: v for k, v in QUESTIONS["777"].items() if k != "question"}}))
    with pytest.raises(MalformedFileError, match=r"question '0042': missing field\(s\) question; found ") as error:
        load_gqa(bad)
    clear_error(error, bad)
    bad.write_text(json.dumps({"0042": {**QUESTIONS["777"], "types": "twoCommon"}}))
    for read in (load_gqa, count_answers):
        with pytest.raises(MalformedFileError, match=r"question '0042': 'types' must be a record") as error:
            read(bad)
        clear_error(error, bad)


def test_a_record_without_image_id_names_the_question(tmp_path):
    bad = tmp_path / "questions.json"
    record = {k: v for k, v in QUESTIONS["777"].items() if k != "imageId"}
    bad.write_text(json.dumps({"0042": record}))
    with pytest.raises(MalformedFileError, match=r"questions.json, question '0042': missing field\(s\) imageId"):
        load_gqa(bad)


def test_a_missing_image_names_the_question_and_the_path(tmp_path):
    root = write_gqa(tmp_path, images=("2354786",))
    with pytest.raises(MissingImageError, match=r"question '(0123|777|0888)': image file .*2375429.jpg is missing"):
        load_gqa(root / "questions/val_balanced_questions.json", images=root / "images")


def test_skipping_missing_images_warns_with_a_count(tmp_path):
    root = write_gqa(tmp_path, images=("2354786",))
    with pytest.warns(UserWarning, match=r"skipped 3 of 7 questions whose image file is missing"):
        dataset = load_gqa(root / "questions/val_balanced_questions.json", images=root / "images",
                           on_missing_image="skip")
    assert sorted(dataset["image_id"]) == ["2354786"] * 4


def test_images_absent_from_the_scene_graphs_are_counted_in_a_warning(tmp_path):
    graphs = {"2354786": SCENE_GRAPHS["2354786"]}
    root = write_gqa(tmp_path, graphs=graphs, images=("2354786",))
    with pytest.warns(UserWarning, match=r"3 of 7 questions refer to images absent from .*val_sceneGraphs.json"):
        dataset = load_gqa(root / "questions/val_balanced_questions.json", root / "sceneGraphs/val_sceneGraphs.json")
    assert len(dataset) == 7


def test_objects_absent_from_their_scene_graph_are_counted_in_a_warning(tmp_path):
    graphs = json.loads(json.dumps(SCENE_GRAPHS))
    del graphs["2375429"]["objects"]["177850"]
    root = write_gqa(tmp_path, graphs=graphs)
    with pytest.warns(UserWarning, match=r"1 object reference\(s\) in question programs name object ids absent"):
        dataset = load_gqa(root / "questions/val_balanced_questions.json", root / "sceneGraphs/val_sceneGraphs.json")
    row = next(r for r in dataset if r["question_id"] == "777")
    assert row["object_ids"] == ["177848", "177850"] and row["object_boxes"] == [[10, 20, 30, 40], []]


def test_a_scene_graph_without_boxes_names_image_and_object(tmp_path):
    graphs = json.loads(json.dumps(SCENE_GRAPHS))
    del graphs["2375429"]["objects"]["177850"]["w"]
    root = write_gqa(tmp_path, graphs=graphs)
    with pytest.raises(MalformedFileError, match=r"image '2375429', object '177850', field 'w'"):
        load_gqa(root / "questions/val_balanced_questions.json", root / "sceneGraphs/val_sceneGraphs.json")


@pytest.mark.parametrize("cut", ["", "truncated"])
def test_an_empty_or_truncated_scene_graph_file_is_named(tmp_path, cut):
    root = write_gqa(tmp_path)
    graphs = root / "sceneGraphs/val_sceneGraphs.json"
    graphs.write_text(json.dumps(SCENE_GRAPHS)[:-30] if cut else "")
    with pytest.raises(MalformedFileError) as error:
        load_gqa(root / "questions/val_balanced_questions.json", graphs)
    expected = "is not valid JSON after entry '2354786': the file ends part-way" if cut else "found an empty file"
    assert expected in clear_error(error, f"scene-graph file {graphs}")


def test_a_scene_graph_object_without_x_names_file_image_and_object(tmp_path):
    graphs = json.loads(json.dumps(SCENE_GRAPHS))
    del graphs["2354786"]["objects"]["429134"]["x"]
    root = write_gqa(tmp_path, graphs=graphs)
    path = root / "sceneGraphs/val_sceneGraphs.json"
    with pytest.raises(MalformedFileError) as error:
        load_gqa(root / "questions/val_balanced_questions.json", path)
    assert clear_error(error) == (f"scene-graph file {path}, image '2354786', object '429134', field 'x': expected a "
                                  "number, found None")


@pytest.mark.parametrize("content", [b"not a jpeg at all", b"", "truncated"])
def test_an_image_file_that_is_not_an_image_fails_on_access_naming_the_file(tmp_path, content):
    root = write_gqa(tmp_path)
    broken = root / "images" / "2375429.jpg"
    broken.write_bytes(broken.read_bytes()[:400] if content == "truncated" else content)
    dataset = load_gqa(root / "questions/val_balanced_questions.json", images=root / "images")
    rows = {row_id: index for index, row_id in enumerate(dataset["question_id"])}
    assert dataset[rows["05451384"]]["image"].size == (500, 375)
    index = rows["0123"]
    for read in (lambda: dataset[index], lambda: dataset["image"][index], lambda: dataset[index:]["image"],
                 lambda: list(dataset), lambda: dataset.with_format("torch")[:]):
        with pytest.raises(MalformedFileError, match=r"is not a readable image \(") as error:
            read()
        assert clear_error(error, f"image file {broken.resolve()}").endswith(
            "replace it, or delete it and load with on_missing_image='skip' to drop its rows")


def test_an_image_deleted_after_loading_is_a_missing_image(tmp_path):
    root = write_gqa(tmp_path)
    dataset = load_gqa(root / "questions/val_balanced_questions.json", images=root / "images")
    (root / "images" / "2375429.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"2375429.jpg no longer exists") as error:
        list(dataset)
    clear_error(error)


def test_unknown_on_missing_image_policy_is_rejected(gqa):
    with pytest.raises(ValueError, match=r"unknown on_missing_image 'ignore'; known: error, skip"):
        load_gqa(gqa / "questions/val_balanced_questions.json", on_missing_image="ignore")


# ------------------------------------------------------------------------ the study's real programs


def test_programs_of_the_study_questions_give_the_objects_and_options_of_its_csv_columns(tmp_path):
    """The excerpt's 240 real GQA programs, read by load_gqa, agree with the study's own object and option columns."""
    records = {}
    for path in sorted(STUDY_FOLDER.glob("GQA_val_correct_question_with_*.csv")):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for row in frame.to_dict("records"):
            records[row["question_id"]] = question(row["img_id"], row["question"], row["answer"],
                                                   row["type_detailed"], ast.literal_eval(row["operations"]))
    questions = tmp_path / "val_study_questions.json"
    questions.write_text(json.dumps(records))
    from_programs = {row["question_id"]: row for row in load_gqa(questions)}
    from_columns = load_study_csvs(STUDY_FOLDER)
    assert len(from_programs) == len(from_columns) == 240
    for expected in from_columns:
        got = from_programs[expected["question_id"]]
        assert got["category"] == expected["category"] in CATEGORIES
        for column in ("object_names", "object_ids", "true_option", "false_option", "answer"):
            assert got[column] == expected[column], (expected["question"], column)

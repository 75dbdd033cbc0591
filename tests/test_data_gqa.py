"""load_gqa on a hand-written fixture in GQA's official layout, on the study's real programs, and on bad input."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import STUDY_FOLDER
from PIL import Image

from mmscope.data import CATEGORIES, load_gqa, load_study_csvs
from mmscope.data.errors import (
    DataFileNotFoundError,
    MalformedFileError,
    MissingImageError,
    UnknownCategoryError,
)


def step(operation, argument, dependencies=()):
    return {"operation": operation, "dependencies": list(dependencies), "argument": argument}


def question(image_id, text, answer, detailed, program, full_answer=""):
    return {
        "imageId": image_id, "question": text, "answer": answer, "fullAnswer": full_answer, "isBalanced": True,
        "groups": {"global": None, "local": "x"}, "entailed": [], "equivalent": [],
        "types": {"structural": "s", "semantic": "t", "detailed": detailed},
        "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}, "semantic": program, "semanticStr": "",
    }


QUESTIONS = {
    "05451384": question("2354786", "Is the jar full or empty?", "empty", "chooseAttr",
                         [step("select", "jar (496168)"), step("choose", "empty|full", [0])], "The jar is empty."),
    "201307251": question("2354786", "Is the surfer to the left or to the right of the surfboard?", "right",
                          "relChooser", [step("select", "surfboard (429134)"),
                                         step("choose rel", "surfer,to the right of|to the left of,s (429128)", [0])]),
    "0123": question("2375429", "Which kind of animal is this, a cat or a bird?", "bird", "categoryThisChoose",
                     [step("select", "animal (2489116)"), step("choose name", "bird|cat", [0])]),
    "777": question("2375429", "What do the marker and the post have in common?", "color", "twoCommon",
                    [step("select", "marker (177848)"), step("select", "post (177850) "), step("common", "", [0, 1])]),
    "0888": question("2375429", "Is there any grass or mud that is not brown?", "no", "existThatOrC",
                     [step("select", "grass (3899215)"), step("filter color", "not(brown)", [0]),
                      step("exist", "?", [1]), step("select", "mud (-) "), step("filter color", "not(brown)", [3]),
                      step("exist", "?", [4]), step("or", "", [2, 5])]),
    "02452198": question("2354786", "On which side of the photo is the curtain?", "Right", "positionQuery",
                         [step("select", "curtain (681425)"), step("query", "hposition", [0])]),
    "999": question("2354786", "What color is the jar?", "brown", "directOf",
                    [step("select", "jar (496168)"), step("query", "color", [0])]),
}

SCENE_GRAPHS = {
    "2354786": {"width": 500, "height": 375, "objects": {
        "496168": {"name": "jar", "x": 253, "y": 291, "w": 60, "h": 105, "attributes": ["empty"], "relations": []},
        "429134": {"name": "surfboard", "x": 258, "y": 157, "w": 43, "h": 22, "attributes": [], "relations": []},
        "429128": {"name": "surfer", "x": 290, "y": 77, "w": 74, "h": 110, "attributes": [],
                   "relations": [{"name": "to the right of", "object": "429134"}]},
        "681425": {"name": "curtain", "x": 337, "y": 23, "w": 162, "h": 310, "attributes": [], "relations": []},
    }},
    "2375429": {"width": 405, "height": 500, "objects": {
        "2489116": {"name": "bird", "x": 111, "y": 71, "w": 198, "h": 323, "attributes": [], "relations": []},
        "177848": {"name": "marker", "x": 10, "y": 20, "w": 30, "h": 40, "attributes": ["white"], "relations": []},
        "177850": {"name": "post", "x": 50, "y": 60, "w": 70, "h": 80, "attributes": ["white"], "relations": []},
        "3899215": {"name": "grass", "x": 32, "y": 312, "w": 214, "h": 147, "attributes": [], "relations": []},
    }},
}


def write_gqa(root: Path, questions=QUESTIONS, graphs=SCENE_GRAPHS, images=("2354786", "2375429")) -> Path:
    """A GQA folder in the official layout: questions/, sceneGraphs/, images/."""
    for folder in ("questions", "sceneGraphs", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "questions" / "val_balanced_questions.json").write_text(json.dumps(questions))
    (root / "sceneGraphs" / "val_sceneGraphs.json").write_text(json.dumps(graphs))
    for image_id in images:
        Image.new("RGB", (graphs[image_id]["width"], graphs[image_id]["height"]), "white").save(
            root / "images" / f"{image_id}.jpg")
    return root


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


def test_a_json_list_instead_of_an_object_is_rejected(tmp_path):
    wrong = tmp_path / "questions.json"
    wrong.write_text(json.dumps(list(QUESTIONS.values())))
    with pytest.raises(MalformedFileError, match=r"questions.json: expected a JSON object .* found '\['"):
        load_gqa(wrong)


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


def test_unknown_on_missing_image_policy_is_rejected(gqa):
    with pytest.raises(ValueError, match=r"unknown on_missing_image 'ignore'; known: error, skip"):
        load_gqa(gqa / "questions/val_balanced_questions.json", on_missing_image="ignore")


# ------------------------------------------------------------------------ the study's real programs


def test_programs_of_the_study_questions_give_the_objects_and_options_of_its_csv_columns(tmp_path):
    """All 5525 real GQA programs, read by load_gqa, agree with the study's own object and option columns."""
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
    assert len(from_programs) == len(from_columns) == 5525
    for expected in from_columns:
        got = from_programs[expected["question_id"]]
        assert got["category"] == expected["category"] in CATEGORIES
        for column in ("object_names", "object_ids", "true_option", "false_option", "answer"):
            assert got[column] == expected[column], (expected["question"], column)

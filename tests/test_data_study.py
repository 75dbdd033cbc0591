"""load_study_csvs on the six real CSVs of the study (their first 40 rows each, tests/data/gqa_cmif), and on broken
copies of them."""

from __future__ import annotations

import csv
import io
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import STUDY_FOLDER, clear_error
from PIL import Image

from mmscope.data import CATEGORIES, load_study_csvs
from mmscope.data.errors import (
    DataError,
    DataFileNotFoundError,
    MalformedFileError,
    MissingImageError,
    UnknownCategoryError,
)


@pytest.fixture(scope="module")
def study():
    return load_study_csvs(STUDY_FOLDER)


@pytest.fixture(scope="module")
def by_id(study):
    return {row["question_id"]: row for row in study}


def copy_of_study(tmp_path: Path) -> Path:
    folder = tmp_path / "gqa_cmif"
    shutil.copytree(STUDY_FOLDER, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def test_the_six_files_load_with_their_row_counts(study):
    assert Counter(study["category"]) == {category: 40 for category in CATEGORIES}
    assert list(dict.fromkeys(study["category"])) == list(CATEGORIES)


def test_ids_are_strings_that_keep_their_leading_zeros(study, by_id):
    assert all(isinstance(qid, str) for qid in study["question_id"])
    assert sum(qid.startswith("0") for qid in study["question_id"]) == 130  # about half, as in the whole files
    assert by_id["00556075"]["question"] == "What is this, a cabinet or a bed?"
    assert by_id["00556075"]["image_id"] == "2321256"


def test_boxes_come_from_the_columns_as_x_y_w_h(by_id):
    bird = by_id["19817684"]
    assert bird["object_names"] == ["animal"] and bird["object_ids"] == ["2489116"]
    assert bird["object_boxes"] == [[111, 71, 198, 323]]
    assert (bird["image_width"], bird["image_height"]) == (405, 500)
    assert (bird["true_option"], bird["false_option"]) == ("bird", "cat")


def test_two_object_questions_list_objects_in_question_order(by_id):
    surfer = by_id["13515212"]  # object1 in the CSV is the surfboard, but the question names the surfer first
    assert surfer["question"] == "Is the surfer to the left or to the right of the surfboard?"
    assert surfer["object_names"] == ["surfer", "surfboard"]
    assert surfer["object_boxes"] == [[290, 77, 74, 110], [258, 157, 43, 22]]


def test_an_object_marked_absent_has_no_id_and_no_box(by_id):
    grass = by_id["12824169"]
    assert grass["object_names"] == ["grass", "mud"]
    assert grass["object_ids"] == ["3899215", ""] and grass["object_boxes"] == [[32, 312, 214, 147], []]


def test_options_only_for_choose_categories_and_full_answers_only_where_given(study):
    for row in study:
        choose = row["category"].startswith("Choose")
        assert (row["true_option"] is not None) == choose
        if choose:
            assert row["true_option"] == row["answer"] != row["false_option"]
        assert (row["full_answer"] != "") == (row["category"] == "ChooseAttr")


def test_categories_loads_a_subset_and_rejects_unknown_names():
    assert Counter(load_study_csvs(STUDY_FOLDER, categories=["CompareAttr"])["category"]) == {"CompareAttr": 40}
    with pytest.raises(UnknownCategoryError, match=r"unknown category 'ChoseAttr'; known: ChooseAttr, ChooseCat, "
                                                   r"ChooseRel, CompareAttr, LogicalObj, QueryAttr"):
        load_study_csvs(STUDY_FOLDER, categories=["ChoseAttr"])


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    folder = copy_of_study(tmp_path)
    path = next(folder.glob("*_ChooseRel.csv"))
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["object2 x"]).to_csv(path, index=False)
    with pytest.raises(MalformedFileError, match=r"_ChooseRel.csv lacks column\(s\) 'object2 x'; a ChooseRel file"):
        load_study_csvs(folder)


def test_a_file_named_after_an_unknown_category_is_rejected(tmp_path):
    folder = copy_of_study(tmp_path)
    path = next(folder.glob("*_ChooseAttr.csv"))
    path.rename(path.with_name("GQA_val_correct_question_with_choose_ChoseAttr.csv"))
    with pytest.raises(UnknownCategoryError, match=r"unknown category 'ChoseAttr' in the file name .*ChoseAttr.csv"):
        load_study_csvs(folder)


def test_a_missing_category_file_says_what_was_expected(tmp_path):
    folder = copy_of_study(tmp_path)
    next(folder.glob("*_QueryAttr.csv")).unlink()
    with pytest.raises(DataFileNotFoundError, match=r"no study CSV for QueryAttr .* expected "
                                                     r"GQA_val_correct_question_with_\*_QueryAttr.csv"):
        load_study_csvs(folder)


def test_a_row_of_the_wrong_type_names_the_row(tmp_path):
    folder = copy_of_study(tmp_path)
    path = next(folder.glob("*_CompareAttr.csv"))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[2, "type_detailed"] = "twoSame"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"row 3 \(question '{frame.loc[2, 'question_id']}'\): type_detailed "
                                        r"'twoSame' does not belong to CompareAttr"):
        load_study_csvs(folder)


def test_missing_images_are_an_error_or_skipped_with_a_count(tmp_path, study):
    images = tmp_path / "images"
    images.mkdir()
    present = set(study.filter(lambda row: row["category"] == "CompareAttr")["image_id"])
    for image_id in present:
        Image.new("RGB", (8, 8)).save(images / f"{image_id}.jpg")
    with pytest.raises(MissingImageError, match=r"question '\d+': image file .*\.jpg is missing"):
        load_study_csvs(STUDY_FOLDER, images)
    absent = sum(image_id not in present for image_id in study["image_id"])
    with pytest.warns(UserWarning, match=rf"skipped {absent} of 240 questions"):
        kept = load_study_csvs(STUDY_FOLDER, images, on_missing_image="skip")
    assert len(kept) == 240 - absent and kept[0]["image"].size == (8, 8)


def broken_copy(tmp_path: Path, category: str, edit) -> Path:
    """A copy of the study folder whose `category` CSV text is replaced by `edit(text)`; returns that CSV."""
    path = next(copy_of_study(tmp_path).glob(f"*_{category}.csv"))
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: "", "is empty: expected a header line, then one row per question"),
    (lambda text: "\n", "is empty: expected a header line, then one row per question"),
    (lambda text: text.splitlines(keepends=True)[0], "has a header but no rows; a LogicalObj file lists its questions"),
])
def test_an_empty_study_csv_is_named(tmp_path, edit, message):
    path = broken_copy(tmp_path, "LogicalObj", edit)
    with pytest.raises(MalformedFileError) as error:
        load_study_csvs(path.parent)
    assert clear_error(error) == f"study CSV {path} {message}"


def test_a_truncated_study_csv_names_the_file_and_the_row(tmp_path):
    path = broken_copy(tmp_path, "QueryAttr", lambda text: text[: text.index("\n", len(text) // 2) + 30])
    with pytest.raises(MalformedFileError, match=r", row \d+: \d+ fields where the header has \d+ \(a truncated file") \
            as error:
        load_study_csvs(path.parent)
    clear_error(error, f"study CSV {path}")


def test_an_extra_field_an_unclosed_quote_or_bytes_that_are_not_utf8_are_named(tmp_path):
    frame = pd.read_csv(next(STUDY_FOLDER.glob("*_ChooseCat.csv")), dtype=str, keep_default_na=False)
    rows = [list(frame.columns), *frame.values.tolist()]
    rows[2].append("extra")
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    path = broken_copy(tmp_path, "ChooseCat", lambda _: text.getvalue())
    with pytest.raises(MalformedFileError, match=rf", row 2: {frame.shape[1] + 1} fields where the header has "
                                                 rf"{frame.shape[1]} ") as error:
        load_study_csvs(path.parent)
    clear_error(error, f"study CSV {path}")
    path.write_text(path.read_text().split("\n")[0] + '\n1,2\n"123,unclosed\n', encoding="utf-8")
    with pytest.raises(MalformedFileError) as error:
        load_study_csvs(path.parent)
    assert clear_error(error) == (f"study CSV {path}, row 2: cannot be parsed (unexpected end of data; an unclosed "
                                  "quote?)")
    path.write_bytes(b"question_id,img_id\n\xff\xfe,1\n")
    with pytest.raises(MalformedFileError, match=r"is not UTF-8 text: 'utf-8' codec can't decode") as error:
        load_study_csvs(path.parent)
    clear_error(error, f"study CSV {path}")


def test_a_repeated_column_or_a_row_without_answer_is_named(tmp_path):
    path = broken_copy(tmp_path, "CompareAttr", lambda text: text.replace("img_id", "question", 1))
    with pytest.raises(MalformedFileError, match=r"column\(s\) 'question' appear twice") as error:
        load_study_csvs(path.parent)
    clear_error(error, f"study CSV {path}")
    frame = pd.read_csv(STUDY_FOLDER / path.name, dtype=str, keep_default_na=False)
    frame.loc[4, "answer"] = ""
    frame.to_csv(path, index=False)
    with pytest.raises(MalformedFileError, match=r"row 5 \(question '\d+'\): no answer; the study's CSVs hold "
                                                 r"questions answered correctly") as error:
        load_study_csvs(path.parent)
    clear_error(error, f"study CSV {path}")

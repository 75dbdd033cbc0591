"""The study's question sets: six CSVs of GQA validation questions, one per category.

The cross-modal information-flow study ran its experiments on questions LLaVA answered correctly, saved as
`GQA_val_correct_question_with_{types}_{Category}.csv` (ChooseAttr 1000, ChooseCat 1000, ChooseRel 964,
CompareAttr 570, LogicalObj 991, QueryAttr 1000 rows). `load_study_csvs` reads them into the same rows as
`load_gqa`, so that anyone with the GQA images can rerun exactly those questions.

The files come in two layouts: one central object (`central object name/id/x/y/w/h` — ChooseAttr, ChooseCat,
QueryAttr) or two (`object1 …`, `object2 …` — ChooseRel, CompareAttr, LogicalObj), with "-" for an object the
image does not contain. Ids are read as strings (about half start with 0). Objects are put in question order
and a repeated object (GQA sometimes selects the same object twice) is listed once, as in `load_gqa`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from mmscope.data.categories import CATEGORIES, category_of, check_categories, check_category
from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError
from mmscope.data.program import order_by_question
from mmscope.data.rows import QUESTION_FEATURES, attach_images, check_on_missing_image, existing_folder, image_path

STUDY_FILE_PREFIX = "GQA_val_correct_question_with_"

_COMMON_COLUMNS = ("question_id", "img_id", "question", "answer", "type_detailed", "image_w", "image_h")
_BOX = ("x", "y", "w", "h")
_ONE_OBJECT = ("central object",)
_TWO_OBJECTS = ("object1", "object2")
_OBJECT_PREFIXES = {"ChooseAttr": _ONE_OBJECT, "ChooseCat": _ONE_OBJECT, "QueryAttr": _ONE_OBJECT,
                    "ChooseRel": _TWO_OBJECTS, "CompareAttr": _TWO_OBJECTS, "LogicalObj": _TWO_OBJECTS}
_WITH_OPTIONS = ("ChooseAttr", "ChooseCat", "ChooseRel")


def required_columns(category: str) -> list[str]:
    """The columns a study CSV of `category` must have."""
    columns = list(_COMMON_COLUMNS)
    for prefix in _OBJECT_PREFIXES[category]:
        columns += [f"{prefix} name", f"{prefix} id"] + [f"{prefix} {k}" for k in _BOX]
    if category in _WITH_OPTIONS:
        columns += ["true option", "false option"]
    return columns


def study_files(folder: Path, categories: Sequence[str]) -> dict[str, Path]:
    """Category -> CSV path for the requested categories; every study-named file must end in a known category."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob(f"{STUDY_FILE_PREFIX}*.csv")):
        category = path.stem.rsplit("_", 1)[-1]
        check_category(category, where=f"the file name {path}")
        found.setdefault(category, []).append(path)
    files = {}
    for category in categories:
        paths = found.get(category, [])
        if not paths:
            present = ", ".join(p.name for p in sorted(folder.glob("*.csv"))) or "no CSV files"
            raise DataFileNotFoundError(
                f"no study CSV for {category} in {folder}: expected {STUDY_FILE_PREFIX}*_{category}.csv; "
                f"found {present}"
            )
        if len(paths) > 1:
            raise DataError(f"several study CSVs for {category} in {folder}: {', '.join(p.name for p in paths)}")
        files[category] = paths[0]
    return files


def _box(row: dict[str, str], prefix: str, where: str) -> list[float]:
    values = [row[f"{prefix} {k}"].strip() for k in _BOX]
    if all(v == "-" for v in values):
        return []
    try:
        return [float(v) for v in values]
    except ValueError:
        raise MalformedFileError(f"{where}: box columns '{prefix} x/y/w/h' must be numbers or '-', "
                                 f"found {values}") from None


def _int(value: str, where: str, column: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise MalformedFileError(f"{where}: column {column!r} must be a number, found {value!r}") from None


def _csv_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and records of a study CSV, every row checked to have exactly the header's fields.

    Raises `MalformedFileError` naming the file (and the row) for an empty file, a repeated column name, an
    unparsable line (an unclosed quote …) or a row with fewer or more fields than the header (a truncated file).
    """
    header, records = None, []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, strict=True)
        try:
            header = reader.fieldnames
            for record in reader:
                records.append(record)
        except csv.Error as error:
            where = f"row {len(records) + 1}" if header is not None else "header line"
            raise MalformedFileError(
                f"study CSV {path}, {where}: cannot be parsed ({error}; an unclosed quote?)") from None
        except UnicodeDecodeError as error:
            raise MalformedFileError(f"study CSV {path} is not UTF-8 text: {error}") from None
    if not header:
        raise MalformedFileError(f"study CSV {path} is empty: expected a header line, then one row per question")
    if len(set(header)) < len(header):
        repeated = sorted({name for name in header if header.count(name) > 1})
        raise MalformedFileError(f"study CSV {path}: column(s) {', '.join(map(repr, repeated))} appear twice")
    for number, record in enumerate(records, start=1):
        extra, absent = len(record.get(None, ())), sum(value is None for value in record.values())
        if extra or absent:
            raise MalformedFileError(f"study CSV {path}, row {number}: {len(header) + extra - absent} fields where "
                                     f"the header has {len(header)} (a truncated file, or a comma in an unquoted "
                                     "value?)")
    return header, records


def read_study_csv(path: Path, category: str, images: Path | None) -> list[dict]:
    """The rows of one study CSV, checked against its category's columns and detailed types."""
    header, records = _csv_records(path)
    needed = required_columns(category)
    missing = [column for column in needed if column not in header]
    if missing:
        raise MalformedFileError(
            f"study CSV {path} lacks column(s) {', '.join(map(repr, missing))}; a {category} file needs: "
            f"{', '.join(needed)}"
        )
    if not records:
        raise MalformedFileError(f"study CSV {path} has a header but no rows; a {category} file lists its questions")
    rows = []
    for number, row in enumerate(records, start=1):
        where = f"study CSV {path}, row {number} (question {row['question_id']!r})"
        if category_of(row["type_detailed"]) != category:
            raise DataError(f"{where}: type_detailed {row['type_detailed']!r} does not belong to {category} "
                            f"(its category: {category_of(row['type_detailed'])})")
        if not row["answer"].strip():
            raise MalformedFileError(f"{where}: no answer; the study's CSVs hold questions answered correctly, "
                                     "each with its answer")
        objects = []
        for prefix in _OBJECT_PREFIXES[category]:
            object_id = row[f"{prefix} id"].strip()
            entry = (row[f"{prefix} name"].strip(), "" if object_id == "-" else object_id, _box(row, prefix, where))
            if not any(entry[:2] == seen[:2] for seen in objects):
                objects.append(entry)
        objects = order_by_question(objects, [name for name, _, _ in objects], row["question"])
        with_options = category in _WITH_OPTIONS
        rows.append({
            "question_id": row["question_id"].strip(),
            "image_id": row["img_id"].strip(),
            "question": row["question"],
            "answer": row["answer"].strip().lower(),
            "full_answer": row.get("full answer", ""),
            "category": category,
            "detailed_type": row["type_detailed"],
            "true_option": row["true option"].strip().lower() if with_options else None,
            "false_option": row["false option"].strip().lower() if with_options else None,
            "object_names": [name for name, _, _ in objects],
            "object_ids": [object_id for _, object_id, _ in objects],
            "object_boxes": [box for _, _, box in objects],
            "image_width": _int(row["image_w"], where, "image_w"),
            "image_height": _int(row["image_h"], where, "image_h"),
            "image_path": image_path(images, f"{row['img_id'].strip()}.jpg"),
        })
    return rows


def load_study_csvs(
    folder: str | Path,
    images: str | Path | None = None,
    *,
    categories: Sequence[str] | None = None,
    on_missing_image: str = "error",
) -> Dataset:
    """The study's question sets as one `Dataset` of `QUESTION_FEATURES` rows, categories in `CATEGORIES` order.

    Args:
        folder: the folder holding the six `GQA_val_correct_question_with_*_{Category}.csv` files.
        images: GQA's images folder (`{imageId}.jpg`), if you have it; adds the `image` column.
        categories: load only these categories (default: all six).
        on_missing_image: "error" (default) or "skip" (drop the question, warn with a count).

    Raises:
        DataFileNotFoundError: the folder or a category's CSV is missing (the message lists what is there).
        MalformedFileError: a missing column (named, with the full list needed) or an unparsable value.
        UnknownCategoryError: an unknown name in `categories` or a study-named file whose suffix is no category.
    """
    check_on_missing_image(on_missing_image)
    folder = existing_folder(folder, "study CSV folder")
    images_dir = existing_folder(images, "images folder") if images is not None else None
    wanted = check_categories(categories)
    selected = [category for category in CATEGORIES if category in wanted]
    files = study_files(folder, selected)
    rows = [row for category in selected for row in read_study_csv(files[category], category, images_dir)]
    dataset = Dataset.from_list(rows, features=QUESTION_FEATURES)
    return attach_images(dataset, images_dir, on_missing_image, "question_id")

"""A table of questions in the formats `datasets` reads, as rows of `QUESTION_FEATURES`: bring your own VQA data.

Any table with an image, a question and an answer per row runs through every experiment. Accepted sources:

- a JSONL / JSON / CSV / Parquet file (`datasets.load_dataset`), or a folder of such files of one format (one
  file is one table; several are splits named by their file names, `train.jsonl`, `test.jsonl` …);
- a saved dataset (a `Dataset.save_to_disk` or `DatasetDict.save_to_disk` folder, `datasets.load_from_disk`);
- an image folder in the `datasets` "imagefolder" convention: a folder with `metadata.jsonl` (or `.csv`,
  `.parquet`) whose `file_name` column names each row's image, relative to the folder.

The image column holds either file paths (absolute, or relative to the table file's folder — for a saved
dataset, to its folder) or the images themselves (a `datasets.Image` column, or raw image bytes as Parquet
stores them). Images are never opened here: the `image` column is an `ImageFile` feature that decodes a row's
image when the row is read. The imagefolder metadata is read as a table rather than through `load_dataset
("imagefolder")`, which joins metadata to the files it finds and so would drop a row whose image is missing
without a word.

Columns are found by their usual names (`TABLE_COLUMNS`); `columns` maps a role to another name
(`{"question": "q", "answer": "label"}`, the command line's `--columns question=q,answer=label`). A mapped or
required column the table lacks is an error naming it and the columns present. Optional roles:

| role | default column | without it |
| --- | --- | --- |
| `question_id` | `question_id` | the row's number in the table |
| `image_id` | `image_id` | the image file's name without suffix (the question id for an image without a path) |
| `category` | `category` | every question is in one group, `ONE_GROUP` |
| `boxes` | `boxes`, `object_boxes` | no object boxes; else a list of `[x, y, w, h]` in image pixels, one per object (or one box alone; in a CSV, as JSON text) |

A row that cannot be used — its image file is missing, it has no image, an empty question, no answer, or (with a
category column) no category — is left out and counted by reason: `load_table` warns with the counts, and
refuses a table none of whose rows can be used. A table of GQA's six categories works with `--categories` as
GQA does; any other category names are the table's own groups.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, DatasetInfo, Features
from datasets.table import InMemoryTable

from mmscope.data.columns import TABLE_COLUMNS
from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError
from mmscope.data.rows import QUESTION_FEATURES, ImageFile, check_split
from mmscope.errors import known, suggest

REQUIRED_COLUMNS = ("image", "question", "answer")
ONE_GROUP = "all"  # the category of every question of a table without a category column
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json")
UNUSABLE = ("missing image file", "no image", "empty question", "no answer", "no category")


def table_files(folder: Path) -> list[Path]:
    """The data files directly in `folder` that make it a table (a folder's own metadata file first)."""
    metadata = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    return metadata[:1] or sorted(path for path in folder.iterdir() if path.suffix in TABLE_SUFFIXES)


def is_table(path: Path) -> bool:
    """Whether `path` is a source `load_table` reads: a data file, a saved dataset, or a folder of data files."""
    if path.is_file():
        return path.suffix in TABLE_SUFFIXES
    return path.is_dir() and (any((path / name).is_file() for name in SAVED_DATASET_FILES)
                              or bool(table_files(path)))


def _one_split(tables: Dataset | DatasetDict, split: str, where: str) -> Dataset:
    """A single table as it is; of several splits, `split` (an unknown one is refused, naming the splits)."""
    if isinstance(tables, Dataset):
        return tables
    if len(tables) == 1:
        return next(iter(tables.values()))
    check_split(split, list(tables), where)
    return tables[split]


def read_table(path: Path, split: str) -> tuple[Dataset, Path]:
    """The raw table at `path` (one split of it) and the folder its relative image paths start from."""
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        return _one_split(datasets.load_from_disk(str(path)), split, f"the saved dataset {path}"), path
    files = [path] if path.is_file() else table_files(path)
    if not files:
        raise DataFileNotFoundError(f"{path} holds no table of questions ({known(TABLE_SUFFIXES)} file, "
                                    f"{known(METADATA_FILES)} or a saved dataset)")
    builders = {TABLE_SUFFIXES.get(file.suffix) for file in files}
    if len(builders) != 1 or None in builders:
        raise DataError(f"{path} holds tables of several formats ({known(file.name for file in files)}); keep one "
                        "format per folder, or pass one file as --data")
    [builder] = builders
    splits = {"train": [str(files[0])]} if len(files) == 1 else {file.stem: [str(file)] for file in files}
    try:
        tables = datasets.load_dataset(builder, data_files=splits)
    except (ValueError, pa.ArrowInvalid, datasets.exceptions.DatasetGenerationError) as error:
        reason = " ".join(str(error.__cause__ or error).split())
        raise MalformedFileError(f"{path} is not a readable {builder} table: {reason}") from None
    return _one_split(tables, split, f"the tables in {path}"), files[0].parent


def resolve_columns(present: Sequence[str], columns: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """Role -> the table's column that fills it: mapped ones, then the usual names; the required ones must be
    there. A mapped column that is absent, or a required role without a column, is an error naming it and the
    columns present."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(TABLE_COLUMNS))
    if unknown:
        raise DataError(f"unknown column role {unknown[0]!r}; known: {known(TABLE_COLUMNS)}"
                        f"{suggest(unknown[0], TABLE_COLUMNS)}")
    found = {}
    for role, names in TABLE_COLUMNS.items():
        if role in columns:
            if columns[role] not in present:
                raise DataError(f"column {columns[role]!r} (mapped to {role}) is not in {where}; its columns: "
                                f"{known(present)}{suggest(columns[role], present)}")
            found[role] = columns[role]
        elif name := next((name for name in names if name in present), None):
            found[role] = name
        elif role in REQUIRED_COLUMNS:
            raise DataError(f"{where} has no {role} column ({' or '.join(map(repr, names))}); its columns: "
                            f"{known(present)}; name it with --columns {role}=COLUMN")
    return found


def image_records(source: Dataset, column: str, base: Path, where: str) -> pa.StructArray:
    """The image column as `datasets.Image` storage ({bytes, path} per row, path absolute; both null: no image),
    whatever form it has in the table: paths, raw bytes, or an Image column."""
    feature = source.features[column]
    values = source.data.column(column).combine_chunks()
    if isinstance(feature, datasets.Image):
        stored, paths = pc.struct_field(values, "bytes"), pc.struct_field(values, "path")
    elif isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        stored, paths = values.cast(pa.binary()), pa.nulls(len(values), pa.string())
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        stored, paths = pa.nulls(len(values), pa.binary()), values.cast(pa.string())
    else:
        raise MalformedFileError(f"image column {column!r} of {where} holds {feature}; expected image file paths, "
                                 "image bytes or a datasets.Image column")
    resolved = [None if path is None or not str(path).strip() else str(base / path)
                for path in paths.to_pylist()]
    return pa.StructArray.from_arrays([stored.cast(pa.binary()), pa.array(resolved, pa.string())],
                                      names=["bytes", "path"])


def boxes_value(value: object, place: str) -> list[list[float]]:
    """A boxes cell as a list of `[x, y, w, h]`: None or "" is no box, one box is a list of one, JSON text is
    read (a CSV holds it so)."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MalformedFileError(f"{place}: boxes {value!r} are not JSON ([[x, y, w, h], …])") from None
    if value is None:
        return []
    boxes = [value] if len(value) == 4 and all(isinstance(v, int | float) for v in value) else list(value)
    for box in boxes:
        if not (isinstance(box, list | tuple) and len(box) in (0, 4) and all(isinstance(v, int | float) for v in box)):
            raise MalformedFileError(f"{place}: box {box!r} is not [x, y, w, h] in pixels ([] for an unknown one)")
    return [[float(v) for v in box] for box in boxes]


def _text(value: object, role: str, place: str) -> str:
    """A cell as stripped text ("" for none). A list or mapping (several annotators' answers, say) is refused:
    its text form would be compared as one answer and never match."""
    if isinstance(value, list | tuple | dict):
        raise MalformedFileError(f"{place}: the {role} {value!r:.60} is a {type(value).__name__}, not one value; map "
                                 f"a column of one {role} per row with --columns {role}=COLUMN")
    return "" if value is None else str(value).strip()


def unusable_reason(question: str, answer: str, image: dict, category: str | None) -> str | None:
    """Why a row cannot be used (one of `UNUSABLE`), or None when it can."""
    if image["bytes"] is None and image["path"] is None:
        return "no image"
    if image["bytes"] is None and not Path(image["path"]).is_file():
        return "missing image file"
    if not question:
        return "empty question"
    if not answer:
        return "no answer"
    if category == "":
        return "no category"
    return None


def load_table(path: str | Path, split: str = "test", *, columns: Mapping[str, str] | None = None) -> Dataset:
    """Load a table of questions (see the module docstring for the sources and columns) as `QUESTION_FEATURES`
    rows with the lazily decoded `image` column.

    `split` chooses among a source's splits when it has several; a single table is used whatever it says.
    Unusable rows are left out and counted in a warning, by reason; none usable is an error.

    Raises:
        DataFileNotFoundError: `path` does not exist or holds no table.
        DataError: an unknown split or column role, a mapped or required column the table lacks (naming the
            columns present), repeated question ids, or no usable row.
        MalformedFileError: an unreadable table, an image column of another type, a box that is not
            `[x, y, w, h]`, or a list where one value belongs (e.g. several answers to one question).
    """
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"table {path} does not exist")
    source, base = read_table(path, split)
    where = f"the table {path}"
    found = resolve_columns(source.column_names, columns, where)
    images = image_records(source, found["image"], base.resolve(), where)
    text = {role: source[column] for role, column in found.items() if role != "image"}
    rows, keep, unusable = [], [], Counter()
    for index, image in enumerate(_image_cells(images)):
        row = f"{where}, row {index}"
        question_id = _text(text["question_id"][index], "question_id", row) if "question_id" in text else str(index)
        place = f"{where}, question {question_id!r}"
        question = _text(text["question"][index], "question", place)
        answer = _text(text["answer"][index], "answer", place).lower()
        category = _text(text["category"][index], "category", place) if "category" in text else None
        reason = unusable_reason(question, answer, image, category)
        if reason is not None:
            unusable[reason] += 1
            continue
        boxes = boxes_value(text["boxes"][index], place) if "boxes" in text else []
        image_id = (_text(text["image_id"][index], "image_id", place) if "image_id" in text
                    else Path(image["path"]).stem if image["path"] else question_id)
        keep.append(index)
        rows.append({
            "question_id": question_id, "image_id": image_id, "question": question, "answer": answer,
            "full_answer": "", "category": category or ONE_GROUP, "detailed_type": category or "",
            "true_option": None, "false_option": None, "object_names": [""] * len(boxes),
            "object_ids": [str(number) for number in range(len(boxes))], "object_boxes": boxes,
            "image_width": 0, "image_height": 0, "image_path": image["path"] or "",
        })
    _report_unusable(unusable, len(source), where)
    repeated = [qid for qid, count in Counter(row["question_id"] for row in rows).items() if count > 1]
    if repeated:
        raise DataError(f"question id {repeated[0]!r} appears more than once in {where} ({len(repeated)} repeated "
                        "id(s)); question ids must be unique (map another column with --columns question_id=…, "
                        "or drop the column to number the rows)")
    table = pa.Table.from_pylist(rows, schema=QUESTION_FEATURES.arrow_schema)
    kept = images if len(keep) == len(images) else images.take(pa.array(keep, pa.int64()))
    table = table.append_column("image", kept)
    features = Features({**QUESTION_FEATURES, "image": ImageFile()})
    fingerprint = hashlib.sha256(json.dumps([source._fingerprint, found, keep]).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=fingerprint)


def _image_cells(images: pa.StructArray):
    """Each row's {bytes, path} without copying the bytes into Python: only whether they are there."""
    has_bytes = pc.is_valid(images.field("bytes")).to_pylist()
    for stored, path in zip(has_bytes, images.field("path").to_pylist(), strict=True):
        yield {"bytes": b"" if stored else None, "path": path}


def _report_unusable(unusable: Counter, total: int, where: str) -> None:
    """Warn with the count of each reason rows were left out; refuse a table with no usable row."""
    if not unusable:
        return
    counts = ", ".join(f"{unusable[reason]} {reason}" for reason in UNUSABLE if unusable[reason])
    left = total - sum(unusable.values())
    if not left:
        raise DataError(f"no row of {where} can be used ({counts})")
    warnings.warn(f"left out {sum(unusable.values())} of {total} rows of {where} that cannot be used: {counts}",
                  stacklevel=3)

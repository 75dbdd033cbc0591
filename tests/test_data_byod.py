"""Bring your own VQA data: a table of image, question and answer in each form `datasets` reads runs through
knockout, lens and evaluate on the embedded model, grouped by its category column (or in one group), with its
unusable rows counted by reason; a column it lacks is refused, naming it and the columns it has.

The tables are built from the synthetic world's test questions (real images the embedded model answers), with
renamed columns and a few rows that cannot be used, so every expectation below is computed from the rows the
fixture wrote, not from the loader.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pandas as pd
import pytest
from typer.testing import CliRunner

from mmscope.cli import app
from mmscope.data.errors import DataError
from mmscope.data.table import ONE_GROUP
from mmscope.experiments.workspace import load_questions

runner = CliRunner()
LIMIT = 2  # per group, for evaluate; the sweeps run one question per group
CATEGORIES = ("ChooseAttr", "LogicalObj")


@dataclass(frozen=True)
class Table:
    """A fixture table: where it is, the --columns it needs, and what a correct loader must read from it."""

    path: Path
    columns: str | None
    ids: dict[str, list[str]]  # group -> usable question ids, in table order
    unusable: dict[str, int]  # reason -> count
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # question id -> its boxes

    def limited(self, limit: int = LIMIT) -> dict[str, list[str]]:
        return {group: ids[:limit] for group, ids in self.ids.items()}


@pytest.fixture(scope="module")
def source(world) -> list[dict]:
    """Usable rows: three questions of each of two categories from the synthetic world, with their image file,
    answer and object boxes."""
    dataset = load_questions(world, "test", categories=list(CATEGORIES), limit=3)
    return [{"question_id": f"q{row['question_id']}", "image": Path(row["image_path"]), "question": row["question"],
             "answer": row["answer"], "category": row["category"], "boxes": row["object_boxes"]} for row in dataset]


def copy_images(rows: list[dict], folder: Path) -> None:
    """Copy each row's image into folder/images and point the row at it by the path relative to `folder`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copy(row["image"], folder / "images" / row["image"].name)
        row["relative"] = f"images/{row['image'].name}"


def expected(rows: list[dict], grouped: bool) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["category"] if grouped else ONE_GROUP, []).append(row["question_id"])
    return groups


def with_unusable(records: list[dict], good: dict, image_key: str, missing_image: object) -> list[dict]:
    """`records` with three rows that cannot be used, between the good ones: a missing image, an empty question
    and no answer (each a copy of `good` with one thing wrong)."""
    bad = [{**good, image_key: missing_image, "_id": "bad-image"}, {**good, "_question": "  ", "_id": "bad-question"},
           {**good, "_answer": None, "_id": "bad-answer"}]
    return records[:2] + bad[:1] + records[2:4] + bad[1:] + records[4:]


def build_jsonl(source, folder: Path) -> Table:
    """JSONL with other column names (mapped by --columns), relative image paths and a category column."""
    rows = [dict(row) for row in source]
    copy_images(rows, folder)
    records = [{"id": r["question_id"], "img": r["relative"], "q": r["question"], "label": r["answer"],
                "type": r["category"], "bbox": r["boxes"]} for r in rows]
    records = with_unusable(records, records[0], "img", "images/absent.jpg")
    records = [fix(record, "id", "q", "label") for record in records]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return Table(path, "question_id=id,image=img,question=q,answer=label,category=type,boxes=bbox",
                 expected(rows, True), {"missing image file": 1, "empty question": 1, "no answer": 1},
                 {r["question_id"]: [[float(v) for v in box] for box in r["boxes"]] for r in rows})


def fix(record: dict, id_key: str, question_key: str, answer_key: str) -> dict:
    """A record with its `_id`, `_question`, `_answer` overrides applied (how `with_unusable` marks a bad row)."""
    record = dict(record)
    for marker, key in (("_id", id_key), ("_question", question_key), ("_answer", answer_key)):
        if marker in record:
            record[key] = record.pop(marker)
    return record


def build_csv(source, folder: Path) -> Table:
    """CSV with the usual column names, no question ids and no category: one group, rows numbered."""
    rows = [dict(row) for row in source]
    copy_images(rows, folder)
    records = [{"image": r["relative"], "question": r["question"], "answer": r["answer"]} for r in rows]
    records = [fix(record, "_unused", "question", "answer")
               for record in with_unusable(records, records[0], "image", "images/absent.jpg")]
    path = folder / "vqa.csv"
    pd.DataFrame(records)[["image", "question", "answer"]].to_csv(path, index=False)
    numbered = [str(number) for number, record in enumerate(records) if "_unused" not in record]
    return Table(path, None, {ONE_GROUP: numbered}, {"missing image file": 1, "empty question": 1, "no answer": 1})


def build_parquet(source, folder: Path) -> Table:
    """Parquet with the images' bytes embedded (no files beside it) and a category column."""
    records = [{"question_id": r["question_id"], "image": r["image"].read_bytes(), "question": r["question"],
                "answer": r["answer"], "category": r["category"]} for r in source]
    records = [fix(record, "question_id", "question", "answer")
               for record in with_unusable(records, records[0], "image", None)]
    path = folder / "embedded.parquet"
    pd.DataFrame(records).to_parquet(path)
    return Table(path, None, expected(source, True), {"no image": 1, "empty question": 1, "no answer": 1})


def build_saved(source, folder: Path) -> Table:
    """A `save_to_disk` DatasetDict (train and test) with a `datasets.Image` column of embedded images."""
    records = [{"question_id": r["question_id"], "image": {"bytes": r["image"].read_bytes(), "path": None},
                "question": r["question"], "answer": r["answer"], "category": r["category"]} for r in source]
    records = [fix(record, "question_id", "question", "answer")
               for record in with_unusable(records, records[0], "image", None)]
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "category": datasets.Value("string")})
    test = datasets.Dataset.from_list(records, features=features)
    datasets.DatasetDict({"train": test.select([0]), "test": test}).save_to_disk(str(folder / "saved"))
    return Table(folder / "saved", None, expected(source, True), {"no image": 1, "empty question": 1, "no answer": 1})


def build_imagefolder(source, folder: Path) -> Table:
    """An image folder with metadata.jsonl (`file_name` relative to it), no category: one group."""
    rows = [dict(row) for row in source]
    copy_images(rows, folder / "imagefolder")
    records = [{"file_name": r["relative"], "question_id": r["question_id"], "question": r["question"],
                "answer": r["answer"]} for r in rows]
    records = [fix(record, "question_id", "question", "answer")
               for record in with_unusable(records, records[0], "file_name", "images/absent.jpg")]
    path = folder / "imagefolder" / "metadata.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return Table(path.parent, None, expected(rows, False),
                 {"missing image file": 1, "empty question": 1, "no answer": 1})


BUILDERS = {"jsonl": build_jsonl, "csv": build_csv, "parquet": build_parquet, "saved": build_saved,
            "imagefolder": build_imagefolder}


@pytest.fixture(scope="module", params=list(BUILDERS))
def table(request, source, tmp_path_factory) -> Table:
    return BUILDERS[request.param](source, tmp_path_factory.mktemp(request.param))


def invoke(*args: str):
    """Run `mmscope ARGS` and require success; the result (stdout, and stderr with the warnings)."""
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def data_args(table: Table, limit: int = LIMIT) -> list[str]:
    return ["--data", str(table.path), "--limit", str(limit), *(["--columns", table.columns] if table.columns else [])]


def unusable_warning(table: Table) -> str:
    total = sum(map(len, table.ids.values())) + sum(table.unusable.values())
    counts = ", ".join(f"{count} {reason}" for reason, count in table.unusable.items())
    return f"left out {sum(table.unusable.values())} of {total} rows of the table {table.path} that cannot be used: {counts}"


def test_the_table_reads_its_usable_rows_by_group_and_counts_the_rest(table):
    with pytest.warns(UserWarning) as caught:
        dataset = load_questions(table.path, columns=dict(p.split("=") for p in (table.columns or "").split(",") if p))
    assert [str(w.message) for w in caught] == [unusable_warning(table)]
    read: dict[str, list[str]] = {}
    for row in dataset.select_columns(["question_id", "category"]):
        read.setdefault(row["category"], []).append(row["question_id"])
    assert read == table.ids
    first = dataset[0]
    assert first["image"].size == (64, 64)  # decoded from the file or the embedded bytes
    if table.boxes:
        assert {row["question_id"]: row["object_boxes"] for row in dataset} == table.boxes


def test_knockout_runs_per_group_with_the_limit_per_group(table, tmp_path):
    out = tmp_path / "ko"
    result = invoke("knockout", *data_args(table, limit=1), "--flow", "image->last", "--window", "3",
                    "--include-all", "--out", str(out))
    assert unusable_warning(table) in " ".join(result.stderr.split())
    results = pd.read_parquet(out / "results.parquet")
    ran = {group: list(dict.fromkeys(part["question_id"])) for group, part in results.groupby("category", sort=False)}
    assert ran == table.limited(1)
    assert set(results["center"]) == set(range(8)) and set(results["flow"]) == {"image->last"}
    findings = result.stdout.split("(centre layer, Δp %):")[1]
    assert sorted(re.findall(r"^(\w+)\s+L\d", findings, re.MULTILINE)) == sorted(table.ids)


def test_lens_runs_on_the_table(table, tmp_path):
    out = tmp_path / "lens"
    invoke("lens", *data_args(table, limit=1), "--include-all", "--out", str(out))
    results = pd.read_parquet(out / "results.parquet")
    assert sorted(set(results["question_id"])) == sorted(ids[0] for ids in table.ids.values())
    assert {row.question_id: row.category for row in results.itertuples()} == \
        {ids[0]: group for group, ids in table.ids.items()}
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["category"]) == set(table.ids)


def test_evaluate_counts_the_questions_of_each_group(table):
    printed = invoke("evaluate", *data_args(table), "--no-blank").stdout
    counts = {line.split()[0]: int(line.split()[-1]) for line in printed.splitlines()[1:]}
    limited = table.limited()
    assert counts == {**{group: len(ids) for group, ids in limited.items()},
                      "overall": sum(map(len, limited.values()))}


def test_a_missing_mapped_column_is_named_with_the_columns_present(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"img": "a.png", "q": "Is it red?", "label": "yes"}) + "\n")
    result = runner.invoke(app, ["evaluate", "--data", str(path), "--columns", "image=img,question=text,answer=label"])
    assert result.exit_code == 2
    assert (f"error: column 'text' (mapped to question) is not in the table {path}; its columns: img, q, label"
            ) in result.output.splitlines()
    result = runner.invoke(app, ["lens", "--data", str(path), "--columns", "image=img,answer=label"])
    assert result.exit_code == 2
    assert (f"error: the table {path} has no question column ('question'); its columns: img, q, label; name it with "
            "--columns question=COLUMN") in " ".join(result.output.split())


def test_a_list_of_answers_is_refused_not_compared_as_text(tmp_path):
    """VQAv2 keeps ten annotators' answers per question: read as text, none would ever match the model's."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "Is it red?", "answer": ["yes", "yes", "no"]}) + "\n")
    result = runner.invoke(app, ["evaluate", "--data", str(path)])
    assert result.exit_code == 2
    assert (f"error: the table {path}, question '0': the answer ['yes', 'yes', 'no'] is a list, not one value; map "
            "a column of one answer per row with --columns answer=COLUMN") in " ".join(result.output.split())


def test_a_bad_columns_option_is_refused_naming_the_flag():
    result = runner.invoke(app, ["knockout", "--columns", "question=q,questoin=text"])
    assert result.exit_code == 2
    assert "unknown column role 'questoin' (--columns): known: question_id, image, image_id, question, answer, " \
           "category, boxes; did you mean 'question'?" in " ".join(result.output.split())


def test_categories_select_among_the_tables_own_groups(source, tmp_path):
    table = build_jsonl(source, tmp_path)
    columns = dict(part.split("=") for part in table.columns.split(","))
    with pytest.warns(UserWarning):
        chosen = load_questions(table.path, categories=["LogicalObj"], limit=2, columns=columns)
    assert chosen["question_id"] == table.ids["LogicalObj"][:2]
    with pytest.warns(UserWarning), pytest.raises(DataError) as error:
        load_questions(table.path, categories=["LogicalObject"], columns=columns)
    assert str(error.value) == ("unknown category 'LogicalObject' of the table; its categories: ChooseAttr, "
                                "LogicalObj; did you mean 'LogicalObj'?")

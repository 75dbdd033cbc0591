"""What every sweep shares: turning a GQA row into an Example, row ids, the resumable loop, outputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from mmscope.experiments.runs import RunDir, summarize
from mmscope.inputs import Example
from mmscope.model import Model


def example_of(model: Model, row: dict) -> Example:
    """The Example of one GQA-format row: its image, question and (when known) the central objects' boxes."""
    boxes = [tuple(box) for box in row.get("object_boxes") or [] if len(box) == 4]  # [] marks an absent object
    meta = {key: row.get(key) for key in ("question_id", "image_id", "category", "answer")}
    return model.prepare(row["image"].convert("RGB"), row["question"], boxes=boxes or None, meta=meta)


def row_ids(index: int, row: dict) -> dict:
    """The identifying columns every results row starts with."""
    return {
        "example": index,
        "question_id": str(row["question_id"]),
        "image_id": str(row["image_id"]),
        "category": row["category"],
        "answer": row["answer"],
    }


def resumable_loop(run: RunDir, dataset, per_example: Callable[[int, dict], list[dict] | None],
                   desc: str) -> dict[str, int]:
    """Call `per_example(index, row)` for every row not yet done; store its rows atomically.

    `per_example` returns None to skip an example (e.g. answered wrongly); skips are remembered too, so a
    resumed run counts them exactly once. Returns counts of examples used and skipped.
    """
    pending = [index for index in range(len(dataset)) if not run.done(index)]
    for index in tqdm(pending, desc=desc, unit="example"):
        rows = per_example(index, dataset[index])
        run.write_part(index, rows if rows is not None else [], skipped=rows is None)
    return run.counts()


def finish(run: RunDir, value: str, by: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect all parts into results.parquet and write summary.csv; returns both tables."""
    table = run.results()
    if table.empty:
        warnings.warn(f"{run.folder}: no rows (every example was skipped)", stacklevel=2)
        return table, pd.DataFrame()
    summary = summarize(table, by, value)
    summary.to_csv(run.folder / "summary.csv", index=False)
    return table, summary


def default_out(name: str, out: Path | None) -> Path:
    return out if out is not None else Path("runs") / name

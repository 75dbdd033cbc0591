"""`mmscope data …`: write a synthetic GQA-format world, and count what a GQA folder or the study CSVs hold.

The loaders (and so `datasets`) are imported when a command runs: `mmscope data --help` needs none of them.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer

from mmscope.data.categories import CATEGORIES
from mmscope.data.errors import DataFileNotFoundError

app = typer.Typer(help="Synthesize, load and inspect GQA-format data.", no_args_is_help=True)

_OTHER_ROW = "(other)"


def answer_table(columns: dict[str, dict[str, Counter]]) -> str:
    """A text table: one row per category, one count column per source, and each category's commonest answer.

    `columns` maps a column name (a split, a file) to category -> answer counts. The last column shows the
    share of the commonest answer over all columns, the answer-balance check.
    """
    rows = [c for c in (*CATEGORIES, _OTHER_ROW) if any(c in counts for counts in columns.values())]
    header = ["category", *columns, "commonest answer"]
    lines = []
    for row in rows:
        total = sum((counts.get(row, Counter()) for counts in columns.values()), Counter())
        answer, count = total.most_common(1)[0]
        share = f"{answer or '(none)'} {100 * count / total.total():.1f}%"
        lines.append([row, *(str(counts.get(row, Counter()).total()) for counts in columns.values()), share])
    lines.append(["total", *(str(sum(c.total() for c in counts.values())) for counts in columns.values()), ""])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, *lines])


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write questions/, sceneGraphs/, images/, world.json."),
    n_scenes: int = typer.Option(..., "--n-scenes", help="Scenes (images) over all splits."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
    image_size: int = typer.Option(96, "--image-size", help="Image side in pixels."),
    questions_per_scene: int = typer.Option(8, help="Questions asked about each scene (at most)."),
    workers: int = typer.Option(0, help="Rendering processes (0: one per CPU core)."),
    overwrite: bool = typer.Option(False, help="Replace a world already in --out."),
) -> None:
    """Write a synthetic GQA-format world and print questions per split and category with answer balance."""
    from mmscope.data.gqa import count_answers
    from mmscope.data.synthetic import synthesize

    started = time.perf_counter()
    files = synthesize(out, n_scenes, seed, image_size=image_size, questions_per_scene=questions_per_scene,
                       workers=workers or None, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    columns = {split: count_answers(path) for split, path in files.questions.items()}
    typer.echo(answer_table(columns))
    total = sum(c.total() for counts in columns.values() for c in counts.values())
    typer.echo(f"{total} questions about {n_scenes} images written to {out} in {elapsed:.1f} s")


def _questions_files(path: Path, split: str | None) -> list[Path]:
    folder = path / "questions" if (path / "questions").is_dir() else path
    files = sorted(folder.glob(f"{split or ''}*_questions*.json"))
    if not files:
        raise DataFileNotFoundError(f"no GQA questions files ({split or '{split}'}_*questions*.json) in {folder}")
    return files


@app.command()
def show(
    path: Path = typer.Argument(..., help="A GQA folder, a questions JSON file, or the study CSV folder."),
    split: str = typer.Option(None, help="Only this split's questions files (e.g. val)."),
) -> None:
    """Print questions per category (and the commonest answer) of a GQA folder/file or the study CSVs."""
    from mmscope.data.gqa import count_answers
    from mmscope.data.study import STUDY_FILE_PREFIX, load_study_csvs

    if path.is_dir() and any(path.glob(f"{STUDY_FILE_PREFIX}*.csv")):
        counts: dict[str, Counter] = {}
        for row in load_study_csvs(path).select_columns(["category", "answer"]):
            counts.setdefault(row["category"], Counter())[row["answer"]] += 1
        columns = {path.name: counts}
    else:
        files = [path] if path.is_file() else _questions_files(path, split)
        columns = {file.name: count_answers(file) for file in files}
    typer.echo(answer_table(columns))

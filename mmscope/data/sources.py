"""Which loader a data path needs, and the questions or probe datasets it gives.

A path may be a synthetic-world folder (with world.json), a GQA folder (questions/, sceneGraphs/, images/ or the
files side by side), the study's CSV folder (GQA_*.csv), or a table of questions (`mmscope.data.table`). Every
function here takes a path: which path a missing `--data` means (the embedded model's world) is the caller's
choice (`mmscope.experiments.workspace`), so this module never imports the zoo.

Everything an experiment will need from the data is checked here, before any model work: the folder and split
exist, every question has an answer and an image, and the sizes asked for make sense.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmscope.data.categories import check_categories
from mmscope.data.errors import DataError, DataFileNotFoundError, UnknownCategoryError
from mmscope.data.gqa import load_gqa
from mmscope.data.probing import entailment_dataset, object_recognition_dataset
from mmscope.data.rows import check_split
from mmscope.data.study import load_study_csvs
from mmscope.data.synthetic import load_synthetic
from mmscope.data.table import is_table, load_table
from mmscope.errors import known, suggest

_QUESTION_FILES = ("_balanced_questions.json", "_all_questions.json")
_SCENE_GRAPH_FILES = ("_sceneGraphs.json",)


def _check_at_least(name: str, value: int | None, minimum: int, omitted: str | None = None) -> None:
    """Refuse a size below `minimum` (None passes where `omitted` says what it means)."""
    if value is not None and value < minimum:
        hint = f", or None for {omitted}" if omitted else ""
        raise DataError(f"{name} {value}: must be at least {minimum}{hint}")


def _data_folder(data: str | Path, tables: bool = False) -> Path:
    """`data` as a folder that exists (or, with `tables`, a table file)."""
    data = Path(data)
    if tables and data.is_file() and is_table(data):
        return data
    if tables and data.is_file():
        raise DataError(f"data file {str(data)!r} is not a table of questions mmscope reads (.jsonl, .json, .csv, "
                        ".parquet)")
    if not data.is_dir():
        raise DataFileNotFoundError(f"data folder {str(data)!r} does not exist")
    return data


def _table_categories(dataset, categories) -> tuple[str, ...]:
    """A category selection checked against a table's own categories (all of them when None)."""
    present = sorted(set(dataset["category"]))
    if categories is None:
        return tuple(present)
    selected = (categories,) if isinstance(categories, str) else tuple(categories)
    if not selected:
        raise DataError(f"an empty category selection selects no questions; name some of {known(present)}, or "
                        "none at all for every one")
    for name in selected:
        if name not in present:
            raise UnknownCategoryError(f"unknown category {name!r} of the table; its categories: {known(present)}"
                                       f"{suggest(name, present)}")
    return selected


def _split_files(data: Path, subfolder: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Split -> file of a GQA folder: `{split}{suffix}` in `data/subfolder` or in `data` itself (earlier places,
    then earlier suffixes, win)."""
    files: dict[str, Path] = {}
    for folder in (data / subfolder, data):
        for suffix in suffixes:
            for path in sorted(folder.glob(f"*{suffix}")):
                files.setdefault(path.name.removesuffix(suffix), path)
    return files


def _check_answered(dataset, source: Path, categories: tuple[str, ...]) -> None:
    """Refuse a question set an experiment cannot score: no questions at all, or questions without an answer."""
    if not len(dataset):
        raise DataError(f"{source} holds no questions of {known(categories)} (questions without types.detailed, "
                        "such as GQA's test and challenge files, belong to no category)")
    answers = dataset["answer"]
    unanswered = [index for index, answer in enumerate(answers) if not answer]
    if unanswered:
        first = dataset.select_columns(["question_id"])[unanswered[0]]["question_id"]
        raise DataError(f"{len(unanswered)} of {len(answers)} questions in {source} have no answer (the first: "
                        f"question {first!r}); experiments score answers, so they need a split with answers "
                        "(GQA's test and challenge files carry none)")


def load_questions(data: str | Path, split: str = "test", *, images: Path | None = None,
                   categories=None, limit: int | None = None, columns: Mapping[str, str] | None = None):
    """Questions from any supported source, at most `limit` per category, each with its answer and image.

    `data` may be a synthetic-world folder (with world.json), a GQA folder (questions/, sceneGraphs/, images/ or
    the files side by side), or the study's CSV folder (with `images` pointing at GQA's images) — their
    questions of the six categories —, or a table of questions (a JSONL / CSV / Parquet file or folder, a saved
    dataset, an image folder with a metadata file: `mmscope.data.table`, whose `columns` maps its column names),
    grouped by its category column or all in one group.

    Raises (all `MMScopeError`s, before anything is loaded where they can): an unknown split (with the known
    ones), a folder without images, `limit` < 1, questions without an answer, or no questions at all; for a
    table, a column it lacks (naming those it has) or no usable row.
    """
    _check_at_least("limit", limit, 1, omitted="all questions")
    data = _data_folder(data, tables=True)
    synthetic = data.is_dir() and (data / "world.json").exists()
    study = data.is_dir() and bool(list(data.glob("GQA_*.csv")))
    questions = _split_files(data, "questions", _QUESTION_FILES) if data.is_dir() else {}
    if not (synthetic or study or questions) and is_table(data):
        dataset = load_table(data, split, columns=columns)
        wanted = set(_table_categories(dataset, categories))
        dataset = dataset.select([index for index, category in enumerate(dataset["category"]) if category in wanted])
        return _first_per_category(dataset, limit)
    if columns:
        raise DataError(f"{data} is a synthetic world, GQA or study folder, whose columns are fixed; --columns "
                        "maps the columns of a table of questions")
    categories = check_categories(categories)
    if synthetic:
        dataset = load_synthetic(data, split, categories=categories)
        source = data / "questions" / f"{split}_balanced_questions.json"
    elif study:
        if images is None:
            raise DataError(f"{data} is the study's CSV folder: its questions name GQA images but the folder does "
                            "not hold them; pass the GQA images folder too (--images)")
        dataset = load_study_csvs(data, images=images, categories=categories)
        source = data
    else:
        if not questions:
            raise DataFileNotFoundError(
                f"{data} is neither a synthetic world (world.json), the study's CSV folder (GQA_*.csv), a GQA "
                "folder ({split}_balanced_questions.json or {split}_all_questions.json, in questions/ or itself) "
                "nor a table of questions (a .jsonl, .csv or .parquet file, metadata.jsonl, a saved dataset)"
            )
        check_split(split, questions, f"the GQA folder {data}")
        images = images or (data / "images" if (data / "images").is_dir() else None)
        if images is None:
            raise DataFileNotFoundError(f"the GQA folder {data} has no images/ folder; pass the GQA images folder "
                                        "(--images)")
        source = questions[split]
        dataset = load_gqa(source, _split_files(data, "sceneGraphs", _SCENE_GRAPH_FILES).get(split), images,
                           categories=categories)
    _check_answered(dataset, source, categories)
    return _first_per_category(dataset, limit)


def _first_per_category(dataset, limit: int | None):
    """The first `limit` questions of each category (all of them when None), in their order."""
    if limit is None:
        return dataset
    seen: dict[str, int] = {}
    keep = []
    for index, category in enumerate(dataset["category"]):
        seen[category] = seen.get(category, 0) + 1
        if seen[category] <= limit:
            keep.append(index)
    return dataset.select(keep)


def probe_datasets(data: str | Path, split: str = "test", n_images: int = 300, seed: int = 0) -> dict:
    """The probing study's two datasets from one split's scene graphs in the folder `data`: entailment pairs and
    object labels, each over the first `n_images` images."""
    _check_at_least("n_images", n_images, 1)
    data = _data_folder(data)
    scene_graphs = _split_files(data, "sceneGraphs", _SCENE_GRAPH_FILES)
    if not scene_graphs:
        raise DataFileNotFoundError(f"no scene-graph files ({split}_sceneGraphs.json …) in {data} or "
                                    f"{data / 'sceneGraphs'}")
    check_split(split, scene_graphs, f"the scene graphs in {data}")
    images = data / "images"
    if not images.is_dir():
        raise DataFileNotFoundError(f"{data} has no images/ folder; the probe datasets need the images "
                                    "({imageId}.jpg) their scene graphs describe")
    objects = object_recognition_dataset(scene_graphs[split], images)
    objects = objects.select(range(min(n_images, len(objects))))
    keep = set(objects["image_id"])
    entailment = entailment_dataset(scene_graphs[split], images, seed=seed)
    entailment = entailment.filter(lambda image_id: image_id in keep, input_columns="image_id")
    return {"entailment": entailment, "objects": objects}

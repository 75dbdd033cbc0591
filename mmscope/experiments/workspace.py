"""Where experiment data comes from: a user's folder, or the embedded model's own synthetic world
(`mmscope.zoo.embedded_world`, regenerated once into the user's cache folder)."""

from __future__ import annotations

from pathlib import Path

from mmscope.data import entailment_dataset, load_gqa, load_study_csvs, load_synthetic, object_recognition_dataset
from mmscope.data.categories import check_categories
from mmscope.data.errors import DataFileNotFoundError
from mmscope.zoo import embedded_world


def _first_existing(*paths: Path) -> Path | None:
    return next((path for path in paths if path.exists()), None)


def load_questions(data: Path | None, split: str = "test", *, images: Path | None = None,
                   categories=None, limit: int | None = None):
    """Questions of the six categories from any supported source, at most `limit` per category.

    `data` may be a synthetic-world folder (with world.json), a GQA folder (questions/, sceneGraphs/, images/ or
    the files side by side), or the study's CSV folder (with `images` pointing at GQA's images); None means the
    embedded model's held-out test split.
    """
    categories = check_categories(categories)
    data = Path(data) if data is not None else embedded_world()
    if not data.is_dir():
        raise DataFileNotFoundError(f"data folder {str(data)!r} does not exist")
    if (data / "world.json").exists():
        dataset = load_synthetic(data, split, categories=categories)
    elif list(data.glob("GQA_*.csv")):
        dataset = load_study_csvs(data, images=images, categories=categories)
    else:
        questions = _first_existing(*(folder / f"{split}_{kind}_questions.json"
                                      for folder in (data / "questions", data) for kind in ("balanced", "all")))
        if questions is None:
            raise DataFileNotFoundError(
                f"{data} is neither a synthetic world (world.json), the study's CSV folder (GQA_*.csv), nor a GQA "
                f"folder with {split}_balanced_questions.json"
            )
        scene_graphs = _first_existing(data / "sceneGraphs" / f"{split}_sceneGraphs.json",
                                       data / f"{split}_sceneGraphs.json")
        dataset = load_gqa(questions, scene_graphs, images or _first_existing(data / "images"),
                           categories=categories)
    if limit is not None:
        seen: dict[str, int] = {}
        keep = []
        for index, category in enumerate(dataset["category"]):
            seen[category] = seen.get(category, 0) + 1
            if seen[category] <= limit:
                keep.append(index)
        dataset = dataset.select(keep)
    return dataset


def probe_datasets(data: Path | None, split: str = "test", n_images: int = 300, seed: int = 0) -> dict:
    """The probing study's two datasets from one split's scene graphs: entailment pairs and object labels,
    each over the first `n_images` images."""
    data = Path(data) if data is not None else embedded_world()
    scene_graphs = _first_existing(data / "sceneGraphs" / f"{split}_sceneGraphs.json",
                                   data / f"{split}_sceneGraphs.json")
    if scene_graphs is None:
        raise DataFileNotFoundError(f"no {split}_sceneGraphs.json in {data} or {data / 'sceneGraphs'}")
    images = _first_existing(data / "images")
    objects = object_recognition_dataset(scene_graphs, images)
    objects = objects.select(range(min(n_images, len(objects))))
    keep = set(objects["image_id"])
    entailment = entailment_dataset(scene_graphs, images, seed=seed)
    entailment = entailment.filter(lambda image_id: image_id in keep, input_columns="image_id")
    return {"entailment": entailment, "objects": objects}

"""Where experiment data comes from: a user's folder, or the embedded model's own synthetic world.

The embedded checkpoint records the seed and size of the synthetic world it was trained on (`world.json`); the
same `synthesize` call regenerates that world exactly, so its held-out test split — scenes the model never saw
— is available anywhere without shipping the images. It is generated once into the user's cache folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmscope.data import CATEGORIES, load_synthetic, synthesize
from mmscope.model import EMBEDDED_MODELS, DEFAULT_MODEL


def cache_dir() -> Path:
    return Path(os.environ.get("MMSCOPE_CACHE", Path.home() / ".cache" / "mmscope"))


def embedded_world(model_name: str = DEFAULT_MODEL) -> Path:
    """The synthetic world the embedded model was trained on, regenerated into the cache when missing."""
    spec = json.loads((EMBEDDED_MODELS[model_name] / "world.json").read_text())
    folder = cache_dir() / f"world-{spec['n_scenes']}-{spec['image_size']}px-seed{spec['seed']}"
    if not (folder / "questions").exists():
        synthesize(folder, spec["n_scenes"], seed=spec["seed"], image_size=spec["image_size"])
    return folder


def evaluation_data(data: Path | None, split: str, limit: int | None = None):
    """Rows of one split, restricted to the six categories, at most `limit` per category."""
    dataset = load_synthetic(data or embedded_world(), split)
    dataset = dataset.filter(lambda category: category in CATEGORIES, input_columns="category")
    if limit is not None:
        seen: dict[str, int] = {}
        keep = []
        for index, category in enumerate(dataset["category"]):
            seen[category] = seen.get(category, 0) + 1
            if seen[category] <= limit:
                keep.append(index)
        dataset = dataset.select(keep)
    return dataset

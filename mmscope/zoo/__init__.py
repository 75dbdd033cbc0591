"""The zoo: models mmscope ships, each in a room of its own (how it is built, trained, described, its world).

`EMBEDDED_MODELS` maps each embedded name to its checkpoint folder, which `mmscope.load` reads like any
`save_pretrained` folder. An embedded model trained on mmscope's synthetic world records that world's seed and
size (`world.json`), so `embedded_world` can regenerate it — and its held-out test split, scenes the model never
saw — anywhere, without shipping the images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

ZOO = Path(__file__).parent
EMBEDDED_MODELS = {"shapes-llava": ZOO / "shapes_llava" / "checkpoint"}
DEFAULT_MODEL = "shapes-llava"


def cache_dir() -> Path:
    """Where regenerated worlds are kept: `$MMSCOPE_CACHE`, or `~/.cache/mmscope`."""
    return Path(os.environ.get("MMSCOPE_CACHE", Path.home() / ".cache" / "mmscope"))


def embedded_world(model_name: str = DEFAULT_MODEL, split: str | None = None) -> Path:
    """The synthetic world the embedded model was trained on, regenerated into the cache when missing — with
    only `split`'s images drawn when one is named (the held-out test split is a tenth of the world), the other
    splits' when they are first asked for."""
    from mmscope.data.synthetic.writing import render_splits, synthesize

    spec = json.loads((EMBEDDED_MODELS[model_name] / "world.json").read_text())
    folder = cache_dir() / f"world-{spec['n_scenes']}-{spec['image_size']}px-seed{spec['seed']}"
    if not (folder / "world.json").exists():
        synthesize(folder, spec["n_scenes"], seed=spec["seed"], image_size=spec["image_size"], overwrite=True,
                   render=[split] if split is not None else None)
    elif split is None or split in spec["splits"]:
        render_splits(folder, [split] if split is not None else list(spec["splits"]))
    return folder


@dataclass(frozen=True)
class Sample:
    """One question of an embedded model's world: its image, question, answer, category and the boxes `(x, y, w,
    h)` of the objects it is about (in the image's pixels)."""

    image: Image.Image
    question: str
    answer: str
    category: str
    boxes: list[tuple[float, float, float, float]]
    question_id: str


def sample(index: int = 0, *, category: str | None = None, split: str = "test",
           model_name: str = DEFAULT_MODEL) -> Sample:
    """Question `index` (of `category`, when given) of the embedded model's world — by default its held-out test
    split, scenes the model never saw — to try mmscope on: `model.prepare(s.image, s.question, boxes=s.boxes)`.
    The first call regenerates that split into the cache folder (`cache_dir()`)."""
    from mmscope.data.categories import CATEGORIES
    from mmscope.data.synthetic.writing import load_synthetic
    from mmscope.errors import InputError, known, suggest

    if model_name not in EMBEDDED_MODELS:
        raise InputError(f"unknown embedded model {model_name!r}; known: {known(EMBEDDED_MODELS)}"
                         f"{suggest(model_name, EMBEDDED_MODELS)}")
    if category is not None and category not in CATEGORIES:
        raise InputError(f"unknown category {category!r}; known: {known(CATEGORIES)}{suggest(category, CATEGORIES)}")
    dataset = load_synthetic(embedded_world(model_name, split=split), split,
                             categories=[category] if category else CATEGORIES)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(dataset):
        raise InputError(f"sample index {index!r} is not one of the {len(dataset)} questions (0 to "
                         f"{len(dataset) - 1}) of {model_name}'s {split} split"
                         f"{f' in {category}' if category else ''}")
    row = dataset[index]
    boxes = [tuple(float(v) for v in box) for box in row.get("object_boxes") or [] if len(box) == 4]
    return Sample(row["image"].convert("RGB"), row["question"], row["answer"], row["category"], boxes,
                  str(row["question_id"]))

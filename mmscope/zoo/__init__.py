"""The zoo: models mmscope ships, each in a room of its own (how it is built, trained, described, its world).

`EMBEDDED_MODELS` maps each embedded name to its checkpoint folder, which `mmscope.load` reads like any
`save_pretrained` folder. An embedded model trained on mmscope's synthetic world records that world's seed and
size (`world.json`), so `embedded_world` can regenerate it — and its held-out test split, scenes the model never
saw — anywhere, without shipping the images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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

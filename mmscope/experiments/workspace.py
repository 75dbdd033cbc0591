"""Where experiment data comes from: the `--data` path, read by `mmscope.data.sources`, or, when it is None, the
embedded model's own synthetic world (`mmscope.zoo.embedded_world`, regenerated once into the user's cache folder).

The sizes asked for are checked here first, naming their options, so that a bad one is refused before the
embedded world is regenerated; `mmscope.data.sources` checks the rest before any model work.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmscope.data import sources
from mmscope.data.errors import DataError
from mmscope.experiments.options import check_at_least
from mmscope.zoo import embedded_world


def _data_path(data: Path | None, split: str) -> Path:
    """`--data` as a path; None means the embedded model's world, with `split`'s images drawn."""
    return Path(data) if data is not None else embedded_world(split=split)


def load_questions(data: Path | None, split: str = "test", *, images: Path | None = None,
                   categories=None, limit: int | None = None, columns: Mapping[str, str] | None = None):
    """`mmscope.data.sources.load_questions` of `data`; None means the embedded model's held-out test split.

    Raises (all `MMScopeError`s, before anything is loaded where they can): `limit` < 1 (naming `--limit`), and
    everything `mmscope.data.sources.load_questions` refuses.
    """
    check_at_least("limit", limit, 1, omitted="all questions", error=DataError)
    return sources.load_questions(_data_path(data, split), split, images=images, categories=categories,
                                  limit=limit, columns=columns)


def probe_datasets(data: Path | None, split: str = "test", n_images: int = 300, seed: int = 0) -> dict:
    """`mmscope.data.sources.probe_datasets` of `data` (the probing study's entailment pairs and object labels
    over the first `n_images` images of `split`); None means the embedded model's world."""
    check_at_least("n_images", n_images, 1, error=DataError)
    return sources.probe_datasets(_data_path(data, split), split, n_images, seed)

"""Shared data for the data tests: the study's CSV folder, and one synthetic world per session, built on first use."""

from __future__ import annotations

from pathlib import Path

from mmscope.data import SyntheticFiles, synthesize

STUDY_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gqa_cmif"

_WORLDS: dict[tuple, SyntheticFiles] = {}


def synthetic_world(tmp_path_factory, n_scenes: int = 240, seed: int = 3) -> SyntheticFiles:
    """A synthetic world of `n_scenes` scenes, written once per test session and shared by all data tests."""
    key = (n_scenes, seed)
    if key not in _WORLDS:
        folder = tmp_path_factory.mktemp(f"world-{n_scenes}-{seed}")
        _WORLDS[key] = synthesize(folder, n_scenes, seed=seed, workers=2, progress=False)
    return _WORLDS[key]

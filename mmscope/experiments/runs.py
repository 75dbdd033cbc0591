"""A run folder that survives crashes: config, per-example result parts, tables, figures, W&B.

Layout of `runs/<name>/`:

    config.yaml        everything needed to re-run (model, data, interventions as dicts, seed, versions)
    parts/NNNNNN.parquet   the rows of one finished example, written atomically (temp file + rename)
    results.parquet    all rows, in example order (rebuilt from the parts at the end)
    summary.csv        per-layer means with 95% confidence intervals
    *.png              figures

A sweep skips the examples whose part already exists, so the same command started again after any
interruption — even SIGKILL — continues where it stopped, and the final table equals an uninterrupted run's.
Starting a run in a folder whose config differs is refused rather than mixing two experiments.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import pandas as pd
import yaml

from mmscope.errors import MMScopeError

VERSIONED = ("mmscope", "torch", "transformers", "nnsight", "datasets", "wandb", "einops")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunDir:
    """One experiment's output folder. `config` must be plain data (YAML-serialisable)."""

    def __init__(self, folder: str | Path, config: dict) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.config = config
        config_file = self.folder / "config.yaml"
        if config_file.exists():
            previous = yaml.safe_load(config_file.read_text())
            if previous.get("experiment") != config.get("experiment"):
                raise MMScopeError(
                    f"{self.folder} holds a different run (config.yaml differs in 'experiment'); "
                    "choose another --out or delete the folder"
                )
        else:
            stored = {**config, "versions": library_versions()}
            _atomic_write(config_file, yaml.safe_dump(stored, sort_keys=False).encode())

    def part_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.parquet"

    def skip_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.skipped"

    def done(self, index: int) -> bool:
        return self.part_path(index).exists() or self.skip_path(index).exists()

    def write_part(self, index: int, rows: list[dict], skipped: bool = False) -> None:
        """Store one example's rows atomically, or mark it skipped (e.g. the model answered it wrongly)."""
        if skipped:
            _atomic_write(self.skip_path(index), b"")
            return
        temporary = self.part_path(index).with_suffix(".tmp")
        pd.DataFrame(rows).to_parquet(temporary, index=False)
        os.replace(temporary, self.part_path(index))

    def counts(self) -> dict[str, int]:
        """Examples that produced rows, and examples skipped."""
        return {"used": len(list(self.parts.glob("*.parquet"))), "skipped": len(list(self.parts.glob("*.skipped")))}

    def results(self) -> pd.DataFrame:
        """All rows so far, in example order, written to `results.parquet`."""
        frames = [pd.read_parquet(path) for path in sorted(self.parts.glob("*.parquet"))]
        frames = [frame for frame in frames if len(frame)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        table.to_parquet(self.folder / "results.parquet", index=False)
        return table


def summarize(table: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean, 95% confidence interval (normal approximation) and count of `value` per group of `by`."""
    grouped = table.groupby(by, sort=True)[value]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    half_width = 1.96 * summary["std"].fillna(0.0) / summary["n"].clip(lower=1) ** 0.5
    summary["ci_low"], summary["ci_high"] = summary["mean"] - half_width, summary["mean"] + half_width
    return summary.drop(columns="std")


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)

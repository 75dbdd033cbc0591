"""A run folder that survives crashes: config, per-example result parts, tables, figures, W&B.

Layout of `runs/<name>/`:

    config.yaml        everything needed to re-run (model, data, interventions as dicts, seed, versions)
    units.json         the identity of each unit (a question's id), in the run's order
    parts/<unit>.parquet   the rows of one finished unit, written atomically (temp file + rename); named by the
                       unit's identity where it has one (`q-<question id>`), else by its index
    results.parquet    all rows, in example order (rebuilt from the parts at the end)
    summary.csv        per-layer means with 95% confidence intervals (normal or bootstrap)
    *.png              figures

    run.lock, run.lock.json   held while a process writes the folder, and who that process is

A sweep skips the examples whose part already exists, so the same command started again after any
interruption — even SIGKILL — continues where it stopped, and the final table equals an uninterrupted run's.
Starting a run in a folder that holds results of a different run (the experiment or an option that changes
results differs) is refused, naming each difference, rather than mixing two experiments; a folder with a
config but no results yet (a start that failed) takes the new config. A run grows in place: rerun with a larger
`--limit` or more `--categories` (and nothing else changed), it keeps every unit already computed — parts are
named by question, not by position — and computes only the new ones. One process writes a folder at a time:
a second is refused, naming the first. The lock is the operating system's (`filelock`), so a writer killed
even by SIGKILL leaves no stale lock behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import filelock
import numpy as np
import pandas as pd
import yaml

from mmscope.errors import MMScopeError, known, suggest, yaml_problem
from mmscope.experiments.options import OptionError

VERSIONED = ("mmscope", "torch", "transformers", "nnsight", "datasets", "wandb", "einops")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Options that say where and how a run is kept, not what it computes: a rerun may change them.
KEEPING = ("out", "wandb", "device_map")  # settings a rerun may change: where it writes, logs and runs
# Options that only choose which questions run: a rerun may widen them, keeping the questions already computed.
GROWABLE = ("limit", "categories")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


class RunFolderError(MMScopeError, ValueError):
    """A run folder that holds a different run, or cannot be read as one."""


class RunLockedError(MMScopeError, RuntimeError):
    """A run folder another process is writing."""


class RunDir:
    """One experiment's output folder, held (locked) from construction until `close()` or the `with` block's end.

    `hold=False` opens a folder another rank of the same sharded run holds, to write parts into (nothing checked
    or written beyond them).

    `config` must be plain data (YAML-serialisable); its `experiment` entry is what identifies the run."""

    def __init__(self, folder: str | Path, config: dict, hold: bool = True, keys: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        self.config = config
        self.config_file = self.folder / "config.yaml"
        self.units_file = self.folder / "units.json"
        keys = [str(key) for key in keys] if keys is not None else None
        self.keys = keys if keys is not None and len(set(keys)) == len(keys) else None  # repeated ids: positions
        self.grown: tuple[int, int] | None = None  # (units before, units now) when this run widened a finished one
        self._lock = None
        if self.parts.is_dir() and any(self.parts.iterdir()) and not self.units_file.exists():
            self.keys = None  # a folder written before units had identities: its parts are named by position
        if not hold:  # a rank of a sharded run: rank 0 checked the folder and holds it; this one writes parts
            if not self.parts.is_dir():
                raise RunFolderError(f"run folder {self.folder} has no parts/ folder; rank 0 should have made it")
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"run folder {self.folder} is a file; choose another --out")
        self._check_same_run()  # before anything is written: a refused run leaves the folder as it was
        self.parts.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(self.folder / "run.lock", timeout=0)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise RunLockedError(f"run folder {self.folder} is being written by {self._holder()}; wait for it to "
                                 "finish, or choose another --out") from None
        try:
            differences = self._check_same_run()  # again, now that no other process can write it
            _atomic_write(self.folder / "run.lock.json", json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode())
            if not self.config_file.exists() or differences:  # new, grown, or a start that failed (no results)
                stored = {**config, "versions": library_versions()}
                _atomic_write(self.units_file, json.dumps(self.keys).encode())
                _atomic_write(self.config_file, yaml.safe_dump(stored, sort_keys=False).encode())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let other processes write the folder."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _differences(self) -> dict[str, tuple]:
        """`option: (old there, new now)` for each setting of the run in the folder that differs from this one's."""
        if not self.config_file.exists():
            return {}
        try:
            previous = yaml.safe_load(self.config_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{self.config_file} is not valid YAML ({yaml_problem(error)}); "
                                 "delete the folder to start over") from None
        before = (previous or {}).get("experiment") if isinstance(previous, dict) else None
        if not isinstance(before, dict):
            raise RunFolderError(f"{self.config_file} records no experiment; it is not an mmscope run folder's")
        now = self.config.get("experiment", {})
        keys = [key for key in dict.fromkeys([*before, *now]) if key not in KEEPING]
        return {key: (before.get(key), now.get(key)) for key in keys if before.get(key) != now.get(key)}

    def _check_same_run(self) -> dict[str, tuple]:
        """Refuse a folder that holds results of a different run; the differences from a start that failed, which
        left no results and which this run replaces, or from a finished run this one widens (none: the same run,
        or a new folder)."""
        differences = self._differences()
        if differences and any(self.counts().values()):
            before = self._grows(differences)
            if before is None:
                listed = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differences.items())
                raise RunFolderError(f"{self.folder} holds results of a different run ({listed}); rerun with those "
                                     "settings to continue it, choose another --out, or delete the folder")
            self.grown = (before, len(self.keys))
        return differences

    def _grows(self, differences: dict[str, tuple]) -> int | None:
        """How many units the run in the folder had, when this run only widens it: it differs in `GROWABLE`
        options alone and its units include every unit of the run there (None otherwise)."""
        if not set(differences) <= set(GROWABLE) or self.keys is None or not self.units_file.exists():
            return None
        try:
            before = json.loads(self.units_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(before, list) or not set(before) <= set(self.keys):
            return None
        return len(before)

    def _holder(self) -> str:
        """Who holds the lock, as its holder recorded it."""
        try:
            holder = json.loads((self.folder / "run.lock.json").read_text())
            return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def _name(self, index: int) -> str:
        """A unit's file name: `q-<its id>` (or a hash of an id that is no plain file name), else its index."""
        if self.keys is None:
            return f"{index:06d}"
        key = self.keys[index]
        return f"q-{key}" if _PLAIN_NAME.fullmatch(key) else f"h-{hashlib.sha1(key.encode()).hexdigest()[:20]}"

    def part_path(self, index: int) -> Path:
        return self.parts / f"{self._name(index)}.parquet"

    def skip_path(self, index: int) -> Path:
        return self.parts / f"{self._name(index)}.skipped"

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
        # every part in the folder is one of this run's units (a grown run's earlier ones included)
        return {"used": len(list(self.parts.glob("*.parquet"))), "skipped": len(list(self.parts.glob("*.skipped")))}

    def used(self) -> list[int]:
        """The indices of the units that produced rows, in order."""
        if self.keys is None:
            return sorted(int(path.stem) for path in self.parts.glob("*.parquet"))
        return [index for index in range(len(self.keys)) if self.part_path(index).exists()]

    def write_results(self) -> pd.DataFrame:
        """Write all rows so far, in example order, to `results.parquet`, and return them (each unit's `example`
        column is its index in this run, whichever run computed it)."""
        frames = []
        for index in self.used():
            frame = _read_part(self.part_path(index))
            frames.append(frame.assign(example=index) if "example" in frame.columns else frame)
        frames = [frame for frame in frames if len(frame)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        table.to_parquet(self.folder / "results.parquet", index=False)
        return table


CI_METHODS = ("normal", "bootstrap")
BOOTSTRAP_SAMPLES = 1000  # seaborn's default n_boot


def summarize(table: pd.DataFrame, by: list[str], value: str, ci: str = "normal", seed: int = 0) -> pd.DataFrame:
    """Mean, 95% confidence interval and count of `value` per group of `by`.

    `ci="normal"`: mean ± 1.96 standard errors. `ci="bootstrap"`: the 2.5th and 97.5th percentiles of the means of
    1000 resamples with replacement (seaborn's default error band, which the study's figures use), drawn from
    `numpy.random.default_rng(seed)` group after group in the summary's order — the same seed, the same band.
    """
    if ci not in CI_METHODS:
        raise OptionError(f"unknown confidence-interval method {ci!r}; known: {known(CI_METHODS)}"
                          f"{suggest(ci, CI_METHODS)}")
    grouped = table.groupby(by, sort=True)[value]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    if ci == "normal":
        half_width = 1.96 * summary["std"].fillna(0.0) / summary["n"].clip(lower=1) ** 0.5
        summary["ci_low"], summary["ci_high"] = summary["mean"] - half_width, summary["mean"] + half_width
    else:
        generator = np.random.default_rng(seed)
        bands = [bootstrap_interval(values.to_numpy(dtype=float), generator) for _, values in grouped]
        summary["ci_low"], summary["ci_high"] = [band[0] for band in bands], [band[1] for band in bands]
    return summary.drop(columns="std")


def bootstrap_interval(values: np.ndarray, generator: np.random.Generator,
                       samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of `values` (NaNs left out, as seaborn does)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[generator.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _read_part(path: Path) -> pd.DataFrame:
    """One finished example's rows; a damaged part file is an error naming it (deleting it recomputes it)."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise RunFolderError(f"result part {path} is damaged ({' '.join(str(error).split())[:120]}); delete it "
                             "and run the same command again to recompute it") from None


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)

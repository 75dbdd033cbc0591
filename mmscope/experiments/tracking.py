"""Weights & Biases logging of a finished sweep: config, per-layer curves, figures, and the results table.

Offline unless an API key is configured (`WANDB_MODE=offline` is set for you), so a run always leaves a local
record under `<run folder>/wandb/` that `wandb sync` can upload later. Curves are logged with the layer as the
x axis (`define_metric`; the W&B step is its rank, as steps cannot be negative and the embeddings are layer −1),
one metric per (panel, curve) — e.g. `knockout/ChooseAttr/image->last` — so each is a line chart.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def log_run(folder: Path, name: str, config: dict, summary: pd.DataFrame, *, x: str, keys: list[str],
            figures: list[Path], results: Path | None = None, scalars: dict[str, float] | None = None) -> str:
    """Log one run; returns the report's line saying where it went: the run's page online, or offline its local
    folder and the `wandb sync` command that uploads it. `keys` name the summary columns a curve is keyed by;
    `scalars` go into the run's summary."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project="mmscope", name=name, job_type=config.get("experiment", {}).get("kind", "sweep"),
                     config=config, dir=str(folder), reinit="finish_previous")
    try:
        # W&B steps count up from 0, and a record at a negative step is dropped (the embeddings are layer −1):
        # step i is the i-th value of `x`, which is logged beside it as the charts' x axis
        run.define_metric(x)
        run.define_metric(f"{name}/*", step_metric=x)
        for step, (value, at_step) in enumerate(summary.groupby(x, sort=True)):
            metrics = {
                "/".join([name, *(str(part) for part in (key if isinstance(key, tuple) else (key,)))]): row["mean"]
                for key, row in at_step.set_index(keys).iterrows()
            }
            run.log({**metrics, x: value}, step=step)
        run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in figures})
        run.log({"summary": wandb.Table(dataframe=summary)})
        run.summary.update(scalars or {})
        if results is not None:
            artifact = wandb.Artifact(f"{name}-results", type="results")
            artifact.add_file(str(results))
            run.log_artifact(artifact)
        local = Path(run.dir).parent  # wandb/offline-run-<time>-<id>/files → its run folder
        if run.offline:
            return f"W&B: logged offline to {local}; upload it with: wandb sync {local}"
        return f"W&B: {run.url}"
    finally:
        run.finish()

"""Turn finished sweeps into what a person reads: summary tables, figures, and the W&B record.

One function per experiment, each: summary → figure(s) → optional W&B → printed text. The sweeps themselves
live in their own modules; this is the only place that knows how each is summarised and drawn.
"""

from __future__ import annotations

import pandas as pd

from mmscope.experiments.common import finish
from mmscope.experiments.figures import curves, heatmap
from mmscope.experiments.runs import RunDir
from mmscope.experiments.tracking import log_run


def _counts_line(counts: dict[str, int], what: str = "examples") -> str:
    return f"{counts['used']} {what} used, {counts['skipped']} skipped (answered wrongly or lacking a group)"


def knockout_report(run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    table, summary = finish(run, "delta_pct", ["category", "flow", "center"])
    if summary.empty:
        return _counts_line(counts)
    window = int(table["window"].iloc[0])
    figure = curves(summary, run.folder / "knockout.png", x="center", hue="flow", panel="category",
                    ylabel="Δp (%)", title=f"Attention knockout, window {window}", zero_line=True)
    if wandb:
        log_run(run.folder, "knockout", run.config, summary, x="center", keys=["category", "flow"],
                figures=[figure], results=run.folder / "results.parquet")
    worst = summary.loc[summary.groupby(["category", "flow"])["mean"].idxmin()]
    findings = worst.rename(columns={"center": "worst center", "mean": "mean Δp %"})
    findings = findings.pivot(index="category", columns="flow", values=["worst center", "mean Δp %"])
    lines = [_counts_line(counts), "", "Largest mean drop of p(answer) per category and flow (centre layer, Δp %):"]
    merged = pd.DataFrame({
        flow: [f"L{int(findings.loc[c, ('worst center', flow)])}: {findings.loc[c, ('mean Δp %', flow)]:+.1f}"
               for c in findings.index]
        for flow in table["flow"].unique()  # in the order the flows were asked for
    }, index=findings.index)
    lines += [merged.to_string(), "", f"figure: {figure}", f"table:  {run.folder / 'results.parquet'}"]
    return "\n".join(lines)


def lens_report(run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    table, summary = finish(run, "prob", ["category", "token", "layer"])
    if summary.empty:
        return _counts_line(counts)
    lens = table["lens"].iloc[0]
    figure = curves(summary, run.folder / "lens.png", x="layer", hue="token", panel="category",
                    ylabel="probability", title=f"Logit lens at the last position ({lens})")
    if wandb:
        log_run(run.folder, "lens", run.config, summary, x="layer", keys=["category", "token"], figures=[figure],
                results=run.folder / "results.parquet")
    answer = summary[summary["token"] == "answer"].pivot(index="category", columns="layer", values="mean")
    note = ("raw lens: hidden states go straight to lm_head, without the final norm, as in the study"
            if lens == "raw" else "normed lens: hidden states pass the final norm before lm_head")
    return "\n".join([_counts_line(counts), note, "", "Mean p(answer) by layer:",
                      answer.to_string(float_format=lambda v: f"{v:.3f}"), "", f"figure: {figure}"])


def truncate_report(run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    table, summary = finish(run, "p_answer", ["category", "layer"])
    if summary.empty:
        return _counts_line(counts)
    top1 = table.groupby(["category", "layer"])["top1"].mean().unstack("layer")
    figure = curves(summary.assign(curve="p(answer)"), run.folder / "truncate.png", x="layer", hue="curve",
                    panel="category", ylabel="p(answer) after early exit", title="Truncation sweep")
    if wandb:
        log_run(run.folder, "truncate", run.config, summary, x="layer", keys=["category"], figures=[figure],
                results=run.folder / "results.parquet")
    return "\n".join([_counts_line(counts), "", "Answer still top-1 when exiting after layer ℓ (share):",
                      top1.to_string(float_format=lambda v: f"{v:.2f}"), "", f"figure: {figure}"])


def patch_report(run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    table, summary = finish(run, "restored", ["group", "layer"])
    if summary.empty:
        return _counts_line(counts)
    matrix = summary.pivot(index="group", columns="layer", values="mean")
    figure = heatmap(matrix, run.folder / "patch.png", title="Clean → corrupted activation patching",
                     colorbar="share of p(answer) restored")
    if wandb:
        log_run(run.folder, "patch", run.config, summary, x="layer", keys=["group"], figures=[figure],
                results=run.folder / "results.parquet")
    return "\n".join([_counts_line(counts), "", "Share of the clean answer probability restored (mean):",
                      matrix.to_string(float_format=lambda v: f"{v:+.2f}"), "", f"figure: {figure}"])


def probe_report(run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    table = run.results()
    if table.empty:
        return "no probes trained"
    table["curve"] = table["task"] + " / " + table["pooling"]
    summary = table.rename(columns={"accuracy": "mean"}).assign(ci_low=lambda t: t["mean"], ci_high=lambda t: t["mean"])
    summary[["curve", "layer", "mean", "n"]].to_csv(run.folder / "summary.csv", index=False)
    figure = curves(summary, run.folder / "probe.png", x="layer", hue="curve", panel=None,
                    ylabel="held-out accuracy", title="Layer-wise probes")
    if wandb:
        log_run(run.folder, "probe", run.config, summary[["curve", "layer", "mean", "ci_low", "ci_high", "n"]],
                x="layer", keys=["curve"], figures=[figure], results=run.folder / "results.parquet")
    pivot = table.pivot_table(index="layer", columns="curve", values="accuracy")
    best = {curve: int(pivot[curve].idxmax()) for curve in pivot.columns}
    lines = ["Held-out probe accuracy by layer (layer 0 = embeddings):",
             pivot.to_string(float_format=lambda v: f"{v:.3f}"), "",
             "best layer: " + ", ".join(f"{curve} → {layer}" for curve, layer in best.items())]
    if "f1" in table:
        f1 = table.dropna(subset=["f1"]).pivot_table(index="layer", columns="curve", values="f1")
        lines += ["", "object recognition micro-F1:", f1.to_string(float_format=lambda v: f"{v:.3f}")]
    return "\n".join([*lines, "", f"figure: {figure}"])


REPORTS = {"knockout": knockout_report, "lens": lens_report, "truncate": truncate_report, "patch": patch_report,
           "probe": probe_report}


def report(kind: str, run: RunDir, counts: dict[str, int], wandb: bool) -> str:
    return REPORTS[kind](run, counts, wandb)

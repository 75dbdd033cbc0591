"""Figures in the studies' style: one panel per category, a mean line with its 95% CI band per curve.

Every curve name (`hue` value) keeps one colour in all panels of a figure (`hue_colours`: a fixed mapping from the
figure's hue values); each band is clipped to its quantity's range (`limits`: Δp% ≥ −100, a probability or a
share in [0, 1]); each panel's title says how many questions (or examples) its means average (`n_text`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmscope.sites import EMBEDDINGS, layer_name  # noqa: E402

if TYPE_CHECKING:
    from mmscope.experiments.references import Reference

PROBABILITY = (0.0, 1.0)  # the range of a probability, a share or an accuracy
DELTA_PCT = (-100.0, None)  # Δp% = (p' − p) / p · 100 ≥ −100: p' ≥ 0


def hue_colours(values: Iterable) -> dict:
    """One colour per distinct value, in the order given (first seen first): tab10's for up to 10 values,
    tab20's for up to 20, evenly spaced hues beyond."""
    names = list(dict.fromkeys(values))
    if len(names) <= 10:
        palette = [f"C{i}" for i in range(10)]
    elif len(names) <= 20:
        palette = list(plt.get_cmap("tab20").colors)
    else:
        palette = [plt.get_cmap("hsv")(i / len(names)) for i in range(len(names))]
    return {name: palette[i] for i, name in enumerate(names)}


def n_text(n: pd.Series | np.ndarray | Sequence[int]) -> str:
    """`n=5`, or `n=3–5` where the means of one panel average different numbers (e.g. flows that need a box)."""
    counts = pd.Series(n, dtype=float).dropna()
    if counts.empty:
        return "n=0"
    low, high = int(counts.min()), int(counts.max())
    return f"n={low}" if low == high else f"n={low}–{high}"


def name_layers(axis, x: str, values: Iterable) -> None:
    """On a layer axis that shows the embeddings (layer −1, `mmscope.sites`), a tick at every layer drawn, the
    embeddings' named."""
    values = sorted({int(v) for v in values})
    if x == "layer" and EMBEDDINGS in values:
        axis.set_xticks(values, [layer_name(v) for v in values])
        first = axis.get_xticklabels()[0]  # the long name leans left, clear of layer 0's number
        first.set_rotation(30)
        first.set_horizontalalignment("right")


def clipped(values: pd.Series, limits: tuple[float | None, float | None] | None) -> pd.Series:
    """`values` clipped to `limits` (low, high; None: unbounded on that side)."""
    if limits is None:
        return values
    return values.clip(lower=limits[0], upper=limits[1])


def curves(summary: pd.DataFrame, path: Path, *, x: str, hue: str, panel: str | None, ylabel: str,
           title: str, zero_line: bool = False, overlay: Sequence[Reference] | None = None,
           limits: tuple[float | None, float | None] | None = None, hue_order: Sequence | None = None,
           styles: dict | None = None, n_note: str = "") -> Path:
    """Plot `mean` against `x` with a `ci_low`–`ci_high` band, one line per `hue`, one panel per `panel`.

    Each hue value has one colour in every panel (in `hue_order`, then sorted; the legend's order too) and its
    `styles` line style (solid by default); bands are clipped to `limits`; each panel's title carries the `n`
    of its means (followed by `n_note`, e.g. what n counts); a curve equal to one drawn before in its panel adds
    no second band. `overlay`: published curves, drawn dashed in the colour of the `hue` they name (black when
    none) on the panel they name (every panel when none), at the same relative depth when they come from a
    model of other depth.
    """
    depth = int(summary[x].max()) + 1
    panels = sorted(summary[panel].unique()) if panel else [None]
    order = [h for h in (hue_order or ()) if h in set(summary[hue])]
    order += sorted(set(summary[hue]) - set(order), key=str)
    colours = hue_colours(order)
    styles = styles or {}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(max(4.2 * columns, 6.5), 3.2 * rows + 0.8), squeeze=False,
                                sharey=True)
    legend = {str(label): None for label in order}  # label -> handle, in the hue order, then the overlays
    for axis, name in zip(axes.flat, panels, strict=False):
        part = summary if name is None else summary[summary[panel] == name]
        banded = set()  # the bands drawn: a curve equal to one drawn before (e.g. two names of one token) adds none
        for label in order:
            curve = part[part[hue] == label].sort_values(x)
            if curve.empty:
                continue
            (line,) = axis.plot(curve[x], curve["mean"], label=str(label), linewidth=1.6, color=colours[label],
                                linestyle=styles.get(label, "-"))
            low, high = clipped(curve["ci_low"], limits), clipped(curve["ci_high"], limits)
            # the same means, the same data (e.g. two names of one token): bootstrap bands of it differ by chance
            band = tuple(tuple(np.round(values, 12)) for values in (curve[x], curve["mean"]))
            if band not in banded:
                axis.fill_between(curve[x], low, high, color=colours[label], alpha=0.2, linewidth=0)
                banded.add(band)
            legend[str(label)] = legend[str(label)] or line
        for reference in overlay or ():
            if reference.category is not None and name is not None and reference.category != name:
                continue
            rescaled = reference.n_layers is not None and reference.n_layers != depth
            label = reference.label + (f" ({reference.flow}" if reference.flow else " (")
            label += f", {reference.n_layers} layers at relative depth)" if rescaled else ")"
            (line,) = axis.plot(reference.centers_for(depth), reference.mean, linestyle="--", linewidth=1.4,
                                color=colours.get(reference.flow, "black"), label=label)
            legend.setdefault(label, line)
        if zero_line:
            axis.axhline(0, color="grey", linewidth=0.8)
        counted = n_text(part["n"]) + n_note if "n" in part else None
        heading = str(name) if name is not None else ""
        axis.set_title(f"{heading} ({counted})" if heading and counted else heading or counted or "", fontsize=10)
        axis.set_xlabel(x.replace("_", " "))
        name_layers(axis, x, part[x])
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel(ylabel)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    legend = {label: handle for label, handle in legend.items() if handle is not None}
    columns_of_legend = max(1, min(len(legend), columns + 1))
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=columns_of_legend, fontsize=8,
                  frameon=False)
    legend_rows = -(-len(legend) // columns_of_legend)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, min(0.45, 0.28 * legend_rows / figure.get_figheight() + 0.02), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def heatmap(matrix: pd.DataFrame, path: Path, *, title: str, colorbar: str, n: pd.DataFrame | None = None,
            limits: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """A (rows × columns) heatmap, e.g. token group × layer, its colours over `limits` (the colour bar shows an
    arrow where values pass them). `n`: the count behind each cell (same shape), shown per row and in the
    title."""
    values = matrix.to_numpy(dtype=float)
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * matrix.shape[1] + 2.6), 0.6 * matrix.shape[0] + 1.8))
    image = axis.imshow(values, aspect="auto", cmap="RdBu_r", vmin=limits[0], vmax=limits[1])
    rows = [str(r) for r in matrix.index]
    if n is not None:
        n = n.reindex(index=matrix.index, columns=matrix.columns)
        rows = [f"{row} ({n_text(n.loc[label])})" for row, label in zip(rows, matrix.index, strict=True)]
        title = f"{title} ({n_text(n.to_numpy().ravel())})"
    axis.set_xticks(range(matrix.shape[1]), [layer_name(c) for c in matrix.columns])
    axis.set_yticks(range(matrix.shape[0]), rows)
    axis.set_xlabel(str(matrix.columns.name or "layer"))
    axis.set_title(title, fontsize=10)
    finite = values[np.isfinite(values)]
    below, above = bool((finite < limits[0]).any()), bool((finite > limits[1]).any())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"
    figure.colorbar(image, ax=axis, label=colorbar, extend=extend)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def heatmaps(panels: dict[str, pd.DataFrame], path: Path, *, colorbar: str, title: str, rows: str, columns: str,
             per_row: int = 2) -> Path:
    """One heatmap per panel (title → a rows × columns matrix, e.g. edit centre × probed layer), at most
    `per_row` in a row, on one symmetric colour scale (blue below 0, red above) and one colour bar; the
    columns' layer numbers name the embeddings."""
    names = list(panels)
    values = np.concatenate([panels[name].to_numpy(dtype=float).ravel() for name in names])
    finite = values[np.isfinite(values)]
    scale = max(float(np.abs(finite).max()) if len(finite) else 0.0, 1e-3)
    across = min(per_row, len(names))
    down = -(-len(names) // across)
    first = panels[names[0]]
    width = max(3.2, 0.42 * first.shape[1] + 1.4)
    figure, axes = plt.subplots(down, across, figsize=(width * across + 1.2, (0.32 * first.shape[0] + 1.5) * down + 0.8),
                                squeeze=False)
    image = None
    for axis, name in zip(axes.flat, names, strict=False):
        matrix = panels[name]
        image = axis.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale)
        axis.set_xticks(range(matrix.shape[1]), [layer_name(c) for c in matrix.columns], fontsize=8)
        axis.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index], fontsize=8)
        axis.set_xlabel(columns)
        axis.set_ylabel(rows)
        axis.set_title(name, fontsize=9)
        shown = matrix.to_numpy(dtype=float)
        if np.isfinite(shown).any() and np.nanmax(np.abs(shown)) == 0:
            axis.text(0.5, 0.5, "no change anywhere", transform=axis.transAxes, ha="center", va="center",
                      fontsize=9, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"})
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.suptitle("\n".join(textwrap.wrap(title, max(40, int(figure.get_figwidth() * 11)))), fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.9, 0.97))
    figure.colorbar(image, ax=axes.ravel().tolist(), label=colorbar, fraction=0.03)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def curves_with_controls(summary: pd.DataFrame, path: Path, *, x: str, hue: str, controls: dict[str, str],
                         difference: str, ylabel: str, title: str, n_note: str = "") -> Path:
    """Two panels. Left: `mean` against `x`, a solid line per `hue`, and in its colour each `controls` column
    (column → legend name; dashed, then dotted). Right: the `difference` column (e.g. selectivity) per `hue`,
    with a zero line. Bands where the summary has them: `ci_low`–`ci_high` around `mean`, `<difference>_low`–
    `<difference>_high` around the difference. Each hue's legend entry carries its `n`, each panel's title the
    range of them, the figure's title `n_note` (what n counts)."""
    figure, (scores, differences) = plt.subplots(1, 2, figsize=(9.6, 4.6))
    styles = ["--", ":", "-."]
    colours = hue_colours(sorted(summary[hue].unique(), key=str))
    for label, curve in summary.groupby(hue, sort=True):
        curve = curve.sort_values(x)
        colour = colours[label]
        name = f"{label} ({n_text(curve['n'])})" if "n" in curve else str(label)
        scores.plot(curve[x], curve["mean"], color=colour, linewidth=1.6, label=name)
        if "ci_low" in curve:
            scores.fill_between(curve[x], clipped(curve["ci_low"], PROBABILITY), clipped(curve["ci_high"], PROBABILITY),
                                color=colour, alpha=0.15, linewidth=0)
        for style, column in zip(styles, controls, strict=False):
            scores.plot(curve[x], curve[column], color=colour, linewidth=1.1, linestyle=style, alpha=0.8)
        differences.plot(curve[x], curve[difference], color=colour, linewidth=1.6, label=name)
        if f"{difference}_low" in curve:
            differences.fill_between(curve[x], curve[f"{difference}_low"], curve[f"{difference}_high"], color=colour,
                                     alpha=0.15, linewidth=0)
    for style, name in zip(styles, controls.values(), strict=False):
        scores.plot([], [], color="grey", linestyle=style, label=name)
    differences.axhline(0, color="grey", linewidth=0.8)
    counted = f" ({n_text(summary['n'])})" if "n" in summary else ""
    scores.set_title(ylabel + counted, fontsize=10)
    differences.set_title(difference.replace("_", " ") + counted, fontsize=10)
    for axis in (scores, differences):
        axis.set_xlabel(x.replace("_", " "))
        name_layers(axis, x, summary[x])
        axis.grid(alpha=0.3)
    handles, labels = scores.get_legend_handles_labels()  # below the panels, where it hides no curve
    ncol = min(len(labels), 3)
    figure.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    figure.suptitle(f"{title} (n: {n_note})" if n_note else title)
    figure.tight_layout(rect=(0, min(0.4, 0.22 * -(-len(labels) // ncol) / figure.get_figheight() + 0.02), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def estimate_scatter(table: pd.DataFrame, path: Path, *, panel: Sequence[str], quantity: str, title: str) -> Path:
    """The first-order estimate against the exact effect of every verified row (`verified` "top" or "random";
    columns `estimate`, `exact`), a panel per `panel` group: the largest estimates in red, the random others in
    grey, y = x dashed; each panel's title its counts and Spearman's ρ over them."""
    from scipy import stats

    verified = table[table["verified"].isin(["top", "random"])]
    groups = list(verified.groupby(list(panel), sort=False)) if panel else [((), verified)]
    if not groups:
        groups = [(("no verified row",), verified)]
    across = min(3, len(groups))
    down = -(-len(groups) // across)
    figure, axes = plt.subplots(down, across, figsize=(4.2 * across, 4.0 * down), squeeze=False)
    for axis, (key, part) in zip(axes.flat, groups, strict=False):
        for which, colour, label in (("random", "grey", "random others"), ("top", "C3", "largest |estimate|")):
            chosen = part[part["verified"] == which]
            axis.scatter(chosen["estimate"], chosen["exact"], s=12, alpha=0.7, color=colour,
                         label=f"{label} (n={len(chosen)})")
        values = part[["estimate", "exact"]].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            pad = 0.05 * (high - low or 1.0)
            axis.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="black", linewidth=0.8,
                      label="y = x")
        rho = stats.spearmanr(part["estimate"], part["exact"]).statistic if len(part) > 2 else float("nan")
        name = " · ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        axis.set_title(f"{name}\n{part['example'].nunique() if 'example' in part else 0} questions, "
                       f"Spearman ρ {rho:+.2f}", fontsize=9)
        axis.set_xlabel(f"estimated {quantity} (first order)")
        axis.set_ylabel(f"exact {quantity}")
        axis.axhline(0, color="lightgrey", linewidth=0.6, zorder=0)
        axis.axvline(0, color="lightgrey", linewidth=0.6, zorder=0)
        axis.legend(fontsize=7, loc="best")
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

"""Figures in the studies' style: one panel per category, a mean line with its 95% CI band per curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:
    from mmscope.experiments.references import Reference


def curves(summary: pd.DataFrame, path: Path, *, x: str, hue: str, panel: str | None, ylabel: str,
           title: str, zero_line: bool = False, overlay: Sequence[Reference] | None = None) -> Path:
    """Plot `mean` against `x` with a `ci_low`–`ci_high` band, one line per `hue`, one panel per `panel`.

    `overlay`: published curves, drawn dashed in the colour of the `hue` they name (black when none) on the panel
    they name (every panel when none), at the same relative depth when they come from a model of other depth.
    """
    depth = int(summary[x].max()) + 1
    panels = sorted(summary[panel].unique()) if panel else [None]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(max(4.2 * columns, 6.5), 3.2 * rows + 0.8), squeeze=False,
                                sharey=True)
    for axis, name in zip(axes.flat, panels, strict=False):
        part = summary if name is None else summary[summary[panel] == name]
        colours = {}
        for label, curve in part.groupby(hue, sort=True):
            curve = curve.sort_values(x)
            (line,) = axis.plot(curve[x], curve["mean"], label=str(label), linewidth=1.6)
            colours[label] = line.get_color()
            axis.fill_between(curve[x], curve["ci_low"], curve["ci_high"], alpha=0.2)
        for reference in overlay or ():
            if reference.category is not None and name is not None and reference.category != name:
                continue
            rescaled = reference.n_layers is not None and reference.n_layers != depth
            label = reference.label + (f" ({reference.flow}" if reference.flow else " (")
            label += f", {reference.n_layers} layers at relative depth)" if rescaled else ")"
            axis.plot(reference.centers_for(depth), reference.mean, linestyle="--", linewidth=1.4,
                      color=colours.get(reference.flow, "black"), label=label)
        if zero_line:
            axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_title(str(name) if name is not None else title, fontsize=10)
        axis.set_xlabel(x.replace("_", " "))
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel(ylabel)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    legend = {}  # one legend for every panel, below them: label -> handle
    for axis in axes.flat[: len(panels)]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    columns_of_legend = max(1, min(len(legend), columns + 1))
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=columns_of_legend, fontsize=8,
                  frameon=False)
    legend_rows = -(-len(legend) // columns_of_legend)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, min(0.45, 0.28 * legend_rows / figure.get_figheight() + 0.02), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def heatmap(matrix: pd.DataFrame, path: Path, *, title: str, colorbar: str) -> Path:
    """A (rows × columns) heatmap, e.g. token group × layer."""
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * matrix.shape[1] + 2), 0.6 * matrix.shape[0] + 1.8))
    image = axis.imshow(matrix.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    axis.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    axis.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index])
    axis.set_xlabel(str(matrix.columns.name or "layer"))
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label=colorbar)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def curves_with_controls(summary: pd.DataFrame, path: Path, *, x: str, hue: str, controls: dict[str, str],
                         difference: str, ylabel: str, title: str) -> Path:
    """Two panels. Left: `mean` against `x`, a solid line per `hue`, and in its colour each `controls` column
    (column → legend name; dashed, then dotted). Right: the `difference` column (e.g. selectivity) per `hue`,
    with a zero line."""
    figure, (scores, differences) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    styles = ["--", ":", "-."]
    for number, (label, curve) in enumerate(summary.groupby(hue, sort=True)):
        curve = curve.sort_values(x)
        colour = f"C{number}"
        scores.plot(curve[x], curve["mean"], color=colour, linewidth=1.6, label=str(label))
        for style, column in zip(styles, controls, strict=False):
            scores.plot(curve[x], curve[column], color=colour, linewidth=1.1, linestyle=style, alpha=0.8)
        differences.plot(curve[x], curve[difference], color=colour, linewidth=1.6, label=str(label))
    for style, name in zip(styles, controls.values(), strict=False):
        scores.plot([], [], color="grey", linestyle=style, label=name)
    differences.axhline(0, color="grey", linewidth=0.8)
    scores.set_title(ylabel, fontsize=10)
    differences.set_title(difference.replace("_", " "), fontsize=10)
    for axis in (scores, differences):
        axis.set_xlabel(x.replace("_", " "))
        axis.grid(alpha=0.3)
    scores.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

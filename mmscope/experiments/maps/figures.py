"""The map figures: `map_<example>.png`, each region's value over the input image, and `map.png`, the maps
averaged in object-centred coordinates.

A row of panels per kind × target (× grid, over the image), a panel per layer or knockout window, wrapped past
`MAX_COLUMNS`; one colour scale and colour bar per kind (`kind_scale`), and a panel that shows nothing says so
(`empty_note`). `map_figure` draws them all from a finished run's results.parquet.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mmscope.experiments.declarations import MapOptions
from mmscope.experiments.maps.kinds import ESTIMATES, VERIFIED, kind_values
from mmscope.experiments.figures import estimate_scatter
from mmscope.experiments.runner import Finished, boxes_of
from mmscope.experiments.scores import MIN_EFFECT

MAPPED_EXAMPLES = 6  # the examples drawn one PNG each
CENTRED_CELLS = 24  # the object-centred grid's side: the box spans the middle third


@dataclass(frozen=True)
class Scale:
    """One kind's colour scale: its norm, colour map and colour bar label."""

    norm: object
    cmap: object
    label: str


def kind_scale(kind: str, values: pd.Series) -> Scale:
    """Knockout and patch: symmetric about 0 (red up, blue down); lens and attention: 0 to the largest value."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm

    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    bad = "lightgrey"  # NaN: a share where the corruption did not move p, outside the image, or not verified
    if kind in CHANGES:
        limit = float(finite.abs().max()) if len(finite) else 0.0
        limit = limit if limit > 0 else 1.0
        label = CHANGE_LABELS[kind]
        return Scale(TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit), plt.get_cmap("RdBu_r").with_extremes(
            bad=bad), label)
    top = float(finite.max()) if len(finite) else 0.0
    label = "lens probability" if kind == "lens" else "attention weight"
    return Scale(Normalize(vmin=0.0, vmax=top if top > 0 else 1.0), plt.get_cmap("Reds").with_extremes(bad=bad),
                 label)


# The kinds whose values are changes (a diverging scale about 0), and their colour bars' labels.
CHANGE_LABELS = {"knockout": "Δp (%)", "patch": "share of p(answer) restored",
                 "atp-knockout": "estimated Δ metric (first order)", "atp-patch": "estimated Δ metric (first order)",
                 **{VERIFIED[kind]: "exact Δ metric (verified regions)" for kind in ESTIMATES}}
CHANGES = tuple(CHANGE_LABELS)


def knockout_spans(table: pd.DataFrame) -> dict[int, tuple[int, int]]:
    """Per knockout centre, the first and last layer of its window (from the rows)."""
    rows = table[table["kind"].isin(["knockout", "atp-knockout"])].drop_duplicates("center")
    return {int(r["center"]): (int(r["first_layer"]), int(r["last_layer"])) for _, r in rows.iterrows()}


def attention_head(table: pd.DataFrame) -> int | None:
    """The head the attention rows read (`--head`), or None for the mean over heads."""
    rows = table[table["kind"] == "attention"]
    if rows.empty or "head" not in rows or int(rows["head"].iloc[0]) < 0:
        return None
    return int(rows["head"].iloc[0])


def panel_title(kind: str, target: str, layer: int, grid: int, spans: dict[int, tuple[int, int]],
                head: int | None = None) -> str:
    """A panel's title: what was done or read, in which layers (and head, and which grid, past the finest)."""
    scale = f", grid {grid} (coarser)" if grid else ""
    for estimated in ESTIMATES:
        if kind in (estimated, VERIFIED[estimated]):
            said = "estimated" if kind == estimated else "exact, verified regions"
            return f"{said}: {panel_title(estimated.removeprefix('atp-'), target, layer, grid, spans)}"
    if kind == "knockout":
        first, last = spans[layer]
        return f"blocked region → {target}, layers {first}-{last}{scale}"
    if kind == "patch":
        return f"patched {target}, layer {layer}{scale}"
    if kind == "lens":
        return f"lens p({target}), layer {layer}{scale}"
    return f"attention {target} → region, layer {layer}{'' if head is None else f', head {head}'}{scale}"


def panel_rows(part: pd.DataFrame) -> list[tuple[str, str, int]]:
    """The (kind, target, grid) rows of an example's figure, in the table's order."""
    return list(dict.fromkeys(zip(part["kind"], part["target"], part["grid"].astype(int), strict=True)))


MAX_COLUMNS = 4  # panels per row of a map figure; a kind × target with more panels wraps onto further rows
PANEL_INCHES = 2.6  # a map panel's height (its width follows the image's aspect)
COLOUR_BAR_INCHES = 1.3  # the colour bars' column, with their labels
# Below these |values| a panel is called empty and says so (knockout: Δp in %, i.e. 0.1 % of p(answer); patch: a
# share restored of 0.001; lens: a probability; attention: a weight).
NO_EFFECT = {"knockout": 0.1, "patch": 1e-3, "lens": 1e-3, "attention": 1e-3,
             **{kind: 1e-4 for kind in (*ESTIMATES, *VERIFIED.values())}}  # estimates: a change of the metric
FAINT = 0.05  # a panel whose |values| stay under this share of its colour scale looks empty: it says how small


def empty_note(kind: str, values, scale_max: float | None = None) -> str | None:
    """What a panel of `kind` whose `values` show nothing should say on it: no finite value (patch: the
    corruption moved p(answer) too little for a share), every |value| below `NO_EFFECT[kind]`, or (given the
    colour scale's largest |value|, `scale_max`) every |value| under `FAINT` of it, too pale to see; None when
    the panel shows something."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        if kind in VERIFIED.values():
            return "no region of this panel verified"
        return (f"no value: the corrupted image moved\np(answer) by < {MIN_EFFECT:g} (nothing to restore)"
                if kind == "patch" else "no value")
    top, bound = float(np.abs(finite).max()), NO_EFFECT[kind]
    unit = " %" if kind == "knockout" else ""
    if top < bound and kind in CHANGES:
        return f"no measurable effect\n(|max| {top:.1g}{unit} < {bound:g}{unit})"
    if top < bound:
        return f"{'p' if kind == 'lens' else 'weight'} < {bound:g} everywhere\n(max {top:.1g})"
    if scale_max and top < FAINT * scale_max:
        largest = "|max|" if kind in CHANGES else "max"
        return f"faint on this scale:\n{largest} {top:.2g}{unit} (scale {scale_max:.2g}{unit})"
    return None


def map_panels(rows: Sequence[tuple[tuple, Sequence[int]]], aspect: float, title: str):
    """The figure of map panels: per (row key, its panel layers), a row of at most `MAX_COLUMNS` panels (more
    wrap onto the next), each `PANEL_INCHES` high and `aspect` times as wide, the colour bars to the right and
    the title wrapped to the width; no empty margin. Returns the figure, the axis of each (key, layer) and the
    axes of each figure row, by key (for the colour bars)."""
    import matplotlib.pyplot as plt

    columns = min(MAX_COLUMNS, max(len(layers) for _, layers in rows))
    lines = [(key, list(layers[i:i + columns])) for key, layers in rows for i in range(0, len(layers), columns)]
    width = columns * (PANEL_INCHES * aspect + 0.15) + COLOUR_BAR_INCHES
    wrapped = textwrap.wrap(title, max(40, int(width * 12)))
    height = len(lines) * (PANEL_INCHES + 0.45) + 0.22 * len(wrapped) + 0.2
    figure, axes = plt.subplots(len(lines), columns, figsize=(width, height), squeeze=False, layout="constrained")
    placed, by_key = {}, {}
    for r, (key, layers) in enumerate(lines):
        by_key.setdefault(key, []).extend(axes[r])
        for c, axis in enumerate(axes[r]):
            if c < len(layers):
                placed[key, layers[c]] = axis
            else:
                axis.set_visible(False)
    figure.suptitle("\n".join(wrapped), fontsize=9)
    return figure, placed, by_key


def write_empty_note(axis, kind: str, values, scale: Scale) -> None:
    """`empty_note`'s words on the panel, where it has any."""
    note = empty_note(kind, values, float(scale.norm.vmax))
    if note is not None:
        axis.text(0.5, 0.03, note, transform=axis.transAxes, ha="center", va="bottom", fontsize=7.5,
                  bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "grey", "boxstyle": "round"})


def panel_heading(text: str, aspect: float) -> str:
    """A panel title wrapped to the panel's width (fontsize 8)."""
    return "\n".join(textwrap.wrap(text, max(24, int(PANEL_INCHES * aspect * 16))))


def with_verified(part: pd.DataFrame) -> pd.DataFrame:
    """The rows of an example's map, each estimated kind × target's rows followed by a copy of kind `VERIFIED[kind]`
    (whose value is the exact one, NaN where not verified): the exact map beside the estimate."""
    pieces = []
    for (kind, _), own in part.groupby(["kind", "target"], sort=False):
        pieces.append(own)
        if kind in VERIFIED:
            pieces.append(own.assign(kind=VERIFIED[kind]))
    return pd.concat(pieces, ignore_index=True) if pieces else part


def draw_example_map(image: Image.Image, part: pd.DataFrame, boxes, path: Path, title: str) -> Path:
    """The input image with each region's value a semi-transparent colour over its rectangle: a row of panels
    per kind × target × grid (wrapped past `MAX_COLUMNS`), a panel per layer; one colour scale and colour bar
    per kind, the object boxes outlined; a panel that shows nothing says so (`empty_note`)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    part = with_verified(part)
    part = part.assign(value=kind_values(part))
    spans, head = knockout_spans(part), attention_head(part)
    rows = []
    for kind, target, grid in panel_rows(part):
        own = part[(part["kind"] == kind) & (part["target"] == target) & (part["grid"] == grid)]
        rows.append(((kind, target, grid), sorted(int(layer) for layer in own["layer"].unique())))
    aspect = image.width / image.height
    figure, placed, by_key = map_panels(rows, aspect, title)
    scales = {kind: kind_scale(kind, part[part["kind"] == kind]["value"]) for kind in dict.fromkeys(part["kind"])}
    for (kind, target, grid), layers in rows:
        own = part[(part["kind"] == kind) & (part["target"] == target) & (part["grid"] == grid)]
        scale = scales[kind]
        for layer in layers:
            axis = placed[(kind, target, grid), layer]
            axis.imshow(image, extent=(0, image.width, image.height, 0))
            panel = own[own["layer"] == layer]
            for _, row in panel.iterrows():
                colour = scale.cmap(scale.norm(row["value"]) if math.isfinite(row["value"]) else np.nan)
                axis.add_patch(Rectangle((row["x0"], row["y0"]), row["x1"] - row["x0"], row["y1"] - row["y0"],
                                         facecolor=colour, alpha=0.55, edgecolor="none"))
            for x, y, w, h in boxes:
                axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="black", linewidth=1.6))
            axis.set_xlim(0, image.width)
            axis.set_ylim(image.height, 0)
            axis.set_title(panel_heading(panel_title(kind, target, layer, grid, spans, head), aspect), fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            write_empty_note(axis, kind, panel["value"], scale)
    for kind, scale in scales.items():
        kind_axes = [axis for key, axes in by_key.items() if key[0] == kind for axis in axes]
        mappable = plt.cm.ScalarMappable(norm=scale.norm, cmap=scale.cmap)
        figure.colorbar(mappable, ax=kind_axes, label=scale.label, fraction=0.05, shrink=0.9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def object_centred(part: pd.DataFrame, box: Sequence[float], cells: int = CENTRED_CELLS) -> np.ndarray:
    """One map (the finest grid's regions of one example, kind, target and layer) resampled onto `cells` x
    `cells` points in coordinates normalised to the object box `(x, y, w, h)`: the box spans the middle third,
    each point takes the value of the region holding it (NaN outside the image)."""
    x, y, w, h = box
    fine = part[part["grid"] == part["grid"].min()]
    centres = (np.arange(cells) + 0.5) / cells * 3 - 1  # box units: 0..1 is the box
    px, py = x + centres * w, y + centres * h
    x0, x1 = fine["x0"].to_numpy(), fine["x1"].to_numpy()
    y0, y1 = fine["y0"].to_numpy(), fine["y1"].to_numpy()
    values = fine["value"].to_numpy(dtype=float)
    inside_x = (px[:, None] >= x0[None]) & (px[:, None] < x1[None])  # [cells, regions]
    inside_y = (py[:, None] >= y0[None]) & (py[:, None] < y1[None])
    holds = inside_y[:, None, :] & inside_x[None, :, :]  # [rows, cols, regions]
    found = holds.any(-1)
    return np.where(found, values[holds.argmax(-1)], np.nan)


def centred_maps(table: pd.DataFrame, boxes: dict[int, Sequence[float]]) -> dict[tuple[str, str, int], np.ndarray]:
    """Per (kind, target, layer), the mean object-centred map over the examples with a box (`boxes`: example →
    its question's first box)."""
    table = table.assign(value=kind_values(table))
    stacks: dict[tuple[str, str, int], list[np.ndarray]] = {}
    for (example, kind, target, layer), part in table.groupby(["example", "kind", "target", "layer"], sort=False):
        if int(example) in boxes:
            stacks.setdefault((kind, target, int(layer)), []).append(object_centred(part, boxes[int(example)]))
    means = {}
    for key, maps in stacks.items():
        stacked = np.stack(maps)
        counts = np.isfinite(stacked).sum(0)
        means[key] = np.where(counts > 0, np.nansum(stacked, 0) / np.maximum(counts, 1), np.nan)
    return means


def centred_counts(table: pd.DataFrame, boxes: dict[int, Sequence[float]]) -> dict[tuple[str, str, int], int]:
    """Per (kind, target, layer), how many examples with a box the object-centred mean averages: those with a
    finite value (a patch map without a share adds nothing)."""
    boxed = table[table["example"].astype(int).isin(list(boxes))]
    boxed = boxed.assign(finite=np.isfinite(kind_values(boxed).to_numpy(dtype=float)))
    per_example = boxed.groupby(["kind", "target", "layer", "example"], sort=False)["finite"].any()
    counted = per_example.groupby(level=["kind", "target", "layer"], sort=False).sum()
    return {(kind, target, int(layer)): int(n) for (kind, target, layer), n in counted.items()}


def draw_centred(means: dict[tuple[str, str, int], np.ndarray], n_examples: int, path: Path, region: int,
                 spans: dict[int, tuple[int, int]], counts: dict[tuple[str, str, int], int] | None = None,
                 head: int | None = None) -> Path:
    """`map.png`: the mean object-centred maps, a row per kind × target (wrapped past `MAX_COLUMNS`), a panel
    per layer, its title with the examples it averages (`counts`); the box (the middle third) outlined, one
    colour scale per kind; a panel that shows nothing says so (`empty_note`)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not means:
        figure, axis = plt.subplots(figsize=(5, 2))
        axis.text(0.5, 0.5, "no example with an object box: no object-centred map", ha="center", va="center")
        axis.axis("off")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path
    keys = list(dict.fromkeys((kind, target) for kind, target, _ in means))
    rows = [(key, sorted(layer for k, t, layer in means if (k, t) == key)) for key in keys]
    figure, placed, by_key = map_panels(rows, 1.0, f"Object-centred mean of {n_examples} examples with a box (the "
                                                   f"box: the middle third), regions {region}x{region}")
    scales = {kind: kind_scale(kind, pd.Series(np.concatenate([m.ravel() for key, m in means.items()
                                                                 if key[0] == kind])))
              for kind in dict.fromkeys(kind for kind, _ in keys)}
    for (kind, target), layers in rows:
        scale = scales[kind]
        for layer in layers:
            axis = placed[(kind, target), layer]
            axis.imshow(means[kind, target, layer], cmap=scale.cmap, norm=scale.norm, extent=(-1, 2, 2, -1))
            axis.add_patch(Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
            heading = panel_title(kind, target, layer, 0, spans, head)
            if counts is not None:
                heading += f" (n={counts.get((kind, target, layer), 0)})"
            axis.set_title(panel_heading(heading, 1.0), fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            write_empty_note(axis, kind, means[kind, target, layer], scale)
    for kind, scale in scales.items():
        kind_axes = [axis for key, axes in by_key.items() if key[0] == kind for axis in axes]
        figure.colorbar(plt.cm.ScalarMappable(norm=scale.norm, cmap=scale.cmap), ax=kind_axes, label=scale.label,
                        fraction=0.05, shrink=0.9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def map_figure(run: Finished[MapOptions], path: Path) -> list[Path]:
    """`map.png`, the object-centred mean maps, and `map_<example>.png` for the first examples of the run (over
    their questions' images); returns them all, `map.png` first."""
    table, dataset, options = run.table, run.data, run.options
    drawn = []
    for example in sorted(table["example"].unique())[:MAPPED_EXAMPLES]:
        row = dataset[int(example)]
        title = f"{row['question']} (answer {row['answer']!r}); regions {options.region}x{options.region}"
        drawn.append(draw_example_map(row["image"].convert("RGB"), table[table["example"] == example],
                                      boxes_of(row), path.parent / f"map_{int(example)}.png", title))
    boxes = {}
    for example in table.loc[table["has_object"], "example"].unique():
        found = boxes_of(dataset[int(example)])
        if found:
            boxes[int(example)] = found[0]
    centred = draw_centred(centred_maps(table, boxes), len(boxes), path, options.region, knockout_spans(table),
                           centred_counts(table, boxes), attention_head(table))
    estimated = table[table["kind"].isin(ESTIMATES)]
    if not estimated.empty:
        metric = estimated["metric"].iloc[0]
        drawn.append(estimate_scatter(estimated, path.parent / "map_estimates.png", panel=["kind", "target"],
                                      quantity="Δp(answer)" if metric == "prob" else "Δ log p(answer)",
                                      title=f"First-order estimates against exact effects, regions "
                                            f"{options.region}x{options.region}"))
    return [centred, *drawn]

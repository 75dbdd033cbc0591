"""Region knockout maps: which parts of the image does the answer read, drawn over the image.

The image-token grid is cut into blocks of `--region N` x N patches (from the adapter's patch rectangles: tokens
whose rectangles fall in the same block form one region — for a fixed grid, the row-major grid of blocks). For
each correctly answered question, each region and each target group (`last`, `question`), attention from the
target to the region's image tokens is blocked in one window of layers (`--window K` around `--center C`, as
knockout's `knockout_window`), and the probability of the first token of the clean greedy answer is compared
with the clean one: Δp% = (p_knockout − p_clean) / p_clean · 100. A row per region × target, with the region's
rectangle in original pixels and its token positions, so the map of one example is an array of
results.parquet.

The figure draws, for the first examples, each region's Δp% as a semi-transparent colour over its rectangle of
the input image (one PNG per example, `map_<example>.png`), and `map.png` sets the mean Δp% of the regions
overlapping the question's object beside that of the others, per target.

A family whose image tokens are not patches (Kosmos-2's latent queries) has no map; it is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from mmscope.errors import MMScopeError
from mmscope.experiments.engine import ENGINES, Variant, run_variants
from mmscope.experiments.knockout import knockout_scores
from mmscope.experiments.options import (
    OptionError,
    QuestionOptions,
    check_at_least,
    check_choice,
    engine_option,
    option,
)
from mmscope.experiments.runner import Experiment, PerQuestion, Question, Sweep, Variants, boxes_of, questions
from mmscope.interventions import Knockout, knockout_window
from mmscope.layout import Example
from mmscope.model import Model

TARGETS = ("last", "question")
MAPPED_EXAMPLES = 6  # the examples drawn one PNG each


@dataclass(frozen=True)
class Region:
    """One block of the image-token grid: its index (row-major over blocks), its grid (0 for a fixed grid; one
    per patch size where an image is shown at several scales, the finest first), its cell (block row and
    column), its rectangle `(x0, y0, x1, y1)` in original pixels, and its image tokens' prompt positions."""

    index: int
    row: int
    col: int
    rectangle: tuple[float, float, float, float]
    positions: tuple[int, ...]
    grid: int = 0


def _rounded(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values.double() * 1000) / 1000  # to 1e-3 px: edges computed two ways compare equal


def _levels(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among the distinct values (rounded to 1e-3 px), 0-based."""
    rounded = _rounded(values)
    return torch.searchsorted(torch.unique(rounded), rounded)


def grid_regions(rectangles: torch.Tensor, positions: Sequence[int], side: int) -> list[Region]:
    """The regions of `side` x `side` patches, from the image tokens' rectangles `[n, 4]` (NaN rows: tokens that
    show no patch, left out) and their prompt positions `[n]`.

    Tokens are grouped by patch size first (an image shown whole and in tiles, as LLaVA-NeXT does, holds two
    grids; finest first). Within a grid a token's cell is the rank of its rectangle's left edge among the grid's
    distinct left edges, and of its top edge among the top edges; its block is (row // side, col // side).
    Regions come grid by grid, in row-major block order.
    """
    if side < 1:
        raise OptionError(f"region {side} (--region): must be at least 1")
    if len(rectangles) != len(positions):
        raise MMScopeError(f"{len(rectangles)} patch rectangles for {len(positions)} image tokens")
    finite = rectangles.isfinite().all(-1)
    rects = rectangles[finite].double()
    kept = torch.tensor([int(p) for p, keep in zip(positions, finite.tolist(), strict=True) if keep],
                        dtype=torch.long)
    sizes = _rounded(torch.stack([rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]], -1)) if len(rects) else rects
    scales = sorted({tuple(size) for size in sizes.tolist()}, key=lambda wh: wh[0] * wh[1])
    regions: list[Region] = []
    for grid, scale in enumerate(scales):
        members = (sizes == torch.tensor(scale, dtype=sizes.dtype)).all(-1)
        part, part_positions = rects[members], kept[members]
        rows, cols = _levels(part[:, 1]) // side, _levels(part[:, 0]) // side
        blocks: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            blocks.setdefault(key, []).append(i)
        for key, block in sorted(blocks.items()):
            cell = part[block]
            rectangle = (float(cell[:, 0].min()), float(cell[:, 1].min()), float(cell[:, 2].max()),
                         float(cell[:, 3].max()))
            regions.append(Region(len(regions), key[0], key[1], rectangle,
                                  tuple(sorted(part_positions[block].tolist())), grid))
    return regions


def example_regions(model: Model, image: Image.Image, example: Example, side: int) -> list[Region]:
    """The regions of one prepared (unpadded, batch of one) example of `image`; refused for a family whose image
    tokens have no patch rectangles."""
    family = model.adapter.family
    try:
        rectangles = model.adapter.patch_rectangles(image.convert("RGB"), example.inputs)
    except MMScopeError as error:
        raise OptionError(f"mmscope map needs image tokens that are patches of the image; the {family} family's "
                          f"are not ({' '.join(str(error).split())})") from None
    regions = grid_regions(rectangles, example.layout["image"], side)
    if not regions:
        raise OptionError(f"mmscope map needs image tokens that are patches of the image; the {family} family's "
                          "image tokens show no patch")
    return regions


@dataclass(frozen=True)
class MapOptions(QuestionOptions):
    """`mmscope map`: the targets, the block side, the window of layers and its centre, the sweep engine."""

    targets: list[str] | None = option(None, "Target group whose attention to each region is blocked (repeatable; "
                                             "default: last and question).", flag="--target")
    region: int = option(1, "Side N of each region in patches: each region is an NxN block of the image-token grid.")
    window: int | None = option(None, "Window k of layers blocked around the centre (default: a third of the "
                                      "model's depth).")
    center: int | None = option(None, "Centre layer of the window (default: the middle layer).")
    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "targets", list(self.targets or TARGETS))
        for target in self.targets:
            check_choice("target", target, TARGETS)
        check_at_least("region", self.region, 1)
        check_at_least("window", self.window, 1)
        check_at_least("center", self.center, 0)
        check_choice("engine", self.engine, ENGINES)

    def configure(self, model: Model):
        """The protocol's knobs, and the window and centre when not given (printed in the run header)."""
        options, lines = super().configure(model)
        if options.window is None:
            options = dataclasses.replace(options, window=max(1, round(model.n_layers / 3)))
            lines = [*lines, f"window {options.window} (the default for {model.n_layers} layers: a third of them)"]
        if options.center is None:
            options = dataclasses.replace(options, center=model.n_layers // 2)
            lines = [*lines, f"center {options.center} (the default: the middle layer)"]
        if options.center >= model.n_layers:
            raise OptionError(f"center {options.center} (--center): {model.name} has layers 0..{model.n_layers - 1}")
        return options, lines


def map_layers(options: MapOptions, model: Model) -> tuple[int, ...]:
    """The layers each region's knockout blocks."""
    return knockout_window(options.center, options.window, model.n_layers)


def region_variants(regions: Sequence[Region], targets: Sequence[str], layers: Sequence[int]) -> tuple[Variant, ...]:
    """One knockout per region × target: the target no longer reads the region's image tokens in `layers`."""
    return tuple(Variant((target, region.index), (Knockout(region.positions, target, tuple(layers)),))
                 for target in targets for region in regions)


def map_variants(options: MapOptions, model: Model) -> Variants:
    """The variants of a blank square image's example (config.yaml's record; each question computes its own
    regions, from its image); refuses a family without patch rectangles before any question runs."""
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    regions = example_regions(model, blank, model.prepare(blank, "What is this?"), options.region)
    layers = map_layers(options, model)
    parameters = {"targets": list(options.targets), "region": options.region, "window": options.window,
                  "center": options.center, "layers": list(layers)}
    return Variants(parameters, region_variants(regions, options.targets, layers), option="--target")


def map_rows(sweep: Sweep[MapOptions], question: Question) -> list[dict]:
    """The (region × target) rows of one question."""
    options, model, example = sweep.options, sweep.model, question.example
    regions = example_regions(model, question.row["image"], example, options.region)
    layers = map_layers(options, model)
    variants = region_variants(regions, options.targets, layers)
    clean, probs = run_variants(model, example, variants, engine=options.engine)
    token = question.answer.first_token
    p_clean = clean.probs[token].item()
    objects = set(example.layout.get("object", ()))
    by_index = {region.index: region for region in regions}
    rows = []
    for variant, variant_probs in zip(variants, probs, strict=True):
        target, index = variant.key
        region = by_index[index]
        p_ko = variant_probs[token].item()
        x0, y0, x1, y1 = region.rectangle
        rows.append({
            "generated": question.answer.text,
            "correct": question.answer.correct,
            "target": target,
            "region": index,
            "grid": region.grid,
            "grid_row": region.row,
            "grid_col": region.col,
            "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "positions": list(region.positions),
            "has_object": bool(objects),
            "on_object": bool(objects & set(region.positions)),
            "window": options.window,
            "center": options.center,
            **knockout_scores(layers, p_clean, p_ko),
        })
    return rows


def object_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per target, the mean Δp% of regions on the question's object and of the others (examples with a box)."""
    boxed = table[table["has_object"]]
    if boxed.empty:
        return pd.DataFrame(columns=["target", "on_object", "mean", "n"])
    means = boxed.groupby(["target", "on_object"])["delta_pct"].agg(["mean", "count"]).reset_index()
    return means.rename(columns={"count": "n"})


def draw_example_map(image: Image.Image, part: pd.DataFrame, boxes, path: Path, limit: float, title: str) -> Path:
    """The input image with each region's Δp% a semi-transparent colour over its rectangle, one panel per
    target, the object boxes outlined, a shared symmetric colour scale."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    targets = list(dict.fromkeys(part["target"]))
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets) + 1.2, 4.4), squeeze=False)
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    cmap = plt.get_cmap("RdBu_r")
    for axis, target in zip(axes[0], targets, strict=True):
        axis.imshow(image, extent=(0, image.width, image.height, 0))
        for _, row in part[(part["target"] == target) & (part["grid"] == 0)].iterrows():  # the finest grid
            axis.add_patch(Rectangle((row["x0"], row["y0"]), row["x1"] - row["x0"], row["y1"] - row["y0"],
                                     facecolor=cmap(norm(row["delta_pct"])), alpha=0.55, edgecolor="none"))
        for x, y, w, h in boxes:
            axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="black", linewidth=1.6))
        axis.set_xlim(0, image.width)
        axis.set_ylim(image.height, 0)
        axis.set_title(f"blocked: region → {target}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    figure.colorbar(mappable, ax=list(axes[0]), label="Δp (%)", fraction=0.04)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def map_figure(summary: pd.DataFrame, path: Path, options: MapOptions) -> Path:
    """`map.png`: per target, the mean Δp% of object regions beside the others; and `map_<example>.png` for the
    first examples of the run (read from results.parquet beside `path`), each on the symmetric colour scale of
    its largest |Δp%|, shared by its panels."""
    import matplotlib.pyplot as plt

    table = pd.read_parquet(path.parent / "results.parquet")
    examples = sorted(table["example"].unique())[:MAPPED_EXAMPLES]
    dataset = questions(options)
    for example in examples:
        row = dataset[int(example)]
        part = table[table["example"] == example]
        limit = float(part["delta_pct"].abs().max())  # one symmetric scale for the example's panels
        limit = limit if math.isfinite(limit) and limit > 0 else 1.0
        title = (f"{row['question']} (answer {row['answer']!r}); window {options.window} around layer "
                 f"{options.center}, regions {options.region}x{options.region}")
        draw_example_map(row["image"].convert("RGB"), part, boxes_of(row), path.parent / f"map_{int(example)}.png",
                         limit, title)
    means = object_means(table)
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    targets = list(dict.fromkeys(table["target"]))
    width = 0.38
    for offset, (on_object, label) in enumerate([(True, "object regions"), (False, "other regions")]):
        values = [means[(means["target"] == t) & (means["on_object"] == on_object)]["mean"] for t in targets]
        heights = [float(v.iloc[0]) if len(v) else float("nan") for v in values]
        axis.bar([i + (offset - 0.5) * width for i in range(len(targets))], heights, width, label=label)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(targets)), [f"region → {t}" for t in targets])
    axis.set_ylabel("mean Δp (%)")
    axis.set_title(f"Region knockout, window {options.window} around layer {options.center}", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def map_findings(table: pd.DataFrame, summary: pd.DataFrame, options: MapOptions) -> list[str]:
    """Per target, the mean Δp% of object regions and of the others, and the region with the largest mean drop."""
    means = object_means(table)
    lines = ["", f"Region knockout (window {options.window} around layer {options.center}, "
                 f"regions {options.region}x{options.region}), mean Δp % per target:"]
    for target in dict.fromkeys(table["target"]):
        part = means[means["target"] == target]
        on = part[part["on_object"]]["mean"]
        off = part[~part["on_object"].astype(bool)]["mean"]
        own = summary[summary["target"] == target]
        worst = own.loc[own["mean"].idxmin()]
        rect = table[(table["target"] == target) & (table["region"] == worst["region"])].iloc[0]
        object_text = (f"object regions {on.iloc[0]:+.2f}, other regions {off.iloc[0]:+.2f}"
                       if len(on) and len(off) else "no object box")
        lines.append(f"  {target}: {object_text}; largest mean drop: region {int(worst['region'])} "
                     f"(x {rect['x0']:.0f}-{rect['x1']:.0f}, y {rect['y0']:.0f}-{rect['y1']:.0f}) "
                     f"{worst['mean']:+.2f}")
    shown = sorted(table["example"].unique())[:MAPPED_EXAMPLES]
    lines += ["", f"maps over the images: map_<example>.png for examples {', '.join(str(int(e)) for e in shown)}"]
    return lines


MAP = Experiment(
    name="map",
    help="Region knockout map: Δp% of the answer when a target stops reading each block of the image, drawn over it.",
    options=MapOptions,
    data=questions,
    work=PerQuestion(map_rows, map_variants),
    value="delta_pct",
    by=("target", "region"),
    figure=map_figure,
    findings=map_findings,
    desc="map",
    prints_table=True,
)

"""Image-space maps: which parts of the image matter for the answer, drawn over the image.

The image-token grid is cut into blocks of `--region N` x N patches (from the adapter's patch rectangles: tokens
whose rectangles fall in the same block form one region — for a fixed grid, the row-major grid of blocks; an
image shown at two scales, as LLaVA-NeXT's base image and tiles, holds two grids). For each correctly answered
question, each region gets one value per kind of map (`--kind`, repeatable) and per panel — a window of layers
or one layer — in a row of results.parquet with the region's rectangle in original pixels and its token
positions, so the map of one example is an array of the table:

  * `knockout` (`delta_pct`): attention from a target group (`--target`: `last`, `question`) to the region's
    image tokens is blocked in a window of layers (`--window K` around each `--center C`, as knockout's
    `knockout_window`); Δp% = (p_knockout − p_clean) / p_clean · 100 of the first token of the clean greedy
    answer. One panel per centre.
  * `patch` (`restored`): the clean run's `--site` at the region's positions, at one `--layer`, is patched into
    the corrupted run (the same question about the next other scene's image, as `mmscope patch` makes it,
    resized to the clean image's size so both runs' tokens show the same part of the frame); the share of
    p(answer) restored = (p_patched − p_corrupted) / (p_clean − p_corrupted), NaN where the corruption moves p
    by less than 0.05 (patch's `MIN_EFFECT`). One panel per layer.
  * `lens` (`prob`): the normed logit lens on the image tokens: at each `--layer`, softmax(unembed(h)) of each
    image token's residual stream after the layer at the answer's first token (`--lens-token object`: the first
    token of the question's first object name), the mean over the region's tokens. Which patches already "say"
    the answer. One panel per layer.
  * `attention` (`attention`): the attention weights from the target (`last`; `question`: the mean over its
    tokens) to each image token, the mean over heads, summed over the region's tokens, at each `--layer` (the
    model must run eager attention). For comparison with the causal maps. One panel per layer.

The figures: for the first examples, `map_<example>.png` draws every kind's panels over the input image (a row
per kind × target × grid, a column per panel; one colour scale and colour bar per kind, the object boxes
outlined); `map.png` averages the maps over the examples with an object box in object-centred coordinates (each
map resampled onto a grid on which the question's first box spans the middle third). With `--wandb` every PNG
is logged as an image. The printed findings give, per kind × target × panel, the mean over the regions on the
question's object beside that of the others, and the region of the largest mean.

A family whose image tokens are not patches (Kosmos-2's latent queries) has no map; it is refused.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mmscope.errors import InputError, MMScopeError
from mmscope.experiments import declarations
from mmscope.experiments.declarations import MapOptions  # declared without torch; kept importable from here
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.knockout import knockout_scores
from mmscope.experiments.options import OptionError
from mmscope.experiments.patch import MIN_EFFECT, corrupted_example, restored_share
from mmscope.experiments.runner import Experiment, PerQuestion, Question, Sweep, Variants, boxes_of, questions
from mmscope.interventions import CachedPatch, Knockout, knockout_window
from mmscope.layout import Example
from mmscope.model import Model

VALUES = {"knockout": "delta_pct", "patch": "restored", "lens": "prob", "attention": "attention"}  # per kind
MAPPED_EXAMPLES = 6  # the examples drawn one PNG each
CENTRED_CELLS = 24  # the object-centred grid's side: the box spans the middle third


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


def knockout_variants(regions: Sequence[Region], options: MapOptions, n_layers: int) -> tuple[Variant, ...]:
    """One knockout per centre × target × region: the target no longer reads the region's image tokens in the
    centre's window."""
    return tuple(Variant(("knockout", center, target, region.index),
                         (Knockout(region.positions, target, knockout_window(center, options.window, n_layers)),))
                 for center in options.centers for target in options.targets for region in regions)


def patch_variants(regions: Sequence[Region], options: MapOptions) -> tuple[Variant, ...]:
    """One clean → corrupted patch per layer × region: the clean run's site at the region's tokens."""
    return tuple(Variant(("patch", layer, options.site, region.index),
                         (CachedPatch(options.site, (layer,), region.positions),))
                 for layer in options.layers for region in regions)


def attention_weights_available(model: Model, example: Example) -> None:
    """Refuse `--kind attention` for a model whose self-attention gives no weights (sdpa attention)."""
    try:
        model.run(example, [], lambda ctx: ctx.attention_weights(0).shape)
    except MMScopeError as error:
        raise OptionError(f"--kind attention reads attention weights: {' '.join(str(error).split())}") from None


def map_variants(options: MapOptions, model: Model) -> Variants:
    """The interventions of a blank square image's example (config.yaml's record; each question computes its
    own regions, from its image); refuses a family without patch rectangles, or without attention weights for
    `--kind attention`, before any question runs."""
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    example = model.prepare(blank, "What is this?")
    regions = example_regions(model, blank, example, options.region)
    if "attention" in options.kinds:
        attention_weights_available(model, example)
    parameters = {"kinds": list(options.kinds), "region": options.region}
    parameters |= {name: getattr(options, name) for name in ("targets", "window", "centers", "layers", "site",
                                                             "lens_token") if getattr(options, name) is not None}
    variants = knockout_variants(regions, options, model.n_layers) if "knockout" in options.kinds else ()
    variants += patch_variants(regions, options) if "patch" in options.kinds else ()
    return Variants(parameters, variants, option="--target")


def knockout_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per centre × target × region, the knockout's window and Δp%."""
    options, model, example = sweep.options, sweep.model, question.example
    variants = knockout_variants(regions, options, model.n_layers)
    clean, probs = run_variants(model, example, variants, engine=options.engine)
    token = question.answer.first_token
    p_clean = clean.probs[token].item()
    rows = []
    for variant, variant_probs in zip(variants, probs, strict=True):
        _, center, target, index = variant.key
        layers = knockout_window(center, options.window, model.n_layers)
        rows.append({"kind": "knockout", "target": target, "layer": center, "region": index,
                     "window": options.window, "center": center,
                     **knockout_scores(layers, p_clean, variant_probs[token].item())})
    return rows


def patch_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per layer × region, p(answer) patched and the share restored (target: the site patched)."""
    options, model, clean = sweep.options, sweep.model, question.example
    other, corrupted = corrupted_example(model, sweep.dataset, question, same_size=True)
    if corrupted.layout["image"] != clean.layout["image"] or corrupted.seq_len != clean.seq_len:
        raise InputError(f"question {question.row['question_id']}: the corrupted run's image tokens sit elsewhere "
                         "than the clean run's; region patching needs them at the same positions")
    variants = patch_variants(regions, options)
    run, probs = run_variants(model, corrupted, variants, source=clean, engine=options.engine)
    token = question.answer.first_token
    p_clean, p_corrupted = run.source.probs[token].item(), run.probs[token].item()
    rows = []
    for variant, patched in zip(variants, probs, strict=True):
        _, layer, site, index = variant.key
        p_patched = patched[token].item()
        rows.append({"kind": "patch", "target": site, "layer": layer, "region": index, "site": site,
                     "corrupting_image_id": str(other["image_id"]), "p_clean": p_clean, "p_corrupted": p_corrupted,
                     "p_patched": p_patched, "restored": restored_share(p_clean, p_corrupted, p_patched)})
    return rows


def region_columns(example: Example, regions: Sequence[Region]) -> dict[int, list[int]]:
    """Per region, the columns of its tokens among the example's image tokens (as `image_lens` and
    `image_attention` order them)."""
    column = {position: k for k, position in enumerate(example.layout["image"])}
    return {region.index: [column[p] for p in region.positions] for region in regions}


def lens_token(model: Model, question: Question, which: str) -> int | None:
    """The token the lens reads: the clean answer's first token, or the first token of the question's first
    object name, written as the model writes its answer (None where it names none)."""
    if which == "answer":
        return question.answer.first_token
    names = [name for name in question.row.get("object_names") or [] if name and name.strip()]
    if not names:
        return None
    space = model.writes_leading_space(question.example, [question.answer.first_token])
    return model.answer_tokens(question.example, names[0].strip(), space)[0][0]


def image_lens(model: Model, example: Example, layers: Sequence[int], token: int) -> torch.Tensor:
    """`[len(layers), n_image]`: p(`token`) of the normed logit lens on each image token's residual stream after
    each layer."""
    states = model.hidden_states(example)[:, 0]  # [L + 1, T, D]: the embeddings, then after each layer
    image = torch.tensor(example.layout["image"])
    return torch.stack([model.unembed(states[layer + 1, image], normed=True).softmax(-1)[:, token].cpu()
                        for layer in layers])


def lens_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per layer × region, the mean p(token) of the lens over the region's tokens (target: the token read)."""
    options, model, example = sweep.options, sweep.model, question.example
    token = lens_token(model, question, options.lens_token)
    if token is None:
        return []
    probs = image_lens(model, example, options.layers, token)
    columns = region_columns(example, regions)
    return [{"kind": "lens", "target": options.lens_token, "layer": layer, "region": region.index,
             "token_id": token, "prob": probs[i, columns[region.index]].mean().item()}
            for i, layer in enumerate(options.layers) for region in regions]


def image_attention(model: Model, example: Example, layers: Sequence[int],
                    targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per target, `[len(layers), n_image]`: the attention weight from the target's positions (their mean) to each
    image token, the mean over heads, per layer — every target read from one forward."""
    image = torch.tensor(example.layout["image"])
    queries = {target: torch.tensor(example.layout[target]) for target in targets}

    def readout(ctx) -> dict[str, torch.Tensor]:
        weights = [ctx.attention_weights(layer)[0] for layer in layers]  # [H, T, T] each
        return {target: torch.stack([w[:, rows.to(w.device)][..., image.to(w.device)].float().mean((0, 1)).cpu()
                                     for w in weights])
                for target, rows in queries.items()}

    return model.run(example, [], readout)


def attention_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per target × layer × region, the attention from the target to the region's tokens (summed over them)."""
    options, model, example = sweep.options, sweep.model, question.example
    columns = region_columns(example, regions)
    weights = image_attention(model, example, options.layers, options.targets)
    return [{"kind": "attention", "target": target, "layer": layer, "region": region.index,
             "attention": weights[target][i, columns[region.index]].sum().item()}
            for target in options.targets for i, layer in enumerate(options.layers) for region in regions]


KIND_VALUES = {"knockout": knockout_values, "patch": patch_values, "lens": lens_values,
               "attention": attention_values}


def map_rows(sweep: Sweep[MapOptions], question: Question) -> list[dict]:
    """The rows of one question: per kind, its (panel × target × region) values, each with its region."""
    options, model, example = sweep.options, sweep.model, question.example
    regions = example_regions(model, question.row["image"], example, options.region)
    objects = set(example.layout.get("object", ()))
    by_index = {region.index: region for region in regions}
    rows = []
    for kind in options.kinds:
        for values in KIND_VALUES[kind](sweep, question, regions):
            region = by_index[values["region"]]
            x0, y0, x1, y1 = region.rectangle
            rows.append({
                "generated": question.answer.text, "correct": question.answer.correct,
                **values,
                "grid": region.grid, "grid_row": region.row, "grid_col": region.col,
                "x0": x0, "y0": y0, "x1": x1, "y1": y1, "positions": list(region.positions),
                "has_object": bool(objects), "on_object": bool(objects & set(region.positions)),
            })
    return rows


def kind_values(table: pd.DataFrame) -> pd.Series:
    """Each row's value: its kind's column (`VALUES`)."""
    values = pd.Series(np.nan, index=table.index, dtype=float)
    for kind, column in VALUES.items():
        chosen = table["kind"] == kind
        if chosen.any():
            values[chosen] = table.loc[chosen, column].astype(float)
    return values


BY = ("kind", "target", "layer", "region")


def object_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind × target × layer, the mean value of the regions on the question's object and of the others
    (examples with a box)."""
    boxed = table[table["has_object"]].assign(value=kind_values(table))
    if boxed.empty:
        return pd.DataFrame(columns=["kind", "target", "layer", "on_object", "mean", "n"])
    means = boxed.groupby(["kind", "target", "layer", "on_object"])["value"].agg(["mean", "count"]).reset_index()
    return means.rename(columns={"count": "n"})


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
    bad = "lightgrey"  # NaN: a share where the corruption did not move p, or outside the image
    if kind in ("knockout", "patch"):
        limit = float(finite.abs().max()) if len(finite) else 0.0
        limit = limit if limit > 0 else 1.0
        label = "Δp (%)" if kind == "knockout" else "share of p(answer) restored"
        return Scale(TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit), plt.get_cmap("RdBu_r").with_extremes(
            bad=bad), label)
    top = float(finite.max()) if len(finite) else 0.0
    label = "lens probability" if kind == "lens" else "attention weight"
    return Scale(Normalize(vmin=0.0, vmax=top if top > 0 else 1.0), plt.get_cmap("Reds").with_extremes(bad=bad),
                 label)


def knockout_spans(table: pd.DataFrame) -> dict[int, tuple[int, int]]:
    """Per knockout centre, the first and last layer of its window (from the rows)."""
    rows = table[table["kind"] == "knockout"].drop_duplicates("center")
    return {int(r["center"]): (int(r["first_layer"]), int(r["last_layer"])) for _, r in rows.iterrows()}


def panel_title(kind: str, target: str, layer: int, grid: int, spans: dict[int, tuple[int, int]]) -> str:
    """A panel's title: what was done or read, in which layers (and which grid, past the finest)."""
    scale = f", grid {grid} (coarser)" if grid else ""
    if kind == "knockout":
        first, last = spans[layer]
        return f"blocked region → {target}, layers {first}-{last}{scale}"
    if kind == "patch":
        return f"patched {target}, layer {layer}{scale}"
    if kind == "lens":
        return f"lens p({target}), layer {layer}{scale}"
    return f"attention {target} → region, layer {layer}{scale}"


def panel_rows(part: pd.DataFrame) -> list[tuple[str, str, int]]:
    """The (kind, target, grid) rows of an example's figure, in the table's order."""
    return list(dict.fromkeys(zip(part["kind"], part["target"], part["grid"].astype(int), strict=True)))


MAX_COLUMNS = 4  # panels per row of a map figure; a kind × target with more panels wraps onto further rows
PANEL_INCHES = 2.6  # a map panel's height (its width follows the image's aspect)
COLOUR_BAR_INCHES = 1.3  # the colour bars' column, with their labels
# Below these |values| a panel is called empty and says so (knockout: Δp in %, i.e. 0.1 % of p(answer); patch: a
# share restored of 0.001; lens: a probability; attention: a weight).
NO_EFFECT = {"knockout": 0.1, "patch": 1e-3, "lens": 1e-3, "attention": 1e-3}
FAINT = 0.05  # a panel whose |values| stay under this share of its colour scale looks empty: it says how small


def empty_note(kind: str, values, scale_max: float | None = None) -> str | None:
    """What a panel of `kind` whose `values` show nothing should say on it: no finite value (patch: the
    corruption moved p(answer) too little for a share), every |value| below `NO_EFFECT[kind]`, or (given the
    colour scale's largest |value|, `scale_max`) every |value| under `FAINT` of it, too pale to see; None when
    the panel shows something."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (f"no value: the corrupted image moved\np(answer) by < {MIN_EFFECT:g} (nothing to restore)"
                if kind == "patch" else "no value")
    top, bound = float(np.abs(finite).max()), NO_EFFECT[kind]
    unit = " %" if kind == "knockout" else ""
    if top < bound and kind in ("knockout", "patch"):
        return f"no measurable effect\n(|max| {top:.1g}{unit} < {bound:g}{unit})"
    if top < bound:
        return f"{'p' if kind == 'lens' else 'weight'} < {bound:g} everywhere\n(max {top:.1g})"
    if scale_max and top < FAINT * scale_max:
        largest = "|max|" if kind in ("knockout", "patch") else "max"
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


def draw_example_map(image: Image.Image, part: pd.DataFrame, boxes, path: Path, title: str) -> Path:
    """The input image with each region's value a semi-transparent colour over its rectangle: a row of panels
    per kind × target × grid (wrapped past `MAX_COLUMNS`), a panel per layer; one colour scale and colour bar
    per kind, the object boxes outlined; a panel that shows nothing says so (`empty_note`)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    part = part.assign(value=kind_values(part))
    spans = knockout_spans(part)
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
            axis.set_title(panel_heading(panel_title(kind, target, layer, grid, spans), aspect), fontsize=8)
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
                 spans: dict[int, tuple[int, int]], counts: dict[tuple[str, str, int], int] | None = None) -> Path:
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
            heading = panel_title(kind, target, layer, 0, spans)
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


def map_figure(summary: pd.DataFrame, path: Path, options: MapOptions) -> list[Path]:
    """`map.png`, the object-centred mean maps, and `map_<example>.png` for the first examples of the run (read
    from results.parquet beside `path`); returns them all, `map.png` first."""
    table = pd.read_parquet(path.parent / "results.parquet")
    dataset = questions(options)
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
                           centred_counts(table, boxes))
    return [centred, *drawn]


KIND_NAMES = {"knockout": "Region knockout, mean Δp %", "patch": "Region patching, mean share restored",
              "lens": "Logit lens on the image tokens, mean p", "attention": "Attention to each region, mean weight"}


def map_findings(table: pd.DataFrame, summary: pd.DataFrame, options: MapOptions) -> list[str]:
    """Per kind × target × panel, the mean value of object regions and of the others, and the region with the
    largest mean (for knockout: the largest mean drop)."""
    means = object_means(table)
    lines = []
    for kind in dict.fromkeys(table["kind"]):
        if kind == "knockout":
            centres = ", ".join(str(c) for c in options.centers)
            panels = f"window {options.window} around layer{'s' if len(options.centers) > 1 else ''} {centres}"
        else:
            layers = list(options.layers)
            consecutive = len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
            panels = f"layers {layers[0]}-{layers[-1]}" if consecutive else \
                f"layer{'s' if len(layers) > 1 else ''} {', '.join(str(layer) for layer in layers)}"
        lines += ["", f"{KIND_NAMES[kind]} ({panels}, regions {options.region}x{options.region}):"]
        own_table = table[table["kind"] == kind]
        fmt = "+.3g" if kind in ("knockout", "patch") else ".3g"  # signed: a change; unsigned: a probability
        for target, layer in dict.fromkeys(zip(own_table["target"], own_table["layer"], strict=True)):
            part = means[(means["kind"] == kind) & (means["target"] == target) & (means["layer"] == layer)]
            on = part[part["on_object"].astype(bool)]["mean"]
            off = part[~part["on_object"].astype(bool)]["mean"]
            own = summary[(summary["kind"] == kind) & (summary["target"] == target) & (summary["layer"] == layer)]
            own = own[own["mean"].notna()]
            object_text = (f"object regions {on.iloc[0]:{fmt}}, other regions {off.iloc[0]:{fmt}}"
                           if len(on) and len(off) else "no object box")
            if own.empty:
                lines.append(f"  {target}, layer {layer}: {object_text}; no finite value")
                continue
            top = own.loc[own["mean"].idxmin() if kind == "knockout" else own["mean"].idxmax()]
            rect = own_table[own_table["region"] == top["region"]].iloc[0]
            which = "largest mean drop" if kind == "knockout" else "largest mean"
            lines.append(f"  {target}, layer {layer}: {object_text}; {which}: region {int(top['region'])} "
                         f"(x {rect['x0']:.0f}-{rect['x1']:.0f}, y {rect['y0']:.0f}-{rect['y1']:.0f}) "
                         f"{top['mean']:{fmt}}")
    shown = sorted(table["example"].unique())[:MAPPED_EXAMPLES]
    lines += ["", f"maps over the images: map_<example>.png for examples {', '.join(str(int(e)) for e in shown)}; "
                  "map.png: the object-centred mean"]
    return lines


MAP = Experiment(
    command=declarations.MAP,
    data=questions,
    work=PerQuestion(map_rows, map_variants),
    value="value",
    by=BY,
    figure=map_figure,
    findings=map_findings,
    desc="map",
    values=kind_values,  # the summary: each region's mean, 95% CI and n per kind × target × panel layer
    prints_table=True,
)

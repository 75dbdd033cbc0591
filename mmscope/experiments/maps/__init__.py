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

The package, by concern: `regions` (the grid's blocks), `kinds` (each kind's interventions and values, a
question's rows), `figures` (the PNGs) and `findings` (the printed lines); this module declares the experiment.
"""

from __future__ import annotations

from mmscope.experiments import declarations
from mmscope.experiments.declarations import MapOptions  # declared without torch; kept importable from here
from mmscope.experiments.maps.figures import (
    NO_EFFECT,
    draw_centred,
    draw_example_map,
    map_figure,
    object_centred,
    panel_rows,
)
from mmscope.experiments.maps.findings import estimate_scalars, map_findings
from mmscope.experiments.maps.kinds import kind_values, knockout_variants, map_rows, map_variants
from mmscope.experiments.maps.regions import Region, example_regions, grid_regions
from mmscope.experiments.runner import Experiment, PerQuestion, questions

__all__ = [
    "BY",
    "MAP",
    "NO_EFFECT",
    "MapOptions",
    "Region",
    "draw_centred",
    "draw_example_map",
    "example_regions",
    "grid_regions",
    "kind_values",
    "knockout_variants",
    "map_figure",
    "map_findings",
    "map_rows",
    "map_variants",
    "object_centred",
    "panel_rows",
]


BY = ("kind", "target", "layer", "region")


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
    scalars=estimate_scalars,
    prints_table=True,
)

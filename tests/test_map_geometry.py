"""The map's image-space geometry for every layout the adapters know, from first principles.

For each family the test computes on its own where every image token's patch lies in the original image — the
processor's resize / crop / tiling arithmetic, the merge of Qwen-VL's patches, the pixel shuffle of Idefics3's
tiles, the pooling of Gemma 3's patches — and checks that `example_regions` puts each token into the expected
(grid, row, col) cell with the expected rectangle, for blocks of 1x1 and 2x2 patches.

Then it paints a known rectangle of the image red and reads which tokens see red off the processor's own
`pixel_values` (each token's pixels found by the model's layout: CLIP's row-major patches, LLaVA-NeXT's base tile
and stitched tiles, Qwen-VL's merge-ordered patch rows, Idefics3's tiles + global view, Gemma 3's pooled 8-px
cells). The cells that light up are exactly those whose first-principles rectangle the paint covers.

The layouts (tiny checkpoints of tests/families.py and conftest's LLaVA):
- LLaVA-1.5: 32-px input, shortest edge resized to 32 then center-cropped, 8-px patches (a fixed 4x4 grid);
- LLaVA-NeXT: 16-px tiles of 4-px patches; a base view squashing the image to one tile, then the best pinpoint
  resolution's tiles (image fitted, pasted centred), unpadded rows / columns and a newline after each row;
- Qwen2-VL / Qwen2.5-VL: resized to multiples of 8 px (round half to even), 4-px patches merged 2x2;
- Idefics3: longest edge to 32 px, sides up to multiples of 16, 16-px tiles of 2-px patches shuffled 2x2 (4-px
  cells), then the whole image squashed to one tile;
- Gemma 3: squashed to 32 px, 4-px patches average-pooled 2x2 (8-px cells at the pooled resolution);
- PaliGemma: squashed to 16 px, 4-px patches (a fixed 4x4 grid);
- Emu3: resized to multiples of 8 px within a pixel budget, one VQ code per 8-px cell, a newline per row.
Kosmos-2's latent queries have no patch: its map is refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from families import LLAVA_NEXT_PINPOINTS, load_family
from PIL import Image

from mmscope.experiments.maps import example_regions
from mmscope.experiments.options import OptionError

QUESTION = "Is the cube red or blue?"
NEWLINE = None  # a token that shows no patch (LLaVA-NeXT's and Emu3's row newlines)


# --- each family's geometry, computed here: per image token, (grid name, row, col, (x0, y0, x1, y1)) or NEWLINE -----------
def grid(name, rows, cols, x0, y0, width, height, row0=0, col0=0):
    """Cells of a `rows x cols` grid of `width x height` px cells with its top-left at (x0, y0), row-major."""
    return [(name, row0 + r, col0 + c, (x0 + c * width, y0 + r * height, x0 + (c + 1) * width, y0 + (r + 1) * height))
            for r in range(rows) for c in range(cols)]


def llava_cells(width, height):
    """Shortest edge to 32 (the other `int(32 * long / short)`), center crop 32, 8-px patches."""
    resized_w, resized_h = (32, int(32 * height / width)) if width <= height else (int(32 * width / height), 32)
    left, top = (resized_w - 32) // 2, (resized_h - 32) // 2
    sx, sy = width / resized_w, height / resized_h
    return grid("grid", 4, 4, left * sx, top * sy, 8 * sx, 8 * sy)  # patch c: resized x from left + 8c


PINPOINTS = [tuple(pinpoint) for pinpoint in LLAVA_NEXT_PINPOINTS]  # (height, width)


def llava_next_cells(width, height):
    # the pinpoint (h, w) that shows most of the image at its downscaled size, then wastes least
    def score(pinpoint):
        h, w = pinpoint
        s = min(w / width, h / height)
        shown = min(int(width * s) * int(height * s), width * height)
        return shown, -(h * w - shown)

    best_h, best_w = max(PINPOINTS, key=score)  # first of equals: max keeps the first maximum
    # fitted into it with its aspect ratio (ceil on the fitted side), pasted centred
    if best_w / width < best_h / height:
        fit_w, fit_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        fit_w, fit_h = min(math.ceil(width * best_h / height), best_w), best_h
    paste_x, paste_y = (best_w - fit_w) // 2, (best_h - fit_h) // 2
    rows, cols = best_h // 4, best_w // 4  # the stitched feature grid, 4 px per patch
    # unpadding on the feature grid: rows (or columns) that show only padding are dropped
    if width / height > cols / rows:
        kept = int(round(height * cols / width, 7))
        pad = (rows - kept) // 2
        row_range, col_range = range(pad, rows - pad), range(cols)
    else:
        kept = int(round(width * rows / height, 7))
        pad = (cols - kept) // 2
        row_range, col_range = range(rows), range(pad, cols - pad)
    sx, sy = width / fit_w, height / fit_h
    base = grid("base", 4, 4, 0, 0, width / 4, height / 4)  # the whole image squashed to one 16-px tile
    high = []
    for r in row_range:
        for c in col_range:
            rect = ((4 * c - paste_x) * sx, (4 * r - paste_y) * sy, (4 * c + 4 - paste_x) * sx, (4 * r + 4 - paste_y) * sy)
            high.append(("high", r - row_range.start, c - col_range.start, rect))
        high.append(NEWLINE)
    layout = dict(tiles=(best_h // 16, best_w // 16), rows=row_range, cols=col_range)
    return base + high, layout


def qwen_cells(width, height):
    """Each side rounded to a multiple of 8 (patch 4 x merge 2; Python's round: half to even), no crop or pad."""
    resized_w, resized_h = round(width / 8) * 8, round(height / 8) * 8
    assert 16 * 16 <= resized_w * resized_h <= 64 * 64  # within the processor's pixel budget: no rescale
    sx, sy = width / resized_w, height / resized_h
    return grid("merged", resized_h // 8, resized_w // 8, 0, 0, 8 * sx, 8 * sy)


def idefics3_cells(width, height):
    # longest edge to 32, the other side int() and made even
    if width >= height:
        w, h = 32, int(32 * height / width)
        h += h % 2
    else:
        w, h = int(32 * width / height), 32
        w += w % 2
    aspect = w / h
    if w >= h:  # then up to multiples of the 16-px tile
        w = math.ceil(w / 16) * 16
        h = math.ceil(int(w / aspect) / 16) * 16
    else:
        h = math.ceil(h / 16) * 16
        w = math.ceil(int(h * aspect) / 16) * 16
    sx, sy = width / w, height / h
    tiles = []
    for tr in range(h // 16):
        for tc in range(w // 16):  # each tile's 8x8 patches of 2 px, shuffled 2x2 into 4x4 cells of 4 px
            tiles += grid("tiles", 4, 4, 16 * tc * sx, 16 * tr * sy, 4 * sx, 4 * sy, row0=4 * tr, col0=4 * tc)
    whole = grid("global", 4, 4, 0, 0, width / 4, height / 4)  # squashed to one tile
    return tiles + whole, dict(tiles=(h // 16, w // 16))


def gemma3_cells(width, height):
    """Squashed to 32x32; 8x8 patches of 4 px pooled 2x2 to 4x4 cells of 8 px."""
    return grid("pooled", 4, 4, 0, 0, width / 4, height / 4)


def paligemma_cells(width, height):
    """Squashed to 16x16, 4-px patches: a fixed 4x4 grid."""
    return grid("grid", 4, 4, 0, 0, width / 4, height / 4)


def emu3_cells(width, height):
    """Sides rounded to multiples of the VQ factor 8 (half to even), scaled into 16x16..48x48 px if outside
    (floor when over, ceil when under); one code per 8x8 cell, a newline after each row of codes."""
    h, w = round(height / 8) * 8, round(width / 8) * 8
    if h * w > 48 * 48:
        beta = math.sqrt(height * width / (48 * 48))
        h, w = max(8, math.floor(height / beta / 8) * 8), max(8, math.floor(width / beta / 8) * 8)
    elif h * w < 16 * 16:
        beta = math.sqrt(16 * 16 / (height * width))
        h, w = math.ceil(height * beta / 8) * 8, math.ceil(width * beta / 8) * 8
    cells = []
    for row in range(h // 8):
        cells += grid("codes", 1, w // 8, 0, row * 8 * height / h, 8 * width / w, 8 * height / h, row0=row)
        cells.append(NEWLINE)
    return cells, dict(codes=(h // 8, w // 8))


# --- which image tokens see red, read off the processor's pixel_values --------------------------------------------------
def red(red_channel: torch.Tensor) -> torch.Tensor:
    """Where the red channel is nearer the painted red than the black background (normalised values)."""
    low, high = float(red_channel.min()), float(red_channel.max())
    return red_channel > (low + high) / 2


def cell_means(plane: torch.Tensor, cell: int) -> torch.Tensor:
    """`[H, W]` booleans → the fraction of True in each `cell x cell` block, `[H / cell, W / cell]`."""
    h, w = plane.shape
    return plane.float().reshape(h // cell, cell, w // cell, cell).mean((1, 3))


def lit_llava(inputs, layout):
    pixels = inputs["pixel_values"][0]  # [3, 32, 32]
    return cell_means(red(pixels[0]), 8).flatten().tolist()


def lit_gemma3(inputs, layout):
    pixels = inputs["pixel_values"][0]  # [3, 32, 32]; the pooled token (i, j) averages patches 2i..2i+1, 2j..2j+1
    return cell_means(red(pixels[0]), 8).flatten().tolist()


def lit_paligemma(inputs, layout):
    pixels = inputs["pixel_values"][0]  # [3, 16, 16]
    return cell_means(red(pixels[0]), 4).flatten().tolist()


def lit_emu3(inputs, layout):
    pixels = inputs["pixel_values"][0]  # [3, h, w]: the resized image the VQ encoder codes in 8x8 cells
    assert tuple(pixels.shape[1:]) == tuple(8 * side for side in layout["codes"])
    cells = cell_means(red(pixels[0]), 8)
    return torch.cat([cells, torch.full((len(cells), 1), float("nan"))], 1).flatten().tolist()


def lit_llava_next(inputs, layout):
    tiles = inputs["pixel_values"][0]  # [1 + tiles, 3, 16, 16]: the base view, then the tiles row-major
    is_red = red(tiles[:, 0])
    base = cell_means(is_red[0], 4).flatten().tolist()
    tile_rows, tile_cols = layout["tiles"]
    assert len(tiles) == 1 + tile_rows * tile_cols
    canvas = is_red[1:].reshape(tile_rows, tile_cols, 16, 16).permute(0, 2, 1, 3).reshape(tile_rows * 16, tile_cols * 16)
    cells = cell_means(canvas, 4)[layout["rows"].start : layout["rows"].stop, layout["cols"].start : layout["cols"].stop]
    high = torch.cat([cells, torch.full((len(cells), 1), float("nan"))], 1)  # the newline after each row
    return base + high.flatten().tolist()


def lit_idefics3(inputs, layout):
    tiles = inputs["pixel_values"][0]  # [tiles + 1, 3, 16, 16]: the tiles row-major, then the global view
    tile_rows, tile_cols = layout["tiles"]
    assert len(tiles) == tile_rows * tile_cols + 1
    is_red = red(tiles[:, 0])
    return [fraction for plane in is_red for fraction in cell_means(plane, 4).flatten().tolist()]


def lit_qwen(inputs, layout):
    patches = inputs["pixel_values"]  # [patches, 3 * 2 * 4 * 4]: channel-major, patches in merge order
    is_red = red(patches[:, : 2 * 4 * 4])
    return is_red.float().reshape(-1, 4 * 2 * 4 * 4).mean(-1).tolist()  # the merger's 4 consecutive patches


FAMILIES = {  # family: (cells of an image of (width, height), reader of lit tokens, grid names finest first, sizes)
    "llava": (lambda w, h: (llava_cells(w, h), {}), lit_llava, ["grid"], [(96, 64), (40, 72)]),
    "llava_next": (llava_next_cells, lit_llava_next, ["high", "base"], [(64, 48), (48, 64), (96, 32)]),
    "qwen2_vl": (lambda w, h: (qwen_cells(w, h), {}), lit_qwen, ["merged"], [(60, 44), (36, 70)]),
    "qwen2_5_vl": (lambda w, h: (qwen_cells(w, h), {}), lit_qwen, ["merged"], [(60, 44)]),
    "idefics3": (idefics3_cells, lit_idefics3, ["tiles", "global"], [(64, 48), (30, 50), (20, 12)]),
    "gemma3": (lambda w, h: (gemma3_cells(w, h), {}), lit_gemma3, ["pooled"], [(64, 48), (30, 50)]),
    "paligemma": (lambda w, h: (paligemma_cells(w, h), {}), lit_paligemma, ["grid"], [(44, 30)]),
    "emu3": (emu3_cells, lit_emu3, ["codes"], [(44, 30), (20, 36), (60, 44)]),
}
CASES = [(name, size) for name, spec in FAMILIES.items() for size in spec[3]]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    return lambda name: tiny if name == "llava" else load_family(name, tmp_path_factory).model


def painted(width, height, rect):
    """A black image with the pixels whose centres lie in `rect` painted red."""
    x0, y0, x1, y1 = rect
    xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[..., 0][inside] = 255
    return Image.fromarray(pixels.numpy())


def coverage(cell, rect, width, height):
    """The fraction of the cell's part inside the image that `rect` covers."""
    x0, y0, x1, y1 = max(cell[0], 0), max(cell[1], 0), min(cell[2], width), min(cell[3], height)
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    w = max(min(x1, rect[2]) - max(x0, rect[0]), 0)
    h = max(min(y1, rect[3]) - max(y0, rect[1]), 0)
    return w * h / area if area else 0.0


@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}-{w}x{h}" for n, (w, h) in CASES])
def test_regions_sit_in_the_cells_the_processor_geometry_gives(models, name, size):
    model = models(name)
    cells_of, _, grids, _ = FAMILIES[name]
    width, height = size
    image = Image.new("RGB", size, (0, 0, 0))
    example = model.prepare(image, QUESTION)
    expected, _ = cells_of(width, height)
    positions = list(example.layout["image"])
    assert len(positions) == len(expected)
    where = {position: cell for position, cell in zip(positions, expected, strict=True)}

    singles = example_regions(model, image, example, 1)
    assert sorted(p for region in singles for p in region.positions) == sorted(p for p, c in where.items() if c)
    for region in singles:
        [position] = region.positions
        grid_name, row, col, rect = where[position]
        assert (region.grid, region.row, region.col) == (grids.index(grid_name), row, col), (position, region)
        assert region.rectangle == pytest.approx(rect, abs=1e-6), (position, region)

    blocks = example_regions(model, image, example, 2)
    expected_blocks: dict = {}
    for position, cell in where.items():
        if cell:
            expected_blocks.setdefault((grids.index(cell[0]), cell[1] // 2, cell[2] // 2), []).append(position)
    assert len(blocks) == len(expected_blocks)
    for region in blocks:
        members = sorted(expected_blocks[region.grid, region.row, region.col])
        assert region.positions == tuple(members)
        rects = torch.tensor([where[p][3] for p in members], dtype=torch.double)
        union = (rects[:, 0].min(), rects[:, 1].min(), rects[:, 2].max(), rects[:, 3].max())
        assert region.rectangle == pytest.approx([float(v) for v in union], abs=1e-6)
    # regions come grid by grid (finest first), row-major within a grid
    assert [(r.grid, r.row, r.col) for r in blocks] == sorted((r.grid, r.row, r.col) for r in blocks)
    assert [r.index for r in blocks] == list(range(len(blocks)))


PAINT = {  # a rectangle painted red per case, in original pixels
    ("llava", (96, 64)): (24, 0, 64, 40),
    ("llava", (40, 72)): (0, 20, 30, 50),
    ("llava_next", (64, 48)): (16, 0, 48, 24),
    ("llava_next", (48, 64)): (0, 16, 24, 48),
    ("llava_next", (96, 32)): (24, 8, 72, 32),
    ("qwen2_vl", (60, 44)): (15, 7.4, 45, 30),
    ("qwen2_vl", (36, 70)): (0, 20, 18, 50),
    ("qwen2_5_vl", (60, 44)): (30, 0, 60, 22),
    ("idefics3", (64, 48)): (16, 0, 48, 24),
    ("idefics3", (30, 50)): (8, 25, 30, 50),
    ("idefics3", (20, 12)): (5, 0, 15, 6),
    ("gemma3", (64, 48)): (16, 12, 48, 36),
    ("gemma3", (30, 50)): (0, 0, 15, 25),
    ("paligemma", (44, 30)): (11, 7.5, 33, 22.5),
    ("emu3", (44, 30)): (11, 0, 33, 15),
    ("emu3", (20, 36)): (0, 9, 10, 36),
    ("emu3", (60, 44)): (17, 8.8, 43, 30),
}


@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}-{w}x{h}" for n, (w, h) in CASES])
def test_cells_light_up_where_the_painted_patches_are(models, name, size):
    """The tokens that see red in the processor's pixel_values are those whose cell the paint covers (more than
    3/4 of it: lit; less than 1/4: dark; cells in between, cut by the paint's edge, are not judged), and the map
    draws them in the painted cells."""
    model = models(name)
    cells_of, lit_of, grids, _ = FAMILIES[name]
    width, height = size
    rect = PAINT[name, size]
    image = painted(width, height, rect)
    example = model.prepare(image, QUESTION)
    expected, layout = cells_of(width, height)
    lit = lit_of(example.inputs, layout)
    positions = list(example.layout["image"])
    assert len(lit) == len(expected) == len(positions)
    covered, dark = set(), set()
    for position, cell, fraction in zip(positions, expected, lit, strict=True):
        if cell is NEWLINE:
            continue
        share = coverage(cell[3], rect, width, height)
        if share > 0.75:
            assert fraction > 0.5, (position, cell, share, fraction)
            covered.add((grids.index(cell[0]), cell[1], cell[2]))
        elif share < 0.25:
            assert fraction < 0.5, (position, cell, share, fraction)
            dark.add((grids.index(cell[0]), cell[1], cell[2]))
    assert {cell[0] for cell in covered} == set(range(len(grids)))  # every grid has cells the paint covers
    assert dark  # and cells it leaves dark

    regions = example_regions(model, image, example, 1)
    by_position = dict(zip(positions, lit, strict=True))
    drawn_lit = {(r.grid, r.row, r.col) for r in regions if by_position[r.positions[0]] > 0.5}
    assert covered <= drawn_lit and not (dark & drawn_lit)
    for region in regions:  # a lit cell's drawn rectangle overlaps the paint
        if (region.grid, region.row, region.col) in covered:
            assert coverage(region.rectangle, rect, width, height) > 0.75


def test_a_family_without_a_patch_grid_is_refused_with_a_clear_error(tmp_path_factory):
    loaded = load_family("kosmos2", tmp_path_factory)
    image = Image.new("RGB", (40, 30))
    with pytest.raises(OptionError) as error:
        example_regions(loaded.model, image, loaded.model.prepare(image, QUESTION), 1)
    message = str(error.value)
    assert "\n" not in message
    assert "kosmos2 family" in message and "latent queries" in message and "not patches" in message


def test_the_models_own_pooling_and_shuffle_group_the_cells_assumed_above(tmp_path_factory):
    """Gemma 3's projector pools 2x2 blocks of its 8x8 patches into 4x4 row-major tokens, and Idefics3's connector
    shuffles 2x2 blocks of each tile's 8x8 patches into 4x4 row-major tokens: read off the real modules, fed each
    patch's (row, column) as its features."""
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    gemma = load_family("gemma3", tmp_path_factory).model.adapter.model
    projector = gemma.model.multi_modal_projector
    features = torch.zeros(1, 64, gemma.config.vision_config.hidden_size)
    features[0, :, 0], features[0, :, 1] = rows.flatten(), cols.flatten()
    captured = {}
    handle = projector.avg_pool.register_forward_hook(lambda m, a, out: captured.__setitem__("pooled", out))
    with torch.no_grad():
        projector(features)
    handle.remove()
    pooled = captured["pooled"].flatten(2).transpose(1, 2)[0]  # [tokens, D], as the projector orders them
    tokens = torch.arange(16)
    torch.testing.assert_close(pooled[:, 0], 2 * (tokens // 4) + 0.5, atol=0, rtol=0)  # mean patch row
    torch.testing.assert_close(pooled[:, 1], 2 * (tokens % 4) + 0.5, atol=0, rtol=0)  # mean patch column

    idefics = load_family("idefics3", tmp_path_factory).model.adapter.model
    patches = torch.stack([rows.flatten(), cols.flatten()], -1)[None]  # [1, 64 patches, 2]
    shuffled = idefics.model.connector.pixel_shuffle(patches, idefics.config.scale_factor)[0].reshape(16, 4, 2)
    for token, cell in enumerate(shuffled):
        i, j = divmod(token, 4)
        assert {tuple(p) for p in cell.long().tolist()} == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}

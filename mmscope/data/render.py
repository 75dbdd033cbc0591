"""Draw synthetic scenes with Pillow: flat 2-D icons of 3-D solids that a tiny vision model can tell apart.

Each attribute has a cue that survives a 64-96 px image:
- shape by silhouette — cube: square front face with a lighter top and darker side face; sphere: disc;
  cylinder: rectangle with a light elliptical cap; cone: triangle on a darker elliptical base;
- colour by a flat fill in one of six hues far apart in RGB;
- size by area (the sides differ by a factor of about 1.7);
- material by surface — metal: dark outline and a white specular highlight; rubber: flat, no outline.

Scenes are drawn at `SUPERSAMPLE` times the target size and box-filtered down, which anti-aliases edges
without blurring the colours.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from mmscope.data.errors import DataError

SUPERSAMPLE = 3
BACKGROUND = (222, 220, 212)
OUTLINE = (28, 28, 32)
HIGHLIGHT = (255, 255, 255)


def _mix(color: tuple[int, int, int], other: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    return tuple(round(c + (o - c) * amount) for c, o in zip(color, other))


def draw_object(
    draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], metal: bool, box: tuple[float, float, float]
) -> None:
    """Draw one object whose square bounding box is `box = (x, y, side)` (canvas pixels)."""
    x, y, s = box
    light, dark = _mix(rgb, (255, 255, 255), 0.45), _mix(rgb, (0, 0, 0), 0.35)
    line = {"outline": OUTLINE, "width": max(1, round(s * 0.06))} if metal else {}
    if shape == "cube":
        d = s * 0.28
        draw.polygon([(x, y + d), (x + s - d, y + d), (x + s - d, y + s), (x, y + s)], fill=rgb, **line)
        draw.polygon([(x, y + d), (x + d, y), (x + s, y), (x + s - d, y + d)], fill=light, **line)
        draw.polygon([(x + s - d, y + d), (x + s, y), (x + s, y + s - d), (x + s - d, y + s)], fill=dark, **line)
        spot = (x + 0.1 * s, y + d + 0.1 * s, x + 0.32 * s, y + d + 0.3 * s)
    elif shape == "sphere":
        draw.ellipse([x, y, x + s, y + s], fill=rgb, **line)
        spot = (x + 0.2 * s, y + 0.18 * s, x + 0.45 * s, y + 0.4 * s)
    elif shape == "cylinder":
        e, left, right = s * 0.3, x + 0.1 * s, x + 0.9 * s
        draw.ellipse([left, y + s - e, right, y + s], fill=rgb, **line)
        draw.rectangle([left, y + e / 2, right, y + s - e / 2], fill=rgb)
        if metal:
            draw.line([(left, y + e / 2), (left, y + s - e / 2)], fill=OUTLINE, width=line["width"])
            draw.line([(right, y + e / 2), (right, y + s - e / 2)], fill=OUTLINE, width=line["width"])
        draw.ellipse([left, y, right, y + e], fill=light, **line)
        spot = (left + 0.1 * s, y + 0.38 * s, left + 0.24 * s, y + 0.78 * s)
    elif shape == "cone":
        e = s * 0.3
        draw.ellipse([x, y + s - e, x + s, y + s], fill=dark, **line)
        draw.polygon([(x + s / 2, y), (x + s, y + s - e / 2), (x, y + s - e / 2)], fill=rgb, **line)
        spot = (x + 0.36 * s, y + 0.4 * s, x + 0.48 * s, y + 0.7 * s)
    else:
        raise DataError(f"unknown shape {shape!r}; known: cube, sphere, cylinder, cone")
    if metal:
        draw.ellipse(spot, fill=HIGHLIGHT)


def render(size: int, objects: list[tuple[str, tuple[int, int, int], bool, tuple[int, int, int]]]) -> Image.Image:
    """A `size` x `size` RGB image of `objects`: (shape, rgb, metal, (x, y, side)) in image pixels."""
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for shape, rgb, metal, (x, y, side) in objects:
        draw_object(draw, shape, rgb, metal, (x * SUPERSAMPLE, y * SUPERSAMPLE, side * SUPERSAMPLE))
    return canvas.reduce(SUPERSAMPLE)

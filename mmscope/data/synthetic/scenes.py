"""The synthetic world's scenes: the vocabulary, sampling and placing objects, spatial facts, the scene graph."""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("cube", "sphere", "cylinder", "cone")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 40),
    "purple": (150, 60, 200),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
MATERIALS = ("metal", "rubber")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "size": SIZES, "material": MATERIALS}
SIDE_FRACTION = {"small": 0.19, "large": 0.32}

# Geometry, as fractions of the image side.
_BORDER = 0.02
_GAP = 0.05
_RELATION_MARGIN = 0.12
_SIDE_MARGIN = 1 / 6
_OBJECT_COUNT_WEIGHTS = {1: 1, 2: 3, 3: 3, 4: 3}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; its box is the square `(x, y, side, side)` in image pixels."""

    object_id: str
    shape: str
    color: str
    size: str
    material: str
    x: int
    y: int
    side: int

    def attribute(self, kind: str) -> str:
        """The object's value of `kind` ("color", "size" or "material")."""
        return getattr(self, kind)

    @property
    def center(self) -> tuple[float, float]:
        """The box centre `(cx, cy)` in image pixels; spatial relations compare these."""
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass(frozen=True)
class Scene:
    """A scene: its image id, the image side in pixels and its objects."""

    image_id: str
    image_size: int
    objects: tuple[SceneObject, ...]


def _separated(a: tuple[int, int, int], b: tuple[int, int, int], gap: float) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + gap <= bx or bx + bside + gap <= ax or ay + aside + gap <= by or by + bside + gap <= ay


def _place(sides: list[int], image_size: int, rng: random.Random) -> list[tuple[int, int, int]] | None:
    """Non-overlapping `(x, y, side)` boxes for objects of the given sides, or None if packing failed."""
    border, gap = round(_BORDER * image_size), _GAP * image_size
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(100):
            box = (rng.randint(border, image_size - border - side), rng.randint(border, image_size - border - side),
                   side)
            if all(_separated(box, other, gap) for other in placed):
                placed.append(box)
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, index: int, image_size: int, shared: str) -> Scene:
    """Scene number `index`: 1-4 objects with distinct shapes; the first two share exactly attribute `shared`."""
    count = rng.choices(list(_OBJECT_COUNT_WEIGHTS), weights=list(_OBJECT_COUNT_WEIGHTS.values()))[0]
    shapes = rng.sample(SHAPES, count)
    attributes = [{kind: rng.choice(values) for kind, values in ATTRIBUTES.items()} for _ in range(count)]
    if count >= 2:
        attributes[1] = {
            kind: attributes[0][kind] if kind == shared else rng.choice([v for v in values if v != attributes[0][kind]])
            for kind, values in ATTRIBUTES.items()
        }
    sides = [round(SIDE_FRACTION[a["size"]] * image_size) for a in attributes]
    boxes = None
    while boxes is None:
        boxes = _place(sides, image_size, rng)
    objects = tuple(
        SceneObject(str(index * 10 + k), shapes[k], a["color"], a["size"], a["material"], x, y, side)
        for k, (a, (x, y, side)) in enumerate(zip(attributes, boxes))
    )
    return Scene(f"syn{index:06d}", image_size, objects)


def horizontal(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """"left"/"right" if `a` is clearly to that side of `b`, else None."""
    dx = a.center[0] - b.center[0]
    return None if abs(dx) < _RELATION_MARGIN * image_size else ("left" if dx < 0 else "right")


def vertical(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """"above"/"below" if `a` is clearly so relative to `b`, else None."""
    dy = a.center[1] - b.center[1]
    return None if abs(dy) < _RELATION_MARGIN * image_size else ("above" if dy < 0 else "below")


def image_side(obj: SceneObject, image_size: int) -> str | None:
    """"left"/"right" if the object's centre is clearly in that half of the image, else None."""
    offset = obj.center[0] - image_size / 2
    return None if abs(offset) < _SIDE_MARGIN * image_size else ("left" if offset < 0 else "right")


def scene_graph(scene: Scene) -> dict:
    """The scene as a GQA scene-graph record (attributes: colour, size, material; clear spatial relations)."""
    objects = {}
    for obj in scene.objects:
        relations = []
        for other in scene.objects:
            if other is obj:
                continue
            left_right = horizontal(obj, other, scene.image_size)
            if left_right:
                relations.append({"name": f"to the {left_right} of", "object": other.object_id})
            above_below = vertical(obj, other, scene.image_size)
            if above_below:
                relations.append({"name": above_below, "object": other.object_id})
        objects[obj.object_id] = {
            "name": obj.shape, "x": obj.x, "y": obj.y, "w": obj.side, "h": obj.side,
            "attributes": [obj.color, obj.size, obj.material], "relations": relations,
        }
    return {"width": scene.image_size, "height": scene.image_size, "objects": objects}

"""A synthetic world in GQA's own file format: small scenes of solids, GQA-style questions in all six categories.

Why: the study's experiments need a model that answers GQA-style questions, and a tiny LLaVA can only be
trained from scratch (on CPU, in minutes) on a world it can actually learn. `synthesize` writes such a world as
real GQA files, so `load_gqa` reads it exactly like the real thing and every experiment runs unchanged on both.

The world:
- a scene is 1-4 objects (one object in a tenth of the scenes) on a plain background, at most one per shape,
  so "the cube" is unambiguous. Each object has a shape (cube, sphere, cylinder, cone), a colour (red, green,
  blue, yellow, purple, gray), a size (small, large: about 19% and 32% of the image side) and a material
  (metal, rubber); boxes never overlap;
- in a scene with two or more objects the first two share exactly one of colour, size and material (so every
  such scene can ask CompareAttr; which one is shared follows the CompareAttr answer counts, to keep them even);
- spatial facts are only stated with a clear margin: "left of" needs the box centres 12% of the image apart
  horizontally, "on the left side" a centre at least a sixth of the image from the middle.

The questions (GQA's templates and `types.detailed`; answers in GQA's answer form):

| category | detailed types | example | answers |
| --- | --- | --- | --- |
| ChooseAttr | chooseAttr, materialChoose | Is the cube red or blue? | the 6 colours, small/large, metal/rubber |
| ChooseCat | objThisChoose, categoryThatChoose | What is the large red object, a cube or a cone? | the 4 shapes |
| ChooseRel | relChooser | Is the cube to the left or to the right of the sphere? | left/right, above/below |
| CompareAttr | twoCommon | What do the cube and the sphere have in common? | color/size/material |
| LogicalObj | existThatOr (yes), existThatOrC (no) | Is there a cube or a cone that is green? | yes/no |
| QueryAttr | positionQuery | On which side of the photo is the cube? | left/right |
| (none) | directOf, material | What color is the cube? | colours, sizes, materials, shapes |

objThisChoose ("What is this, …") is asked only in one-object scenes, where "this" is unambiguous. The last row is
training variety outside the study's six (its rows get `category=None`).

Balance: answers are chosen greedily per split so that, within each category and template family (ChooseAttr's
colour/size/material questions, ChooseRel's horizontal/vertical ones, …), every answer is about equally common;
the true option of a choose question comes first or second equally often; categories get equal shares. So
neither the answer prior nor the option order nor the template gives the answer away: a model must look (on
48k questions, an exact-question-text lookup and a word-level naive Bayes fitted on train score chance on
val+test in all six categories).

Splits partition the scenes (no image is in two splits); everything follows from `seed`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from tqdm.auto import tqdm

from mmscope.data.balance import Balancer
from mmscope.data.categories import DETAILED_TYPE_TO_CATEGORY
from mmscope.data.errors import DataError, DataFileNotFoundError
from mmscope.data.gqa import load_gqa
from mmscope.data.render import render
from mmscope.errors import known

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
OTHER = "(other)"  # the bucket of extra questions outside the six categories (as `count_answers` names it)
DEFAULT_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))

# Geometry, as fractions of the image side.
_BORDER = 0.02
_GAP = 0.05
_RELATION_MARGIN = 0.12
_SIDE_MARGIN = 1 / 6
_OBJECT_COUNT_WEIGHTS = {1: 1, 2: 3, 3: 3, 4: 3}
# Shortest attribute descriptions tried when an object must be named without its shape.
_DESCRIPTIONS = (("color",), ("size", "color"), ("color", "material"), ("size", "color", "material"))

_TYPE_GROUPS = {  # detailed type -> (structural, semantic), as GQA labels them
    "chooseAttr": ("choose", "attr"),
    "materialChoose": ("choose", "attr"),
    "objThisChoose": ("choose", "cat"),
    "categoryThatChoose": ("choose", "cat"),
    "relChooser": ("choose", "rel"),
    "twoCommon": ("compare", "attr"),
    "existThatOr": ("logical", "obj"),
    "existThatOrC": ("logical", "obj"),
    "positionQuery": ("query", "attr"),
    "directOf": ("query", "attr"),
    "material": ("query", "attr"),
}


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


@dataclass(frozen=True)
class SyntheticFiles:
    """Where `synthesize` wrote the world (official GQA layout), per split."""

    root: Path
    questions: dict[str, Path]
    scene_graphs: dict[str, Path]
    images: Path
    world: Path


# --------------------------------------------------------------------------------------------- scenes


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


def _horizontal(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """"left"/"right" if `a` is clearly to that side of `b`, else None."""
    dx = a.center[0] - b.center[0]
    return None if abs(dx) < _RELATION_MARGIN * image_size else ("left" if dx < 0 else "right")


def _vertical(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """"above"/"below" if `a` is clearly so relative to `b`, else None."""
    dy = a.center[1] - b.center[1]
    return None if abs(dy) < _RELATION_MARGIN * image_size else ("above" if dy < 0 else "below")


def _image_side(obj: SceneObject, image_size: int) -> str | None:
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
            horizontal = _horizontal(obj, other, scene.image_size)
            if horizontal:
                relations.append({"name": f"to the {horizontal} of", "object": other.object_id})
            vertical = _vertical(obj, other, scene.image_size)
            if vertical:
                relations.append({"name": vertical, "object": other.object_id})
        objects[obj.object_id] = {
            "name": obj.shape, "x": obj.x, "y": obj.y, "w": obj.side, "h": obj.side,
            "attributes": [obj.color, obj.size, obj.material], "relations": relations,
        }
    return {"width": scene.image_size, "height": scene.image_size, "objects": objects}


# ------------------------------------------------------------------------------------------ questions
#
# Each category has a `_candidates_*` function listing every question a scene supports as
# (family, answer, payload), and a `_ask_*` function turning one payload into the question's text and program.


@dataclass(frozen=True)
class _Question:
    question: str
    full_answer: str
    detailed: str
    steps: list[tuple[str, str, list[int]]]  # (operation, argument, dependencies)
    mentions: list[tuple[str, str]]  # (word, object id) for the annotations


def _ref(obj: SceneObject) -> str:
    return f"{obj.shape} ({obj.object_id})"


def _description(scene: Scene, obj: SceneObject) -> tuple[str, ...] | None:
    """The shortest attribute kinds that single `obj` out without naming its shape, or None."""
    for kinds in _DESCRIPTIONS:
        matching = [o for o in scene.objects if all(o.attribute(k) == obj.attribute(k) for k in kinds)]
        if matching == [obj]:
            return kinds
    return None


def _options(true: str, false: str, true_first: bool) -> tuple[str, str]:
    return (true, false) if true_first else (false, true)


def _candidates_choose_attr(scene: Scene) -> Iterator[tuple]:
    for obj in scene.objects:
        for kind in ATTRIBUTES:
            yield kind, obj.attribute(kind), (obj, kind)


def _ask_choose_attr(scene, family, answer, payload, true_first, rng) -> _Question:
    obj, kind = payload
    false = rng.choice([v for v in ATTRIBUTES[kind] if v != answer])
    a, b = _options(answer, false, true_first)
    templates = {
        "color": ["Is the {o} {a} or {b}?", "What color is the {o}, {a} or {b}?"],
        "size": ["Is the {o} {a} or {b}?", "What size is the {o}, {a} or {b}?"],
        "material": ["Is the {o} made of {a} or {b}?", "What material is the {o}, {a} or {b}?"],
    }[kind]
    made = "made of " if kind == "material" else ""
    return _Question(
        rng.choice(templates).format(o=obj.shape, a=a, b=b),
        f"The {obj.shape} is {made}{answer}.",
        "materialChoose" if kind == "material" else "chooseAttr",
        [("select", _ref(obj), []), (f"choose {kind}", f"{answer}|{false}", [0])],
        [(obj.shape, obj.object_id)],
    )


def _candidates_choose_cat(scene: Scene) -> Iterator[tuple]:
    if len(scene.objects) == 1:
        yield "this", scene.objects[0].shape, (scene.objects[0], ())
        return
    for obj in scene.objects:
        kinds = _description(scene, obj)
        if kinds:
            yield "that", obj.shape, (obj, kinds)


def _ask_choose_cat(scene, family, answer, payload, true_first, rng) -> _Question:
    obj, kinds = payload
    if family == "this":
        false = rng.choice([s for s in SHAPES if s != answer])
        a, b = _options(answer, false, true_first)
        return _Question(
            rng.choice(["What is this, a {a} or a {b}?", "Is this a {a} or a {b}?"]).format(a=a, b=b),
            f"This is a {answer}.",
            "objThisChoose",
            [("select", f"this ({obj.object_id})", []), ("choose name", f"{answer}|{false}", [0])],
            [("this", obj.object_id)],
        )
    # The distractor is another shape in the scene, so the attribute must be bound to the right object.
    false = rng.choice([o.shape for o in scene.objects if o is not obj])
    a, b = _options(answer, false, true_first)
    description = " ".join(obj.attribute(k) for k in kinds)
    steps = [("select", f"object ({obj.object_id})", [])]
    steps += [(f"filter {kind}", obj.attribute(kind), [i]) for i, kind in enumerate(kinds)]
    steps.append(("choose name", f"{answer}|{false}", [len(steps) - 1]))
    templates = ["What is the {d} object, a {a} or a {b}?", "Which shape is the {d} object, a {a} or a {b}?"]
    return _Question(
        rng.choice(templates).format(d=description, a=a, b=b),
        f"The {description} object is a {answer}.",
        "categoryThatChoose",
        steps,
        [("object", obj.object_id)],
    )


def _candidates_choose_rel(scene: Scene) -> Iterator[tuple]:
    for subject in scene.objects:
        for reference in scene.objects:
            if subject is reference:
                continue
            horizontal = _horizontal(subject, reference, scene.image_size)
            if horizontal:
                yield "horizontal", horizontal, (subject, reference)
            vertical = _vertical(subject, reference, scene.image_size)
            if vertical:
                yield "vertical", vertical, (subject, reference)


def _ask_choose_rel(scene, family, answer, payload, true_first, rng) -> _Question:
    subject, reference = payload
    s, r = subject.shape, reference.shape
    if family == "horizontal":
        false = "right" if answer == "left" else "left"
        a, b = _options(answer, false, true_first)
        question = f"Is the {s} to the {a} or to the {b} of the {r}?"
        relation, false_relation = f"to the {answer} of", f"to the {false} of"
    else:
        false = "below" if answer == "above" else "above"
        a, b = _options(answer, false, true_first)
        question = f"Is the {s} {a} or {b} the {r}?"
        relation, false_relation = answer, false
    return _Question(
        question,
        f"The {s} is {relation} the {r}.",
        "relChooser",
        [("select", _ref(reference), []),
         ("choose rel", f"{s},{relation}|{false_relation},s ({subject.object_id})", [0])],
        [(s, subject.object_id), (r, reference.object_id)],
    )


def _candidates_compare_attr(scene: Scene) -> Iterator[tuple]:
    for i, first in enumerate(scene.objects):
        for second in scene.objects[i + 1 :]:
            shared = [kind for kind in ATTRIBUTES if first.attribute(kind) == second.attribute(kind)]
            if len(shared) == 1:
                yield "common", shared[0], (first, second)


def _ask_compare_attr(scene, family, answer, payload, true_first, rng) -> _Question:
    first, second = rng.sample(payload, 2)
    value = first.attribute(answer)
    templates = ["What do the {a} and the {b} have in common?", "What do both the {a} and the {b} have in common?"]
    return _Question(
        rng.choice(templates).format(a=first.shape, b=second.shape),
        f"They are both {'made of ' if answer == 'material' else ''}{value}.",
        "twoCommon",
        [("select", _ref(first), []), ("select", _ref(second), []), ("common", "", [0, 1])],
        [(first.shape, first.object_id), (second.shape, second.object_id)],
    )


def _candidates_logical_obj(scene: Scene) -> Iterator[tuple]:
    for kind, values in ATTRIBUTES.items():
        for value in values:
            for first in SHAPES:
                for second in SHAPES:
                    if first != second:
                        yes = any(o.shape in (first, second) and o.attribute(kind) == value for o in scene.objects)
                        yield kind, "yes" if yes else "no", (first, second, kind, value)


def _ask_logical_obj(scene, family, answer, payload, true_first, rng) -> _Question:
    first, second, kind, value = payload
    by_shape = {o.shape: o for o in scene.objects}
    made = "made of " if kind == "material" else ""
    templates = [f"Is there a {{a}} or a {{b}} that is {made}{{v}}?",
                 f"Are there any {{a}}s or {{b}}s that are {made}{{v}}?"]
    if answer == "yes":
        match = next(by_shape[s] for s in (first, second) if s in by_shape and by_shape[s].attribute(kind) == value)
        full_answer = f"Yes, there is a {value} {match.shape}."
    else:
        full_answer = f"No, there are no {value} {first}s or {second}s."
    steps = []
    for shape in (first, second):
        obj = by_shape.get(shape)
        start = len(steps)
        steps += [("select", f"{shape} ({obj.object_id if obj else '-'})", []),
                  (f"filter {kind}", value, [start]), ("exist", "?", [start + 1])]
    steps.append(("or", "", [2, 5]))
    return _Question(
        rng.choice(templates).format(a=first, b=second, v=value),
        full_answer,
        "existThatOr" if answer == "yes" else "existThatOrC",
        steps,
        [(s, by_shape[s].object_id) for s in (first, second) if s in by_shape],
    )


def _candidates_query_attr(scene: Scene) -> Iterator[tuple]:
    for obj in scene.objects:
        side = _image_side(obj, scene.image_size)
        if side:
            yield "hposition", side, (obj,)


def _ask_query_attr(scene, family, answer, payload, true_first, rng) -> _Question:
    (obj,) = payload
    templates = ["On which side of the photo is the {o}?", "On which side of the image is the {o}?",
                 "On which side is the {o}?", "Which side of the image is the {o} on?"]
    return _Question(
        rng.choice(templates).format(o=obj.shape),
        f"The {obj.shape} is on the {answer} of the image.",
        "positionQuery",
        [("select", _ref(obj), []), ("query", "hposition", [0])],
        [(obj.shape, obj.object_id)],
    )


def _candidates_other(scene: Scene) -> Iterator[tuple]:
    for obj in scene.objects:
        for kind in ATTRIBUTES:
            yield kind, obj.attribute(kind), (obj, kind)
        kinds = _description(scene, obj)
        if kinds:
            yield "shape", obj.shape, (obj, kinds)


def _ask_other(scene, family, answer, payload, true_first, rng) -> _Question:
    obj, detail = payload
    if family == "shape":
        description = " ".join(obj.attribute(k) for k in detail)
        steps = [("select", f"object ({obj.object_id})", [])]
        steps += [(f"filter {kind}", obj.attribute(kind), [i]) for i, kind in enumerate(detail)]
        steps.append(("query", "name", [len(steps) - 1]))
        templates = ["What shape is the {d} object?", "What is the shape of the {d} object?"]
        return _Question(rng.choice(templates).format(d=description), f"The {description} object is a {answer}.",
                         "directOf", steps, [("object", obj.object_id)])
    templates = {
        "color": ["What color is the {o}?", "What is the color of the {o}?"],
        "size": ["What size is the {o}?", "What is the size of the {o}?"],
        "material": ["What is the {o} made of?", "What material is the {o}?"],
    }[family]
    made = "made of " if family == "material" else ""
    return _Question(
        rng.choice(templates).format(o=obj.shape),
        f"The {obj.shape} is {made}{answer}.",
        "material" if family == "material" else "directOf",
        [("select", _ref(obj), []), ("query", family, [0])],
        [(obj.shape, obj.object_id)],
    )


_BUCKETS = {
    "ChooseAttr": (_candidates_choose_attr, _ask_choose_attr),
    "ChooseCat": (_candidates_choose_cat, _ask_choose_cat),
    "ChooseRel": (_candidates_choose_rel, _ask_choose_rel),
    "CompareAttr": (_candidates_compare_attr, _ask_compare_attr),
    "LogicalObj": (_candidates_logical_obj, _ask_logical_obj),
    "QueryAttr": (_candidates_query_attr, _ask_query_attr),
    OTHER: (_candidates_other, _ask_other),
}

_CHOOSE = ("ChooseAttr", "ChooseCat", "ChooseRel")  # buckets whose two options are put in balanced order

ANSWERS: dict[str, tuple[str, ...]] = {
    "ChooseAttr": (*COLORS, *SIZES, *MATERIALS),
    "ChooseCat": SHAPES,
    "ChooseRel": ("left", "right", "above", "below"),
    "CompareAttr": tuple(ATTRIBUTES),
    "LogicalObj": ("yes", "no"),
    "QueryAttr": ("left", "right"),
    OTHER: (*COLORS, *SIZES, *MATERIALS, *SHAPES),
}


def _annotate(text: str, mentions: list[tuple[str, str]]) -> dict[str, str]:
    """GQA annotations: token index (as a string) -> object id, for each mentioned word's first occurrence."""
    tokens = [t.lower() for t in re.findall(r"\w+|[^\w\s]", text)]
    annotations = {}
    for word, object_id in mentions:
        for index, token in enumerate(tokens):
            if token in (word, f"{word}s"):
                annotations[str(index)] = object_id
                break
    return annotations


def _gqa_record(question_id: str, scene: Scene, answer: str, q: _Question) -> dict:
    structural, semantic = _TYPE_GROUPS[q.detailed]
    steps = [{"operation": op, "dependencies": deps, "argument": arg} for op, arg, deps in q.steps]
    semantic_str = "->".join(
        f"{op}: {arg}" + (f" [{', '.join(map(str, deps))}]" if deps else "") for op, arg, deps in q.steps
    )
    return {
        "imageId": scene.image_id,
        "question": q.question,
        "answer": answer,
        "fullAnswer": q.full_answer,
        "isBalanced": True,
        "groups": {"global": None, "local": q.detailed},
        "entailed": [],
        "equivalent": [question_id],
        "types": {"structural": structural, "semantic": semantic, "detailed": q.detailed},
        "annotations": {
            "question": _annotate(q.question, q.mentions),
            "answer": {},
            "fullAnswer": _annotate(q.full_answer, q.mentions),
        },
        "semantic": steps,
        "semanticStr": semantic_str,
    }


class _QuestionSampler:
    """Greedy per-split counts: pick the least-used bucket, then family, then answer, then option order."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.balancer = Balancer(rng)

    def shared_attribute(self) -> str:
        """The attribute a new scene's first two objects should share: CompareAttr's rarest answer so far."""
        return self.balancer.rarest(("answer", "CompareAttr", "common"), tuple(ATTRIBUTES))

    def ask(self, scene: Scene, n_questions: int) -> Iterator[tuple[str, str, _Question]]:
        """Up to `n_questions` (bucket, answer, question) for `scene`, no candidate twice."""
        pool = {}
        for bucket, (candidates, _) in _BUCKETS.items():
            tree: defaultdict[str, defaultdict[str, list]] = defaultdict(lambda: defaultdict(list))
            for family, answer, payload in candidates(scene):
                tree[family][answer].append(payload)
            if tree:
                pool[bucket] = tree
        for _ in range(n_questions):
            if not pool:
                return
            bucket = self.balancer.least_used(("bucket",), list(pool))
            family = self.balancer.least_used(("family", bucket), list(pool[bucket]))
            answer = self.balancer.least_used(("answer", bucket, family), list(pool[bucket][family]))
            payloads = pool[bucket][family][answer]
            payload = payloads.pop(self.rng.randrange(len(payloads)))
            true_first = (self.balancer.least_used(("order", bucket, family), [True, False]) if bucket in _CHOOSE
                          else True)
            yield bucket, answer, _BUCKETS[bucket][1](scene, family, answer, payload, true_first, self.rng)
            if not payloads:
                del pool[bucket][family][answer]
                if not pool[bucket][family]:
                    del pool[bucket][family]
                    if not pool[bucket]:
                        del pool[bucket]


# ------------------------------------------------------------------------------------------- writing


def _split_sizes(n_scenes: int, splits: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    """Scenes per split: largest-remainder rounding of `n_scenes * fraction`; every split gets at least one."""
    names = [name for name, _ in splits]
    fractions = [fraction for _, fraction in splits]
    if not splits or len(set(names)) != len(names) or any(not re.fullmatch(r"\w+", n) for n in names):
        raise DataError(f"splits must be distinct word-character names with fractions; got {list(splits)}")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be positive and sum to 1; got {dict(splits)}")
    exact = [n_scenes * f for f in fractions]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(len(splits)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n_scenes - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) == 0:
        raise DataError(f"n_scenes={n_scenes} is too few for splits {dict(splits)}: some split gets no scene")
    return list(zip(names, sizes))


def _render_file(task: tuple[str, int, list]) -> None:
    path, image_size, objects = task
    # 4:4:4 chroma and high quality keep the flat colours of small objects clean.
    render(image_size, objects).save(path, "JPEG", quality=95, subsampling=0)


def _render_all(tasks: list[tuple[str, int, list]], workers: int, progress: bool) -> None:
    bar = tqdm(total=len(tasks), desc="rendering scenes", unit="image", disable=not progress)
    if workers <= 1:
        for task in tasks:
            _render_file(task)
            bar.update()
    else:
        # fork starts workers at once on Linux; other platforms keep their default start method.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with context.Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_file, tasks, chunksize=32):
                bar.update()
    bar.close()


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    ours = [out_dir / name for name in ("questions", "sceneGraphs", "images", "world.json")]
    present = [path for path in ours if path.exists()]
    if present and not overwrite:
        raise DataError(f"{out_dir} already holds {', '.join(p.name for p in present)}; "
                        "pass overwrite=True (--overwrite) to replace them")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in ours[:3]:
        path.mkdir(parents=True)


def synthesize(
    out_dir: str | Path,
    n_scenes: int,
    seed: int = 0,
    *,
    image_size: int = 96,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    questions_per_scene: int = 8,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SyntheticFiles:
    """Write a synthetic world of `n_scenes` scenes in GQA's layout under `out_dir`; return the paths.

    Files: `questions/{split}_balanced_questions.json`, `sceneGraphs/{split}_sceneGraphs.json`,
    `images/{imageId}.jpg` and `world.json` (vocabulary, answers per category, settings, counts).

    Args:
        n_scenes: scenes (= images) over all splits; each gets up to `questions_per_scene` questions.
        seed: everything (scenes, questions, splits) is a function of it; images do not depend on `workers`.
        image_size: side of the square images in pixels (objects scale with it; >= 64 keeps them >= 12 px).
        splits: (name, fraction) pairs; scenes are divided by largest-remainder rounding, no scene shared.
        workers: rendering processes (default: all CPU cores).
        overwrite: replace a world already in `out_dir` (only the four entries above are removed).
        progress: show a progress bar.
    """
    if n_scenes < 1 or questions_per_scene < 1 or image_size < 32:
        raise DataError(f"need n_scenes >= 1, questions_per_scene >= 1 and image_size >= 32; got {n_scenes}, "
                        f"{questions_per_scene}, {image_size}")
    out_dir = Path(out_dir)
    sizes = _split_sizes(n_scenes, splits)
    _prepare_folder(out_dir, overwrite)
    files = SyntheticFiles(
        root=out_dir,
        questions={name: out_dir / "questions" / f"{name}_balanced_questions.json" for name, _ in sizes},
        scene_graphs={name: out_dir / "sceneGraphs" / f"{name}_sceneGraphs.json" for name, _ in sizes},
        images=out_dir / "images",
        world=out_dir / "world.json",
    )
    rng = random.Random(seed)
    tasks, counts, index, question_number = [], {}, 0, 0
    for split, n_split in sizes:
        sampler = _QuestionSampler(rng)
        questions, graphs = {}, {}
        for _ in range(n_split):
            scene = sample_scene(rng, index, image_size, sampler.shared_attribute())
            index += 1
            graphs[scene.image_id] = scene_graph(scene)
            tasks.append((str(files.images / f"{scene.image_id}.jpg"), image_size,
                          [(o.shape, COLORS[o.color], o.material == "metal", (o.x, o.y, o.side))
                           for o in scene.objects]))
            for _, answer, question in sampler.ask(scene, questions_per_scene):
                question_id = f"{question_number:08d}"
                question_number += 1
                questions[question_id] = _gqa_record(question_id, scene, answer, question)
        files.questions[split].write_text(json.dumps(questions))
        files.scene_graphs[split].write_text(json.dumps(graphs))
        counts[split] = {"scenes": n_split, "questions": len(questions)}
    _render_all(tasks, workers or os.cpu_count() or 1, progress)
    world = {
        "format": "mmscope synthetic GQA world",
        "version": 1,
        "seed": seed,
        "n_scenes": n_scenes,
        "image_size": image_size,
        "questions_per_scene": questions_per_scene,
        "splits": counts,
        "vocabulary": {"shapes": SHAPES, "colors": list(COLORS), "sizes": SIZES, "materials": MATERIALS},
        "colors_rgb": COLORS,
        "object_side_px": {size: round(f * image_size) for size, f in SIDE_FRACTION.items()},
        "answers": ANSWERS,
        "detailed_types": {t: DETAILED_TYPE_TO_CATEGORY.get(t) for t in _TYPE_GROUPS},
    }
    files.world.write_text(json.dumps(world, indent=2))
    return files


def load_synthetic(
    out_dir: str | Path,
    split: str = "train",
    *,
    categories: Sequence[str] | None = None,
    on_missing_image: str = "error",
) -> Dataset:
    """One split of a world written by `synthesize`, through `load_gqa` (with scene graphs and images).

    `categories` / `on_missing_image` as in `load_gqa`; the extra questions outside the six have
    `category=None` (pass `categories=CATEGORIES` to drop them).
    """
    out_dir = Path(out_dir)
    world_file = out_dir / "world.json"
    if not world_file.is_file():
        raise DataFileNotFoundError(f"{out_dir} is not a synthetic world: {world_file} is missing "
                                    "(create one with mmscope.data.synthesize or `mmscope data synth`)")
    splits = json.loads(world_file.read_text())["splits"]
    if split not in splits:
        raise DataError(f"unknown split {split!r} of the synthetic world {out_dir}; known: {known(splits)}")
    return load_gqa(
        out_dir / "questions" / f"{split}_balanced_questions.json",
        out_dir / "sceneGraphs" / f"{split}_sceneGraphs.json",
        out_dir / "images",
        categories=categories,
        on_missing_image=on_missing_image,
    )


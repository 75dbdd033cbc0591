"""GQA-style questions about a synthetic scene: one class per category (and one for the extra questions).

Each `QuestionBucket` lists every question a scene supports as a candidate `(family, answer, payload)`: the
template family within the bucket (ChooseAttr's "color"/"size"/"material", ChooseRel's "horizontal"/
"vertical" …), the answer, and what the question is about. `ask` turns one candidate into the question's text,
GQA program and annotations. `BUCKETS` is the registry; `QuestionSampler` draws from it with balanced counts.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from mmscope.data.balance import Balancer
from mmscope.data.synthetic.scenes import (
    ATTRIBUTES,
    COLORS,
    MATERIALS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    horizontal,
    image_side,
    vertical,
)

OTHER = "(other)"  # the bucket of extra questions outside the six categories (as `count_answers` names it)
# Shortest attribute descriptions tried when an object must be named without its shape.
_DESCRIPTIONS = (("color",), ("size", "color"), ("color", "material"), ("size", "color", "material"))

Candidate = tuple[str, str, tuple]  # (family, answer, payload)


@dataclass(frozen=True)
class Question:
    """One question about a scene, as GQA would write it (the answer is its candidate's)."""

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


class QuestionBucket(ABC):
    """The questions of one category (or the extra ones): which a scene supports, and how each is asked.

    `name` is the category (or `OTHER`), `answers` every answer its questions can have, `detailed_types` GQA's
    `types.detailed` values it writes with their (structural, semantic) groups, and `choose` whether its
    questions offer two options, whose order is then balanced.
    """

    name: ClassVar[str]
    answers: ClassVar[tuple[str, ...]]
    detailed_types: ClassVar[dict[str, tuple[str, str]]]
    choose: ClassVar[bool] = False

    @abstractmethod
    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Every question `scene` supports, as `(family, answer, payload)`."""

    @abstractmethod
    def ask(self, scene: Scene, family: str, answer: str, payload: tuple, true_first: bool,
            rng: random.Random) -> Question:
        """The question of one candidate; `true_first` puts the true option first (choose buckets)."""


class ChooseAttrQuestions(QuestionBucket):
    """Is the cube red or blue? One family per attribute kind; the false option is another value of that kind."""

    name = "ChooseAttr"
    answers = (*COLORS, *SIZES, *MATERIALS)
    detailed_types = {"chooseAttr": ("choose", "attr"), "materialChoose": ("choose", "attr")}
    choose = True
    templates: ClassVar[dict[str, list[str]]] = {
        "color": ["Is the {o} {a} or {b}?", "What color is the {o}, {a} or {b}?"],
        "size": ["Is the {o} {a} or {b}?", "What size is the {o}, {a} or {b}?"],
        "material": ["Is the {o} made of {a} or {b}?", "What material is the {o}, {a} or {b}?"],
    }

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Each attribute of each object."""
        for obj in scene.objects:
            for kind in ATTRIBUTES:
                yield kind, obj.attribute(kind), (obj, kind)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Name the object by its shape and offer its value of the kind and another."""
        obj, kind = payload
        false = rng.choice([v for v in ATTRIBUTES[kind] if v != answer])
        a, b = _options(answer, false, true_first)
        made = "made of " if kind == "material" else ""
        return Question(
            rng.choice(self.templates[kind]).format(o=obj.shape, a=a, b=b),
            f"The {obj.shape} is {made}{answer}.",
            "materialChoose" if kind == "material" else "chooseAttr",
            [("select", _ref(obj), []), (f"choose {kind}", f"{answer}|{false}", [0])],
            [(obj.shape, obj.object_id)],
        )


class ChooseCatQuestions(QuestionBucket):
    """What is the large red object, a cube or a cone? ("this" in one-object scenes, else "that" + attributes)."""

    name = "ChooseCat"
    answers = SHAPES
    detailed_types = {"objThisChoose": ("choose", "cat"), "categoryThatChoose": ("choose", "cat")}
    choose = True

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """The lone object as "this", or each object that a short attribute description singles out."""
        if len(scene.objects) == 1:
            yield "this", scene.objects[0].shape, (scene.objects[0], ())
            return
        for obj in scene.objects:
            kinds = _description(scene, obj)
            if kinds:
                yield "that", obj.shape, (obj, kinds)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Offer the object's shape and a distractor shape."""
        obj, kinds = payload
        if family == "this":
            false = rng.choice([s for s in SHAPES if s != answer])
            a, b = _options(answer, false, true_first)
            return Question(
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
        return Question(
            rng.choice(templates).format(d=description, a=a, b=b),
            f"The {description} object is a {answer}.",
            "categoryThatChoose",
            steps,
            [("object", obj.object_id)],
        )


class ChooseRelQuestions(QuestionBucket):
    """Is the cube to the left or to the right of the sphere? (and above or below), only for clear relations."""

    name = "ChooseRel"
    answers = ("left", "right", "above", "below")
    detailed_types = {"relChooser": ("choose", "rel")}
    choose = True

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Each ordered pair of objects, once per clear horizontal and vertical relation."""
        for subject in scene.objects:
            for reference in scene.objects:
                if subject is reference:
                    continue
                left_right = horizontal(subject, reference, scene.image_size)
                if left_right:
                    yield "horizontal", left_right, (subject, reference)
                above_below = vertical(subject, reference, scene.image_size)
                if above_below:
                    yield "vertical", above_below, (subject, reference)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Offer the relation and its opposite."""
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
        return Question(
            question,
            f"The {s} is {relation} the {r}.",
            "relChooser",
            [("select", _ref(reference), []),
             ("choose rel", f"{s},{relation}|{false_relation},s ({subject.object_id})", [0])],
            [(s, subject.object_id), (r, reference.object_id)],
        )


class CompareAttrQuestions(QuestionBucket):
    """What do the cube and the sphere have in common? Asked of pairs that share exactly one attribute."""

    name = "CompareAttr"
    answers = tuple(ATTRIBUTES)
    detailed_types = {"twoCommon": ("compare", "attr")}
    family: ClassVar[str] = "common"

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Each pair of objects sharing exactly one attribute kind (the answer)."""
        for i, first in enumerate(scene.objects):
            for second in scene.objects[i + 1 :]:
                shared = [kind for kind in ATTRIBUTES if first.attribute(kind) == second.attribute(kind)]
                if len(shared) == 1:
                    yield self.family, shared[0], (first, second)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Name the pair in random order."""
        first, second = rng.sample(payload, 2)
        value = first.attribute(answer)
        templates = ["What do the {a} and the {b} have in common?",
                     "What do both the {a} and the {b} have in common?"]
        return Question(
            rng.choice(templates).format(a=first.shape, b=second.shape),
            f"They are both {'made of ' if answer == 'material' else ''}{value}.",
            "twoCommon",
            [("select", _ref(first), []), ("select", _ref(second), []), ("common", "", [0, 1])],
            [(first.shape, first.object_id), (second.shape, second.object_id)],
        )


class LogicalObjQuestions(QuestionBucket):
    """Is there a cube or a cone that is green? Any two shapes and any value, present in the scene or not."""

    name = "LogicalObj"
    answers = ("yes", "no")
    detailed_types = {"existThatOr": ("logical", "obj"), "existThatOrC": ("logical", "obj")}

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Every (shape, other shape, attribute value), one family per attribute kind."""
        for kind, values in ATTRIBUTES.items():
            for value in values:
                for first in SHAPES:
                    for second in SHAPES:
                        if first != second:
                            yes = any(o.shape in (first, second) and o.attribute(kind) == value
                                      for o in scene.objects)
                            yield kind, "yes" if yes else "no", (first, second, kind, value)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Two exist-filters joined by "or"; a shape the scene lacks is selected as "-"."""
        first, second, kind, value = payload
        by_shape = {o.shape: o for o in scene.objects}
        made = "made of " if kind == "material" else ""
        templates = [f"Is there a {{a}} or a {{b}} that is {made}{{v}}?",
                     f"Are there any {{a}}s or {{b}}s that are {made}{{v}}?"]
        if answer == "yes":
            match = next(by_shape[s] for s in (first, second)
                         if s in by_shape and by_shape[s].attribute(kind) == value)
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
        return Question(
            rng.choice(templates).format(a=first, b=second, v=value),
            full_answer,
            "existThatOr" if answer == "yes" else "existThatOrC",
            steps,
            [(s, by_shape[s].object_id) for s in (first, second) if s in by_shape],
        )


class QueryAttrQuestions(QuestionBucket):
    """On which side of the photo is the cube? Only for objects clearly in one half of the image."""

    name = "QueryAttr"
    answers = ("left", "right")
    detailed_types = {"positionQuery": ("query", "attr")}

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Each object clearly left or right of the middle."""
        for obj in scene.objects:
            side = image_side(obj, scene.image_size)
            if side:
                yield "hposition", side, (obj,)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Name the object by its shape."""
        (obj,) = payload
        templates = ["On which side of the photo is the {o}?", "On which side of the image is the {o}?",
                     "On which side is the {o}?", "Which side of the image is the {o} on?"]
        return Question(
            rng.choice(templates).format(o=obj.shape),
            f"The {obj.shape} is on the {answer} of the image.",
            "positionQuery",
            [("select", _ref(obj), []), ("query", "hposition", [0])],
            [(obj.shape, obj.object_id)],
        )


class OtherQuestions(QuestionBucket):
    """What color is the cube? What shape is the red object? Training variety outside the study's six."""

    name = OTHER
    answers = (*COLORS, *SIZES, *MATERIALS, *SHAPES)
    detailed_types = {"directOf": ("query", "attr"), "material": ("query", "attr")}
    templates: ClassVar[dict[str, list[str]]] = {
        "color": ["What color is the {o}?", "What is the color of the {o}?"],
        "size": ["What size is the {o}?", "What is the size of the {o}?"],
        "material": ["What is the {o} made of?", "What material is the {o}?"],
    }

    def candidates(self, scene: Scene) -> Iterator[Candidate]:
        """Each attribute of each object, and the shape of each object a short description singles out."""
        for obj in scene.objects:
            for kind in ATTRIBUTES:
                yield kind, obj.attribute(kind), (obj, kind)
            kinds = _description(scene, obj)
            if kinds:
                yield "shape", obj.shape, (obj, kinds)

    def ask(self, scene, family, answer, payload, true_first, rng) -> Question:
        """Query the attribute of the object named by its shape, or the shape of the object described."""
        obj, detail = payload
        if family == "shape":
            description = " ".join(obj.attribute(k) for k in detail)
            steps = [("select", f"object ({obj.object_id})", [])]
            steps += [(f"filter {kind}", obj.attribute(kind), [i]) for i, kind in enumerate(detail)]
            steps.append(("query", "name", [len(steps) - 1]))
            templates = ["What shape is the {d} object?", "What is the shape of the {d} object?"]
            return Question(rng.choice(templates).format(d=description), f"The {description} object is a {answer}.",
                            "directOf", steps, [("object", obj.object_id)])
        made = "made of " if family == "material" else ""
        return Question(
            rng.choice(self.templates[family]).format(o=obj.shape),
            f"The {obj.shape} is {made}{answer}.",
            "material" if family == "material" else "directOf",
            [("select", _ref(obj), []), ("query", family, [0])],
            [(obj.shape, obj.object_id)],
        )


BUCKETS: tuple[QuestionBucket, ...] = (
    ChooseAttrQuestions(),
    ChooseCatQuestions(),
    ChooseRelQuestions(),
    CompareAttrQuestions(),
    LogicalObjQuestions(),
    QueryAttrQuestions(),
    OtherQuestions(),
)
_BY_NAME = {bucket.name: bucket for bucket in BUCKETS}

ANSWERS: dict[str, tuple[str, ...]] = {bucket.name: bucket.answers for bucket in BUCKETS}
# detailed type -> (structural, semantic), as GQA labels them
TYPE_GROUPS: dict[str, tuple[str, str]] = {
    detailed: groups for bucket in BUCKETS for detailed, groups in bucket.detailed_types.items()
}


class QuestionSampler:
    """Greedy per-split counts: pick the least-used bucket, then family, then answer, then option order."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.balancer = Balancer(rng)

    def shared_attribute(self) -> str:
        """The attribute a new scene's first two objects should share: CompareAttr's rarest answer so far."""
        return self.balancer.rarest(("answer", CompareAttrQuestions.name, CompareAttrQuestions.family),
                                    tuple(ATTRIBUTES))

    def ask(self, scene: Scene, n_questions: int) -> Iterator[tuple[str, str, Question]]:
        """Up to `n_questions` (bucket name, answer, question) for `scene`, no candidate twice."""
        pool = {}
        for bucket in BUCKETS:
            tree: defaultdict[str, defaultdict[str, list]] = defaultdict(lambda: defaultdict(list))
            for family, answer, payload in bucket.candidates(scene):
                tree[family][answer].append(payload)
            if tree:
                pool[bucket.name] = tree
        for _ in range(n_questions):
            if not pool:
                return
            name = self.balancer.least_used(("bucket",), list(pool))
            family = self.balancer.least_used(("family", name), list(pool[name]))
            answer = self.balancer.least_used(("answer", name, family), list(pool[name][family]))
            payloads = pool[name][family][answer]
            payload = payloads.pop(self.rng.randrange(len(payloads)))
            bucket = _BY_NAME[name]
            true_first = self.balancer.least_used(("order", name, family), [True, False]) if bucket.choose else True
            yield name, answer, bucket.ask(scene, family, answer, payload, true_first, self.rng)
            if not payloads:
                del pool[name][family][answer]
                if not pool[name][family]:
                    del pool[name][family]
                    if not pool[name]:
                        del pool[name]

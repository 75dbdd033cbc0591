"""Datasets for probing what a model's hidden states encode: image-text entailment and object recognition.

Two probing tasks, each built here from GQA-format scene graphs (the synthetic world's or GQA's, read by
`mmscope.data.scene_graphs`), or from MS COCO annotation files by `mmscope.data.coco`, which shares this
module's columns, swap vocabulary and row builders:

- **Image-text entailment** — (image, statement, label): does the statement describe the image? True
  statements are read off the annotations; each comes with a *hard negative*, the same sentence with exactly one
  thing swapped so that it becomes false: an attribute ("There is a red cube." -> "There is a blue cube."), an
  object ("... a red cone."), or a relation ("There is a cube to the left of a sphere." -> "... to the right
  of ..."). Because each pair differs in one word, a probe can only separate them by relating the word to the
  image, and labels are balanced by construction (one true and one false statement per pair, for every kind).
  The kinds are balanced too: each new pair takes the kind used least so far that the image supports
  (`mmscope.data.balance`).
- **Object recognition** — (image, multi-hot labels over object categories).

Swaps only use words the dataset itself uses (a synthetic world never gets "pink"), attributes are swapped
within their group (colour for colour, material for material, size for size, never to a synonym) and a
replacement object is preferably one the image does not contain at all. Scene graphs and COCO captions are
incomplete, so on real data a few "false" statements may still be true of the image; on the synthetic world
they are false by construction.

Rows carry `image_path` and, when an images folder is given, a lazily decoded `image` column (the same rule
as the question loaders, see `mmscope.data.rows`).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, Features, Value

from mmscope.data.balance import Balancer
from mmscope.data.errors import DataError
from mmscope.data.rows import (
    attach_images,
    check_on_missing_image,
    existing_file,
    existing_folder,
    file_stamp,
    generate_dataset,
    image_path,
)
from mmscope.data.scene_graphs import GraphObject, SceneGraph, read_scene_graphs

KINDS = ("attribute", "object", "relation")
STATEMENT_REQUEST = "True or false: {statement}"  # a statement asked as a question (its answer: "true" or "false")

# Attribute groups: each inner tuple is one meaning (synonyms are never swapped for each other).
ATTRIBUTE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "color": (("white",), ("black",), ("blue",), ("green",), ("red",), ("brown",), ("yellow",),
              ("gray", "grey"), ("orange",), ("pink",), ("purple",), ("silver",), ("gold", "golden"),
              ("tan", "beige")),
    "material": (("wood", "wooden"), ("metal", "metallic"), ("plastic",), ("glass",), ("concrete", "cement"),
                 ("brick",), ("stone",), ("leather",), ("rubber",), ("paper",), ("ceramic", "porcelain")),
    "size": (("small", "little", "tiny"), ("large", "big", "huge", "giant")),
}
OPPOSITE_RELATIONS = {
    "to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above",
    "in front of": "behind", "behind": "in front of",
}
# Each grouped attribute word -> (its group, the synonyms of its meaning).
MEANING = {word: (group, words) for group, meanings in ATTRIBUTE_GROUPS.items() for words in meanings
           for word in words}

ENTAILMENT_FEATURES = Features({
    "image_id": Value("string"),
    "statement": Value("string"),
    "label": ClassLabel(names=["false", "true"]),
    "negative_kind": Value("string"),
    "pair_id": Value("string"),
    "image_path": Value("string"),
})


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[:1] in "aeiou" else f"a {phrase}"


def _scene_graph_files(scene_graphs: str | Path | Sequence[str | Path]) -> list[Path]:
    files = [scene_graphs] if isinstance(scene_graphs, (str, Path)) else list(scene_graphs)
    if not files:
        raise DataError("need at least one scene-graph file; got an empty list")
    return [existing_file(file, "scene-graph file") for file in files]


def _read_graphs(files: list[Path]) -> Iterator[SceneGraph]:
    """The scene graphs of all `files`, in order, streamed."""
    for file in files:
        yield from read_scene_graphs(file)


@dataclass
class _Vocabulary:
    """What a scene-graph set says, used to pick plausible swaps: who has which attribute, who does what."""

    names: Counter = field(default_factory=Counter)
    names_with_attribute: defaultdict = field(default_factory=lambda: defaultdict(Counter))
    attributes: set = field(default_factory=set)
    relations_of_subject: defaultdict = field(default_factory=lambda: defaultdict(Counter))

    @classmethod
    def of(cls, files: list[Path]) -> _Vocabulary:
        """Count names, grouped attributes and relations over all scene graphs of `files` (one streamed pass)."""
        vocabulary = cls()
        for graph in _read_graphs(files):
            for obj in graph.objects:
                vocabulary.names[obj.name] += 1
                for attribute in obj.attributes:
                    if attribute in MEANING:
                        vocabulary.attributes.add(attribute)
                        vocabulary.names_with_attribute[attribute][obj.name] += 1
                for relation in obj.relations:
                    vocabulary.relations_of_subject[obj.name][relation.name] += 1
        return vocabulary


def _weighted(rng: random.Random, counts: dict[str, int]) -> str | None:
    if not counts:
        return None
    options = sorted(counts)
    return rng.choices(options, weights=[counts[o] for o in options])[0]


class _Statements:
    """True statements about one image and their one-swap negatives, checked against its scene graph."""

    def __init__(self, objects: Sequence[GraphObject], vocabulary: _Vocabulary):
        self.objects = objects
        self.vocabulary = vocabulary
        self.by_id = {obj.object_id: obj for obj in objects}

    def has(self, name: str, attribute: str | None) -> bool:
        """Is there an object called `name` (with `attribute`, unless None)?"""
        return any(o.name == name and (attribute is None or attribute in o.attributes) for o in self.objects)

    def related(self, subject: str, relation: str, obj: str) -> bool:
        """Is some `subject` in `relation` to some `obj` (by name) according to the scene graph?"""
        return any(o.name == subject and any(r.name == relation and self.by_id[r.object_id].name == obj
                                             for r in o.relations) for o in self.objects)

    def candidates(self) -> dict[str, list[tuple]]:
        """Kind -> the facts a true statement of that kind can state."""
        facts = {kind: [] for kind in KINDS}
        for obj in self.objects:
            grouped = [a for a in obj.attributes if a in MEANING]
            facts["attribute"] += [(obj.name, attribute) for attribute in grouped]
            facts["object"] += [(obj.name, attribute) for attribute in grouped or [None]]
            facts["relation"] += [(obj.name, r.name, self.by_id[r.object_id].name) for r in obj.relations]
        return {kind: sorted(set(found)) for kind, found in facts.items()}

    def pair(self, kind: str, fact: tuple, rng: random.Random) -> tuple[str, str] | None:
        """(true statement, false statement) for `fact`, or None if no swap makes it false."""
        if kind == "relation":
            subject, relation, obj = fact
            swapped = OPPOSITE_RELATIONS.get(relation) or _weighted(rng, {
                r: n for r, n in self.vocabulary.relations_of_subject[subject].items() if r != relation})
            if swapped is None or self.related(subject, swapped, obj):
                return None
            return (f"There is {_article(subject)} {relation} {_article(obj)}.",
                    f"There is {_article(subject)} {swapped} {_article(obj)}.")
        name, attribute = fact
        phrase = f"{attribute} {name}" if attribute else name
        if kind == "attribute":
            group, synonyms = MEANING[attribute]
            options = sorted(a for a in self.vocabulary.attributes if MEANING[a][0] == group
                             and a not in synonyms and not self.has(name, a))
            if not options:
                return None
            return f"There is {_article(phrase)}.", f"There is {_article(f'{rng.choice(options)} {name}')}."
        pool = self.vocabulary.names_with_attribute[attribute] if attribute else self.vocabulary.names
        absent = {n: c for n, c in pool.items() if n != name and not self.has(n, None)}
        without = {n: c for n, c in pool.items() if n != name and not self.has(n, attribute)}
        swapped = _weighted(rng, absent) or _weighted(rng, without)
        if swapped is None:
            return None
        swapped_phrase = f"{attribute} {swapped}" if attribute else swapped
        return f"There is {_article(phrase)}.", f"There is {_article(swapped_phrase)}."


def pairs_rows(image_id: str, pairs: list[tuple[str, str, str]], images: Path | None, file_name: str) -> list[dict]:
    """Rows of `ENTAILMENT_FEATURES` for one image's `(kind, true, false)` statement pairs, true one first."""
    rows = []
    for number, (kind, true, false) in enumerate(pairs):
        for statement, label in ((true, 1), (false, 0)):
            rows.append({"image_id": image_id, "statement": statement, "label": label, "negative_kind": kind,
                         "pair_id": f"{image_id}-{number}", "image_path": image_path(images, file_name)})
    return rows


def warn_skipped(skipped: int, total: int, what: str, source: str) -> None:
    """Warn, at the dataset builder's caller, of the `skipped` of `total` items of `source` that gave no pair."""
    if skipped:
        warnings.warn(f"skipped {skipped} of {total} {what} of {source} that gave no statement with a false "
                      f"one-swap counterpart", stacklevel=3)


def entailment_dataset(
    scene_graphs: str | Path | Sequence[str | Path],
    images: str | Path | None,
    seed: int = 0,
    *,
    pairs_per_image: int = 2,
    kinds: Sequence[str] = KINDS,
    on_missing_image: str = "error",
) -> Dataset:
    """Balanced image-text entailment pairs from GQA-format scene graphs.

    Args:
        scene_graphs: one or more `*_sceneGraphs.json` files (synthetic or GQA).
        images: the images folder (`{imageId}.jpg`), or None for `image_path` only.
        seed: the statements and swaps chosen are a function of it and the files.
        pairs_per_image: (true, false) statement pairs per image, at most.
        kinds: which swaps to use, among "attribute", "object", "relation".

    Returns a Dataset of rows `image_id`, `statement`, `label` (ClassLabel: 0 = false, 1 = true),
    `negative_kind` (what the pair's false statement swapped), `pair_id` (`{image_id}-{n}`, shared by the
    pair), `image_path` [, `image`]. Images without any usable statement are skipped with a warning.
    """
    check_on_missing_image(on_missing_image)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise DataError(f"unknown statement kind(s) {unknown}; known: {', '.join(KINDS)}")
    files = _scene_graph_files(scene_graphs)
    images_dir = existing_folder(images, "images folder") if images is not None else None
    vocabulary = _Vocabulary.of(files)
    rng = random.Random(seed)
    balancer = Balancer(rng)
    rows, total, skipped = [], 0, 0
    for graph in _read_graphs(files):
        total += 1
        statements = _Statements(graph.objects, vocabulary)
        facts = {kind: found for kind, found in statements.candidates().items() if kind in kinds and found}
        pairs, stated = [], set()
        while facts and len(pairs) < pairs_per_image:
            kind = balancer.rarest("kind", list(facts))
            fact = facts[kind].pop(rng.randrange(len(facts[kind])))
            if not facts[kind]:
                del facts[kind]
            made = statements.pair(kind, fact, rng)
            if made and made[0] not in stated:
                stated.add(made[0])
                balancer.count("kind", kind)  # a kind counts once it has given a pair, not when tried
                pairs.append((kind, *made))
        if not pairs:
            skipped += 1
        rows += pairs_rows(graph.image_id, pairs, images_dir, f"{graph.image_id}.jpg")
    warn_skipped(skipped, total, "images", ", ".join(map(str, files)))
    dataset = Dataset.from_list(rows, features=ENTAILMENT_FEATURES)
    return attach_images(dataset, images_dir, on_missing_image, "pair_id", what="statement pair")


def recognition_features(categories: Sequence[str]) -> Features:
    """The columns of an object-recognition dataset over `categories`, in label order."""
    return Features({
        "image_id": Value("string"),
        "labels": datasets.List(Value("int8"), length=len(categories)),
        "label_ids": datasets.List(ClassLabel(names=list(categories))),
        "image_path": Value("string"),
    })


def distinct_categories(categories: Sequence[str]) -> list[str]:
    """`categories` as a list, refused when empty or when a name repeats."""
    categories = list(categories)
    repeated = sorted(name for name, n in Counter(categories).items() if n > 1)
    if not categories or repeated:
        raise DataError(f"categories must be a non-empty list of distinct names; repeated: {repeated}")
    return categories


def recognition_row(image_id: str, present: set[str], index: dict[str, int], path: str) -> dict:
    """One image's row: multi-hot `labels` and `label_ids` of the `present` names that `index` numbers."""
    ids = sorted(index[name] for name in present if name in index)
    labels = [0] * len(index)
    for i in ids:
        labels[i] = 1
    return {"image_id": image_id, "labels": labels, "label_ids": ids, "image_path": path}


def _graph_recognition_rows(files: tuple[str, ...], categories: tuple[str, ...], images: str | None):
    index = {name: i for i, name in enumerate(categories)}
    for graph in _read_graphs([Path(f) for f in files]):
        path = image_path(Path(images) if images else None, f"{graph.image_id}.jpg")
        yield recognition_row(graph.image_id, {o.name for o in graph.objects}, index, path)


def object_recognition_dataset(
    scene_graphs: str | Path | Sequence[str | Path],
    images: str | Path | None,
    categories: Sequence[str] | None = None,
    *,
    on_missing_image: str = "error",
) -> Dataset:
    """Multi-hot object labels per image from GQA-format scene graphs.

    Args:
        scene_graphs: one or more `*_sceneGraphs.json` files.
        images: the images folder (`{imageId}.jpg`), or None for `image_path` only.
        categories: the object names to label, in label order; default: every name in the files, sorted.

    Returns a Dataset of rows `image_id`, `labels` (`[C]` 0/1, in `categories` order), `label_ids` (the indices
    of the present categories; its feature, a `ClassLabel`, holds the names:
    `dataset.features["label_ids"].feature.names`), `image_path` [, `image`]. Objects of other names are
    ignored; an image with none of the categories gets all zeros.
    """
    check_on_missing_image(on_missing_image)
    files = _scene_graph_files(scene_graphs)
    images_dir = existing_folder(images, "images folder") if images is not None else None
    if categories is None:
        categories = sorted(_Vocabulary.of(files).names)
    categories = distinct_categories(categories)
    gen_kwargs = {"files": tuple(str(f.resolve()) for f in files), "categories": tuple(categories),
                  "images": str(images_dir) if images_dir else None}
    dataset = generate_dataset(_graph_recognition_rows, gen_kwargs, recognition_features(categories),
                               [[file_stamp(f) for f in files], gen_kwargs])
    return attach_images(dataset, images_dir, on_missing_image, "image_id", what="image")

"""Probe datasets from MS COCO annotation files: image-text entailment from captions, object recognition from
instances.

The same two tasks, columns and balancing as the scene-graph datasets of `mmscope.data.probing` (read its
docstring for what a hard negative is), built from `captions_*.json` and `instances_*.json`. A caption's
negative swaps one word: an object the image contains for an absent one of the same supercategory, a colour
word for another colour, or a spatial word for its opposite. COCO's files are streamed (`ijson`); a record
that lacks a field, or points at an image or category the file does not list, is a `MalformedFileError`
naming the file.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ijson
from datasets import Dataset

from mmscope.data.balance import Balancer
from mmscope.data.errors import MalformedFileError
from mmscope.data.probing import (
    ATTRIBUTE_GROUPS,
    ENTAILMENT_FEATURES,
    MEANING,
    distinct_categories,
    pairs_rows,
    recognition_features,
    recognition_row,
    warn_skipped,
)
from mmscope.data.rows import (
    attach_images,
    check_on_missing_image,
    existing_file,
    existing_folder,
    file_stamp,
    generate_dataset,
    image_path,
    invalid_json,
)

# Caption words COCO negatives may swap for their opposite (relations) or another colour (attributes).
_CAPTION_OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "over",
                      "over": "under", "inside": "outside", "outside": "inside", "in front of": "behind",
                      "behind": "in front of"}


def _coco_items(path: Path, key: str, what: str) -> Iterator[dict]:
    """The records of `key` ("images", "annotations", "categories") of a COCO JSON file, streamed."""
    with path.open("rb") as handle:
        try:
            yield from ijson.items(handle, f"{key}.item", use_float=True)
        except ijson.JSONError as error:
            raise invalid_json(what, path, error) from None


def _coco_field(record: object, field_name: str, path: Path, key: str):
    if not isinstance(record, dict):
        raise MalformedFileError(f"COCO file {path}: the records of {key!r} must be objects, found {record!r}")
    if field_name not in record:
        raise MalformedFileError(f"COCO file {path}: a record of {key!r} lacks {field_name!r} "
                                 f"(has {', '.join(sorted(record))})")
    return record[field_name]


def _coco_file_names(path: Path, what: str) -> dict[int, str]:
    """Image id → file name, from the `images` records of a COCO JSON file (`what`: how errors name it)."""
    return {int(_coco_field(record, "id", path, "images")): _coco_field(record, "file_name", path, "images")
            for record in _coco_items(path, "images", what)}


@dataclass
class _CocoInstances:
    """What a COCO instances file says: category names (by id), supercategories, images, objects per image."""

    names: dict[int, str]
    supercategory: dict[str, str]
    file_names: dict[int, str]
    present: defaultdict

    @classmethod
    def read(cls, path: Path) -> _CocoInstances:
        """Stream `path`'s categories, images and annotations (segmentations are read but not kept)."""
        names, supercategory = {}, {}
        for record in _coco_items(path, "categories", "COCO instances file"):
            name = _coco_field(record, "name", path, "categories")
            names[int(_coco_field(record, "id", path, "categories"))] = name
            supercategory[name] = record.get("supercategory", "")
        if not names:
            raise MalformedFileError(f"COCO instances file {path} lists no categories")
        file_names = _coco_file_names(path, "COCO instances file")
        present = defaultdict(set)
        for record in _coco_items(path, "annotations", "COCO instances file"):
            category = int(_coco_field(record, "category_id", path, "annotations"))
            if category not in names:
                raise MalformedFileError(f"COCO instances file {path}: annotation {record.get('id')!r} has "
                                         f"category_id {category}, which 'categories' does not list")
            present[int(_coco_field(record, "image_id", path, "annotations"))].add(names[category])
        return cls(names, supercategory, file_names, present)


def _coco_recognition_rows(instances: str, images: str | None):
    coco = _CocoInstances.read(Path(instances))
    categories = [coco.names[i] for i in sorted(coco.names)]
    index = {name: i for i, name in enumerate(categories)}
    for image_id, file_name in coco.file_names.items():
        path = image_path(Path(images) if images else None, file_name)
        yield recognition_row(str(image_id), coco.present[image_id], index, path)


def coco_object_recognition_dataset(
    instances_json: str | Path, images: str | Path | None, *, on_missing_image: str = "error"
) -> Dataset:
    """Multi-hot labels over COCO's categories (in category-id order) for every image of `instances_*.json`.

    Same columns as `object_recognition_dataset`; `images` is the folder holding the files the JSON names.
    """
    check_on_missing_image(on_missing_image)
    path = existing_file(instances_json, "COCO instances file")
    images_dir = existing_folder(images, "images folder") if images is not None else None
    names = {int(_coco_field(r, "id", path, "categories")): _coco_field(r, "name", path, "categories")
             for r in _coco_items(path, "categories", "COCO instances file")}
    if not names:
        raise MalformedFileError(f"COCO instances file {path} lists no categories")
    categories = distinct_categories([names[i] for i in sorted(names)])
    gen_kwargs = {"instances": str(path.resolve()), "images": str(images_dir) if images_dir else None}
    dataset = generate_dataset(_coco_recognition_rows, gen_kwargs, recognition_features(categories),
                               [file_stamp(path), gen_kwargs])
    return attach_images(dataset, images_dir, on_missing_image, "image_id", what="image")


def _caption_swaps(caption: str, present: set[str], coco: _CocoInstances) -> dict[str, list[tuple]]:
    """Kind -> (start, end, replacement options) spans of `caption` whose swap makes it false."""
    text = caption.lower()
    swaps: dict[str, list[tuple]] = defaultdict(list)
    absent = sorted(set(coco.names.values()) - present)
    for name in present:
        for match in re.finditer(rf"\b{re.escape(name)}(s|es)?\b", text):
            same_kind = [n for n in absent if coco.supercategory[n] == coco.supercategory[name]]
            options = [n + (match.group(1) or "") for n in (same_kind or absent)]
            if options:
                swaps["object"].append((match.start(), match.end(), options))
    for match in re.finditer(r"\b[a-z]+\b", text):
        group = MEANING.get(match.group())
        if group and group[0] == "color":
            options = [m[0] for m in ATTRIBUTE_GROUPS["color"] if m != group[1]]
            swaps["attribute"].append((match.start(), match.end(), options))
    for phrase, opposite in _CAPTION_OPPOSITES.items():
        for match in re.finditer(rf"\b{phrase}\b", text):
            swaps["relation"].append((match.start(), match.end(), [opposite]))
    return swaps


def coco_entailment_dataset(
    captions_json: str | Path,
    instances_json: str | Path,
    images: str | Path | None,
    seed: int = 0,
    *,
    captions_per_image: int = 1,
    on_missing_image: str = "error",
) -> Dataset:
    """Balanced image-text entailment pairs from MS COCO captions, with one-word-swap hard negatives.

    The true statement is a human caption; its negative swaps one word: an object the image contains (per
    `instances_json`) for one of the same supercategory it does not contain ("a dog on a couch" -> "a cat on a
    couch"), a colour word for another colour, or a spatial word for its opposite ("left" -> "right"). Captions
    without such a word are skipped with a warning. Columns as in `entailment_dataset`.
    """
    check_on_missing_image(on_missing_image)
    captions_path = existing_file(captions_json, "COCO captions file")
    instances_path = existing_file(instances_json, "COCO instances file")
    images_dir = existing_folder(images, "images folder") if images is not None else None
    coco = _CocoInstances.read(instances_path)
    file_names = _coco_file_names(captions_path, "COCO captions file")
    captions = defaultdict(list)
    for record in _coco_items(captions_path, "annotations", "COCO captions file"):
        image_id = int(_coco_field(record, "image_id", captions_path, "annotations"))
        if image_id not in file_names:
            raise MalformedFileError(f"COCO captions file {captions_path}: caption {record.get('id')!r} is about "
                                     f"image {image_id}, which its 'images' does not list")
        captions[image_id].append(str(_coco_field(record, "caption", captions_path, "annotations")).strip())
    rng = random.Random(seed)
    balancer = Balancer(rng)
    rows, total, skipped = [], 0, 0
    for image_id in sorted(captions):
        pairs = []
        for caption in captions[image_id]:
            if len(pairs) == captions_per_image:
                break
            total += 1
            swaps = _caption_swaps(caption, coco.present[image_id], coco)
            if not swaps:
                skipped += 1
                continue
            kind = balancer.least_used("kind", list(swaps))
            start, end, options = rng.choice(swaps[kind])
            replacement = rng.choice(options)
            if caption[start].isupper():
                replacement = replacement.capitalize()
            pairs.append((kind, caption, caption[:start] + replacement + caption[end:]))
        rows += pairs_rows(str(image_id), pairs, images_dir, file_names[image_id])
    warn_skipped(skipped, total, "captions", str(captions_path))
    dataset = Dataset.from_list(rows, features=ENTAILMENT_FEATURES)
    return attach_images(dataset, images_dir, on_missing_image, "pair_id", what="statement pair")

"""Read the GQA release from disk: questions, scene graphs and images, as rows of `QUESTION_FEATURES`.

GQA's files (https://cs.stanford.edu/people/dorarad/gqa) are one JSON object per file:

- questions (`{split}_balanced_questions.json`, or the shards of `{split}_all_questions*.json`): questionId ->
  {imageId, question, answer, fullAnswer, types{structural, semantic, detailed}, annotations, semantic[…] …}.
  The test/challenge files carry no answers; their rows get `answer=""`.
- scene graphs (`{split}_sceneGraphs.json`): imageId -> {width, height, objects{id: {name, x, y, w, h,
  attributes, relations}}}, read and checked by `mmscope.data.scene_graphs`.
- images (`images/{imageId}.jpg`).

The train questions file is about 1.4 GB, so every file is parsed incrementally (`ijson`) and rows go straight
into an Arrow file; the only thing held in memory is a compact box index of the scene graphs (size and
`[x, y, w, h]` per object). The category comes from `types.detailed` (see `mmscope.data.categories`); the
central objects and the options of choose questions come from the semantic program (see
`mmscope.data.program`), their boxes from the scene graphs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from mmscope.data.categories import category_of, check_categories
from mmscope.data.errors import MalformedFileError
from mmscope.data.program import central_objects, choice_options, order_by_question
from mmscope.data.rows import (
    QUESTION_FEATURES,
    attach_images,
    check_on_missing_image,
    existing_file,
    existing_folder,
    file_stamp,
    generate_dataset,
    image_path,
    iter_json_object,
)
from mmscope.data.scene_graphs import read_scene_graphs

# imageId -> (width, height, {objectId: [x, y, w, h]})
BoxIndex = dict[str, tuple[int, int, dict[str, list[float]]]]


def read_box_index(path: Path) -> BoxIndex:
    """The image sizes and object boxes of a GQA scene-graph file (attributes and relations are not kept)."""
    return {graph.image_id: (graph.width, graph.height, {obj.object_id: list(obj.box) for obj in graph.objects})
            for graph in read_scene_graphs(path)}


def detailed_type_of(record: object, place: str) -> str:
    """The `types.detailed` of a question record ("" when absent), once the record and its `types` are checked
    to be records; `place` names the file and question for errors."""
    if not isinstance(record, dict):
        raise MalformedFileError(f"{place}: expected a record, found {type(record).__name__}")
    types = record.get("types") or {}
    if not isinstance(types, dict):
        raise MalformedFileError(f"{place}: 'types' must be a record {{structural, semantic, detailed}}, "
                                 f"found {types!r}")
    return str(types.get("detailed") or "")


def question_row(
    question_id: str, record: object, where: str, boxes: BoxIndex | None, images: Path | None
) -> dict:
    """One GQA question record as a row of `QUESTION_FEATURES`. `where` names the file for errors."""
    place = f"{where}, question {question_id!r}"
    detailed_type = detailed_type_of(record, place)
    missing = [key for key, kinds in (("imageId", (str, int)), ("question", str))
               if not isinstance(record.get(key), kinds)]
    if missing:
        raise MalformedFileError(f"{place}: missing field(s) {', '.join(missing)}; found {', '.join(sorted(record))}")
    image_id = str(record["imageId"])
    answer = str(record.get("answer") or "").strip().lower()
    program = record.get("semantic") or []
    try:
        objects = central_objects(program)
        true_option, false_option = choice_options(program, answer)
    except (ValueError, AttributeError, TypeError) as error:
        raise MalformedFileError(f"{place}: unusable semantic program: {error}") from None
    objects = order_by_question(objects, [o.name for o in objects], record["question"])
    width, height, image_boxes = boxes.get(image_id, (0, 0, {})) if boxes is not None else (0, 0, {})
    return {
        "question_id": str(question_id),
        "image_id": image_id,
        "question": str(record["question"]),
        "answer": answer,
        "full_answer": str(record.get("fullAnswer") or ""),
        "category": category_of(detailed_type),
        "detailed_type": detailed_type,
        "true_option": true_option,
        "false_option": false_option,
        "object_names": [o.name for o in objects],
        "object_ids": [o.object_id for o in objects],
        "object_boxes": [image_boxes.get(o.object_id, []) if o.object_id else [] for o in objects],
        "image_width": width,
        "image_height": height,
        "image_path": image_path(images, f"{image_id}.jpg"),
    }


def _gqa_rows(
    question_files: tuple[str, ...], scene_graphs: str | None, images: str | None, categories: tuple[str, ...] | None
) -> Iterator[dict]:
    boxes = read_box_index(Path(scene_graphs)) if scene_graphs else None
    images_dir = Path(images) if images else None
    wanted = set(categories) if categories is not None else None
    for file in map(Path, question_files):
        for question_id, record in iter_json_object(file, "questions file"):
            row = question_row(question_id, record, f"questions file {file}", boxes, images_dir)
            if wanted is None or row["category"] in wanted:
                yield row


def load_gqa(
    questions: str | Path | Sequence[str | Path],
    scene_graphs: str | Path | None = None,
    images: str | Path | None = None,
    *,
    categories: Sequence[str] | None = None,
    on_missing_image: str = "error",
) -> Dataset:
    """Load GQA questions (one file or several shards) as a `Dataset` of `QUESTION_FEATURES` rows.

    Args:
        questions: a GQA questions JSON file, or a list of them (the `*_all_questions_*.json` shards).
        scene_graphs: the matching `{split}_sceneGraphs.json`; gives `object_boxes` and the image size.
            Without it boxes are `[]` and sizes 0.
        images: the images folder (`{imageId}.jpg`); adds the lazily decoded `image` column (see
            `mmscope.data.rows` for the image rule).
        categories: keep only questions of these study categories; None keeps every question (those
            outside the six get `category=None`).
        on_missing_image: "error" (default) or "skip" (drop the question, warn with a count).

    Raises:
        DataFileNotFoundError / MissingImageError: a file or folder that does not exist, naming it.
        MalformedFileError: invalid JSON or a record without a required field, naming the file and question.
        UnknownCategoryError: a name in `categories` that is not one of the six.
    """
    check_on_missing_image(on_missing_image)
    files = [questions] if isinstance(questions, (str, Path)) else list(questions)
    if not files:
        raise MalformedFileError("load_gqa needs at least one questions file; got an empty list")
    files = [existing_file(file, "questions file") for file in files]
    graph_file = existing_file(scene_graphs, "scene-graph file") if scene_graphs is not None else None
    images_dir = existing_folder(images, "images folder") if images is not None else None
    selected = check_categories(categories) if categories is not None else None
    # Tuples, not lists: datasets would take list arguments for shards to split across workers.
    gen_kwargs = {
        "question_files": tuple(str(file.resolve()) for file in files),
        "scene_graphs": str(graph_file.resolve()) if graph_file else None,
        "images": str(images_dir) if images_dir else None,
        "categories": tuple(selected) if selected is not None else None,
    }
    cache_key = [[file_stamp(file) for file in files], file_stamp(graph_file), gen_kwargs]
    dataset = generate_dataset(_gqa_rows, gen_kwargs, QUESTION_FEATURES, cache_key)
    if graph_file is not None:
        warn_unknown_boxes(dataset, graph_file)
    return attach_images(dataset, images_dir, on_missing_image, "question_id")


def warn_unknown_boxes(dataset: Dataset, scene_graphs: Path) -> None:
    """Warn (with counts) about questions whose image or central objects the scene-graph file lacks."""
    table = dataset.data.table
    no_image = int(pc.sum(pc.equal(table["image_width"], 0)).as_py() or 0)
    if no_image:
        warnings.warn(
            f"{no_image} of {len(dataset)} questions refer to images absent from {scene_graphs}; "
            "their object boxes are unknown ([]) and image size 0",
            stacklevel=3,
        )
    has_image = pc.not_equal(table["image_width"], 0)
    ids = pc.list_flatten(pc.filter(table["object_ids"], has_image))
    box_lengths = pc.list_value_length(pc.list_flatten(pc.filter(table["object_boxes"], has_image)))
    unboxed = np.asarray(pc.and_(pc.not_equal(ids, ""), pc.equal(box_lengths, 0)))
    if unboxed.any():
        warnings.warn(
            f"{int(unboxed.sum())} object reference(s) in question programs name object ids absent from the "
            f"scene graph of their image in {scene_graphs}; those boxes are unknown ([])",
            stacklevel=3,
        )


def count_answers(questions: str | Path) -> dict[str, Counter]:
    """Answer counts per category of a GQA questions file, streamed (no Dataset is built).

    Questions outside the six categories are counted under "(other)".
    """
    path = existing_file(questions, "questions file")
    counts: dict[str, Counter] = {}
    for question_id, record in iter_json_object(path, "questions file"):
        category = category_of(detailed_type_of(record, f"questions file {path}, question {question_id!r}"))
        counts.setdefault(category or "(other)", Counter())[str(record.get("answer") or "").strip().lower()] += 1
    return counts

"""The row schema every question loader returns, and the plumbing they share.

One schema for the real GQA files, the study's CSVs and the synthetic world, so that experiments never care
where a question came from:

| column | type | meaning |
| --- | --- | --- |
| `question_id` | str | GQA question id, kept as a string (about half start with 0) |
| `image_id` | str | GQA image id |
| `question`, `answer`, `full_answer` | str | answer lower-cased as in GQA; `full_answer` may be "" |
| `category` | str or None | one of `CATEGORIES`, None when `detailed_type` is outside the study's six |
| `detailed_type` | str | GQA `types.detailed` |
| `true_option`, `false_option` | str or None | the two options of a choose question, in answer form |
| `object_names` | list[str] | the question's central object(s) as the question names them, in question order |
| `object_ids` | list[str] | their scene-graph ids, same order; "" for an object the image does not contain |
| `object_boxes` | list[list[float]] | `[x, y, w, h]` in original image pixels, same order; `[]` where unknown |
| `image_width`, `image_height` | int | original image size, 0 when unknown |
| `image_path` | str | see below |
| `image` | `datasets.Image` | only when an images folder is given; decodes lazily to a PIL image |

The image rule: without an images folder a row carries only `image_path`, the bare file name GQA's images
folder would hold (`{image_id}.jpg`); with one, `image_path` is the absolute path and the extra `image` column
opens that file on access. Every image must then exist: a missing one is an error naming the question and the
path, or, with `on_missing_image="skip"`, its questions are dropped with a warning that counts them. Images are
decoded only when a row is read (opening 100k of them up front would take minutes); a file that is there but is
not a readable image then raises `MalformedFileError` naming it (see `ImageFile`), never a PIL error.

Large files are read incrementally (`iter_json_object`: each of GQA's JSON files is one big object) and their
rows streamed into a memory-mapped Arrow file in batches (`generate_dataset`) instead of being held in Python
lists. That cache is keyed by the input files' path, size and modification time and by this package's source,
so an edited file or a changed loader never returns stale rows.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import ijson
import PIL.Image
import pyarrow as pa
from datasets import Dataset, Features, Value

from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError, MissingImageError
from mmscope.errors import known, suggest

ON_MISSING_IMAGE = ("error", "skip")
_BATCH_ROWS = 10_000

QUESTION_FEATURES = Features(
    {
        "question_id": Value("string"),
        "image_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "full_answer": Value("string"),
        "category": Value("string"),
        "detailed_type": Value("string"),
        "true_option": Value("string"),
        "false_option": Value("string"),
        "object_names": datasets.List(Value("string")),
        "object_ids": datasets.List(Value("string")),
        "object_boxes": datasets.List(datasets.List(Value("float32"))),
        "image_width": Value("int32"),
        "image_height": Value("int32"),
        "image_path": Value("string"),
    }
)


def existing_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a file; otherwise an error saying which `what` (e.g. "questions file") is missing."""
    path = Path(path)
    if path.is_dir():
        raise DataFileNotFoundError(f"{what} {path} is a folder; pass the file itself")
    if not path.is_file():
        raise DataFileNotFoundError(f"{what} {path} does not exist")
    return path


def existing_folder(path: str | Path, what: str) -> Path:
    """`path` as an absolute Path if it is a folder; otherwise an error naming it."""
    path = Path(path)
    if not path.is_dir():
        raise DataFileNotFoundError(f"{what} {path} does not exist or is not a folder")
    return path.resolve()


def image_path(images: Path | None, file_name: str) -> str:
    """The `image_path` value of a row: absolute under `images`, or the bare file name when there is no folder."""
    return str(images / file_name) if images is not None else file_name


def invalid_json(what: str, path: Path, error: Exception, after: str | None = None) -> MalformedFileError:
    """The error for a file ijson cannot parse, in one line: the `what` and path, the last entry read before it
    broke (when known) and the parser's reason ("premature EOF" said as what it means: a truncated file)."""
    detail = error.args[0] if error.args else ""
    detail = (detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)).strip()
    detail = detail.splitlines()[0] if detail else type(error).__name__
    if "premature EOF" in detail or "Incomplete JSON" in detail:
        detail = "the file ends part-way (truncated?)"
    place = f" after entry {after!r}" if after is not None else ""
    return MalformedFileError(f"{what} {path} is not valid JSON{place}: {detail}")


def iter_json_object(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """Stream the (key, value) pairs of a file holding one big JSON object, without loading it whole.

    `what` describes the file for error messages ("questions file" …). Raises `MalformedFileError` naming the
    file if it is not a JSON object or is cut off / invalid part-way (then also naming the last entry read).
    """
    with path.open("rb") as handle:
        first = handle.read(64).lstrip()[:1]
        if first != b"{":
            found = repr(first.decode(errors="replace")) if first else "an empty file"
            raise MalformedFileError(f"{what} {path}: expected a JSON object ({{id: record, …}}), found {found}")
        handle.seek(0)
        key = None
        try:
            for key, value in ijson.kvitems(handle, "", use_float=True):
                yield key, value
        except ijson.JSONError as error:
            raise invalid_json(what, path, error, key) from None


@functools.cache
def _source_digest() -> str:
    """A digest of this package's source, so that cached Arrow files die with the code that wrote them."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def file_stamp(path: Path | None) -> list | None:
    """What identifies a file's version for caching: its absolute path, size and modification time."""
    if path is None:
        return None
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def generate_dataset(
    generator: Callable[..., Iterator[dict]], gen_kwargs: dict, features: Features, cache_key: list
) -> Dataset:
    """A memory-mapped Dataset of the rows `generator(**gen_kwargs)` yields, cached under `cache_key`.

    Rows are written to an Arrow file in batches of `_BATCH_ROWS` (built with pyarrow directly, about 15x
    faster than `Dataset.from_generator`'s per-row encoding), under `HF_DATASETS_CACHE/mmscope/`. The file name
    is a digest of `cache_key`, the generator's name and this package's source; a finished file is reused, a
    failed run leaves nothing behind.
    """
    key = json.dumps([_source_digest(), generator.__name__, cache_key], sort_keys=True, default=str)
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "mmscope"
    path = folder / f"{generator.__name__}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        schema = features.arrow_schema
        try:
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                rows = generator(**gen_kwargs)
                while batch := list(itertools.islice(rows, _BATCH_ROWS)):
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return Dataset.from_file(str(path))


class ImageFile(datasets.Image):
    """The `image` column's feature: `datasets.Image`, except that when a row is read, a file that is not a
    readable image raises `MalformedFileError` naming it (and one deleted since loading `MissingImageError`)."""

    def decode_example(self, value, token_per_repo_id=None) -> PIL.Image.Image:
        """The PIL image of `value` (datasets' {path, bytes} record), decoded now."""
        try:
            return super().decode_example(value, token_per_repo_id)
        except FileNotFoundError:
            raise MissingImageError(f"image file {_image_source(value)} no longer exists "
                                    "(deleted after the dataset was loaded?)") from None
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            reason = "PIL cannot identify its format" if isinstance(error, PIL.UnidentifiedImageError) else error
            raise MalformedFileError(f"image file {_image_source(value)} is not a readable image ({reason}); "
                                     "replace it, or delete it and load with on_missing_image='skip' to drop "
                                     "its rows") from None


def _image_source(value: object) -> str:
    return str(value.get("path") or "(image bytes)") if isinstance(value, dict) else str(value)


def check_split(split: str, splits, where: str) -> None:
    """Refuse a split name that is not one of `splits` (those `where` holds), naming them and the closest."""
    if split not in splits:
        raise DataError(f"unknown split {split!r} of {where}; known: {known(splits)}{suggest(split, splits)}")


def check_on_missing_image(on_missing_image: str) -> None:
    """Reject an `on_missing_image` policy other than "error" and "skip"."""
    if on_missing_image not in ON_MISSING_IMAGE:
        raise DataError(f"unknown on_missing_image {on_missing_image!r}; known: {known(ON_MISSING_IMAGE)}")


def attach_images(
    dataset: Dataset, images: Path | None, on_missing_image: str, id_column: str, what: str = "question"
) -> Dataset:
    """Check that every row's `image_path` exists and add the lazily decoded `image` column.

    Without an images folder the dataset is returned unchanged. A missing file raises `MissingImageError` naming
    the first affected row (its `id_column` value) and the path; with `on_missing_image="skip"` the affected
    rows are dropped and a warning counts them.
    """
    check_on_missing_image(on_missing_image)
    if images is None:
        return dataset
    missing = {path for path in dataset.unique("image_path") if not Path(path).is_file()}
    if missing:
        if on_missing_image == "error":
            row = next(r for r in dataset.select_columns([id_column, "image_path"]) if r["image_path"] in missing)
            raise MissingImageError(
                f"{what} {row[id_column]!r}: image file {row['image_path']} is missing from {images} "
                f"({len(missing)} image file(s) missing in all); pass on_missing_image='skip' to drop those "
                f"{what}s with a warning"
            )
        before = len(dataset)
        dataset = dataset.filter(lambda path: path not in missing, input_columns="image_path")
        warnings.warn(
            f"skipped {before - len(dataset)} of {before} {what}s whose image file is missing from {images} "
            f"({len(missing)} distinct image file(s))",
            stacklevel=3,
        )
    features = dataset.features.copy()
    features["image"] = ImageFile()
    return dataset.map(lambda batch: {"image": batch["image_path"]}, batched=True, features=features)

"""Data: GQA loaders, the study's question sets, a synthetic GQA-format world, and probe datasets.

Every question loader returns a `datasets.Dataset` with the columns of `QUESTION_FEATURES` (see
`mmscope.data.rows` for the schema and the image rule); `mmscope.data.sources` picks the loader a data path needs.

The names below are imported when first used (PEP 562), so that a light module of this package (the command
line's `mmscope data`, `mmscope.data.columns`) does not import `datasets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmscope.lazy import lazy_exports

if TYPE_CHECKING:
    from mmscope.data.categories import CATEGORIES, DETAILED_TYPE_TO_CATEGORY, category_of
    from mmscope.data.gqa import count_answers, load_gqa
    from mmscope.data.coco import coco_entailment_dataset, coco_object_recognition_dataset
    from mmscope.data.probing import entailment_dataset, object_recognition_dataset
    from mmscope.data.rows import QUESTION_FEATURES
    from mmscope.data.study import load_study_csvs
    from mmscope.data.synthetic import SyntheticFiles, load_synthetic, synthesize

# Each public name -> the module that defines it.
_HOMES = {
    "CATEGORIES": "mmscope.data.categories",
    "DETAILED_TYPE_TO_CATEGORY": "mmscope.data.categories",
    "category_of": "mmscope.data.categories",
    "count_answers": "mmscope.data.gqa",
    "load_gqa": "mmscope.data.gqa",
    "coco_entailment_dataset": "mmscope.data.coco",
    "coco_object_recognition_dataset": "mmscope.data.coco",
    "entailment_dataset": "mmscope.data.probing",
    "object_recognition_dataset": "mmscope.data.probing",
    "QUESTION_FEATURES": "mmscope.data.rows",
    "load_study_csvs": "mmscope.data.study",
    "SyntheticFiles": "mmscope.data.synthetic",
    "load_synthetic": "mmscope.data.synthetic",
    "synthesize": "mmscope.data.synthetic",
}

__all__ = [
    "CATEGORIES",
    "DETAILED_TYPE_TO_CATEGORY",
    "QUESTION_FEATURES",
    "SyntheticFiles",
    "category_of",
    "coco_entailment_dataset",
    "coco_object_recognition_dataset",
    "count_answers",
    "entailment_dataset",
    "load_gqa",
    "load_study_csvs",
    "load_synthetic",
    "object_recognition_dataset",
    "synthesize",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)

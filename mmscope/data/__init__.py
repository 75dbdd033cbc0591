"""Data: GQA loaders, the study's question sets, a synthetic GQA-format world, and probe datasets.

Every question loader returns a `datasets.Dataset` with the columns of `QUESTION_FEATURES` (see
`mmscope.data.rows` for the schema and the image rule).
"""

from mmscope.data.categories import CATEGORIES, DETAILED_TYPE_TO_CATEGORY, category_of
from mmscope.data.gqa import count_answers, load_gqa
from mmscope.data.probing import (
    coco_entailment_dataset,
    coco_object_recognition_dataset,
    entailment_dataset,
    object_recognition_dataset,
)
from mmscope.data.rows import QUESTION_FEATURES
from mmscope.data.study import load_study_csvs
from mmscope.data.synthetic import SyntheticFiles, load_synthetic, synthesize

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

"""Data: GQA loaders, the study's question sets, a synthetic GQA-format world, and probe datasets."""

from mmscope.data.categories import CATEGORIES, DETAILED_TYPE_TO_CATEGORY, category_of
from mmscope.data.gqa import load_gqa
from mmscope.data.rows import QUESTION_FEATURES
from mmscope.data.study import load_study_csvs

__all__ = [
    "CATEGORIES",
    "DETAILED_TYPE_TO_CATEGORY",
    "QUESTION_FEATURES",
    "category_of",
    "load_gqa",
    "load_study_csvs",
]

"""The former name of `mmscope.data.probing`, still imported by `mmscope.experiments.workspace`.

Import the probing datasets from `mmscope.data` (or `mmscope.data.probing`) instead; this module goes once
nothing imports it.
"""

from mmscope.data.probing import (
    ATTRIBUTE_GROUPS,
    ENTAILMENT_FEATURES,
    KINDS,
    OPPOSITE_RELATIONS,
    coco_entailment_dataset,
    coco_object_recognition_dataset,
    entailment_dataset,
    object_recognition_dataset,
)

__all__ = [
    "ATTRIBUTE_GROUPS",
    "ENTAILMENT_FEATURES",
    "KINDS",
    "OPPOSITE_RELATIONS",
    "coco_entailment_dataset",
    "coco_object_recognition_dataset",
    "entailment_dataset",
    "object_recognition_dataset",
]

"""Interventions: frozen dataclasses applied inside an nnsight trace. One file per intervention."""

from mmscope.interventions.base import SITES, Context, Intervention
from mmscope.interventions.knockout import Knockout, knockout_window
from mmscope.interventions.patch import ActivationPatch, CachedPatch
from mmscope.interventions.truncate import SkipLayers, Truncate
from mmscope.interventions.vision import VisionCachedPatch, VisionKnockout, VisionScale

__all__ = [
    "SITES",
    "ActivationPatch",
    "CachedPatch",
    "Context",
    "Intervention",
    "Knockout",
    "SkipLayers",
    "Truncate",
    "VisionCachedPatch",
    "VisionKnockout",
    "VisionScale",
    "knockout_window",
]

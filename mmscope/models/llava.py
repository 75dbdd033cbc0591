"""LLaVA-1.5 family (`LlavaForConditionalGeneration`): CLIP vision tower, projector, Llama/Vicuna decoder.

The processor expands the single `<image>` placeholder into one token per vision patch (the CLS feature is
dropped under the "default" feature-selection strategy), in row-major patch order — which is exactly the order
`Adapter.patch_rectangles` returns, so the base adapter needs no overrides beyond its name and the CLIP vision
tower's sites (`mmscope.models.clip`).
"""

from __future__ import annotations

from mmscope.models.adapter import Adapter, register
from mmscope.models.clip import ClipVisionTower


@register("llava")
class LlavaAdapter(ClipVisionTower, Adapter):
    family: str = "llava"

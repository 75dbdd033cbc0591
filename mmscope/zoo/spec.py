"""`TinyLlavaSpec`: the geometry of a small LLaVA-1.5-family model, which `mmscope.zoo.build` builds.

Importing no heavy library: a training config holds one (`mmscope.zoo.shapes_llava.config`), and the command
line reads its defaults without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Geometry of a small LLaVA-1.5-family model. Defaults give a tiny random model for tests."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 4
    text_heads: int = 4
    kv_heads: int | None = None
    intermediate: int = 64
    max_positions: int = 1024
    do_pad: bool = False
    vision_feature_select_strategy: str = "default"
    extra: dict = field(default_factory=dict)

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

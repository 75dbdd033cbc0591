"""Layer truncation and skipping: run some decoder layers as the identity.

`Truncate(layer)` stops the language model after decoder layer `layer` and reads the answer through the final
norm and lm_head — an early exit (the layers after it are skipped, not computed). `SkipLayers(layers)` removes a
set of layers and keeps the rest. Both ask how much of the answer is already decided at a given depth and which
layers the computation cannot do without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmscope.interventions.base import Context, Intervention


@dataclass(frozen=True)
class SkipLayers(Intervention):
    """Skip the decoder layers in `layers`: each passes its input on unchanged."""

    layers: tuple[int, ...]
    counted: ClassVar[tuple[str, ...]] = ("layers",)
    whole_batch: ClassVar[bool] = True

    def apply(self, ctx: Context) -> None:
        for layer in sorted(set(self.layers)):
            ctx.skip(layer)

    def first_layer(self) -> int:
        return min(self.layers)


@dataclass(frozen=True)
class Truncate(Intervention):
    """Exit after decoder layer `layer`: every later layer is skipped; final norm and lm_head still apply."""

    layer: int
    counted: ClassVar[tuple[str, ...]] = ("layer",)
    whole_batch: ClassVar[bool] = True

    def apply(self, ctx: Context) -> None:
        ctx.check_layer(self.layer)
        for later in range(self.layer + 1, ctx.n_layers):
            ctx.skip(later)

    def first_layer(self) -> int:
        """The first skipped layer: every earlier one computes as in the clean run."""
        return self.layer + 1

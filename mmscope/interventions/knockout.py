"""Attention knockout: stop information from moving between two token groups in chosen layers.

Knockout(source, target, layers) sets the additive attention mask of every chosen layer to the dtype's minimum
at each (target query, source key) pair, so no target position can read from any source position there — the
technique of Geva et al. (2023) that the cross-modal information-flow study (Zhang et al., CVPR 2025) applies
to image → question → last-position flows. The edit is made on the mask each layer's self-attention receives,
on top of the model's own mask (causal, padding, or a family's bidirectional image block), which is cloned,
never edited in place. A position always keeps attending to itself, so no attention row is fully masked.

What to watch for: a knockout only removes *direct* attention edges in its window; information can still
arrive through intermediate positions, or through the same edge in layers outside the window. The study
therefore sweeps a centred window of k layers (`knockout_window`) over the whole depth.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mmscope.errors import InterventionError
from mmscope.interventions.base import Context, Group, Intervention, earliest
from mmscope.interventions.masks import block, pair_mask

if TYPE_CHECKING:
    from mmscope.layout import Example


def knockout_window(center: int, k: int, n_layers: int) -> tuple[int, ...]:
    """Layers blocked for centre layer `center` with window `k`: `max(0, c - k//2) … min(L, c + k - k//2) - 1`.

    This is the study's convention: e.g. k=9, c=0 gives layers 0..4; c=L-1 gives L-5..L-1. Each argument must be
    a whole number (a NaN, infinite or fractional one is refused, not rounded), and `k` at most `2L - 2`: any
    wider and the window around every centre holds all L layers, so the windows could not differ.
    """
    for name, value in (("n_layers", n_layers), ("window k", k), ("centre layer", center)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InterventionError(f"{name} {value!r} must be a whole number")
    if n_layers < 1:
        raise InterventionError(f"n_layers {n_layers} must be at least 1")
    if k < 1:
        raise InterventionError(f"window k={k} must be at least 1")
    widest = max(1, 2 * n_layers - 2)
    if k > widest:
        raise InterventionError(f"window k={k} blocks all {n_layers} layers at every centre; choose 1 to {widest}")
    if not 0 <= center < n_layers:
        raise InterventionError(f"centre layer {center} out of range; the model has layers 0..{n_layers - 1}")
    center, k = int(center), int(k)
    return tuple(range(max(0, center - k // 2), min(n_layers, center + k - k // 2)))


@dataclass(frozen=True)
class Knockout(Intervention):
    """Block attention from every `target` position to every `source` position in `layers` (all or some `heads`).

    `source` and `target` are layout group names ("image", "question", "last", "object" …) or explicit
    positions of the (unpadded) prompt. A position keeps attending to itself unless `keep_self` is False
    (as for a last → last knockout); even then no attention row is left fully masked.
    """

    source: Group
    target: Group
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    counted: ClassVar[tuple[str, ...]] = ("layers", "heads")
    keep_self: bool = True

    def apply(self, ctx: Context) -> None:
        if self.heads is not None:
            bad = [h for h in self.heads if not 0 <= h < ctx.n_heads]
            if bad:
                raise InterventionError(f"heads {bad} out of range; the model has heads 0..{ctx.n_heads - 1}")
        blocked = None  # the edges, built once for the queries and keys this forward's masks have
        for layer in sorted(self.layers):
            mask = ctx.attention_mask(layer)
            if blocked is None or blocked.shape[-2:] != mask.shape[-2:]:
                blocked = pair_mask(ctx.example, self.target, self.source, self.keep_self, *mask.shape[-2:])
                blocked = blocked.to(mask.device)
            ctx.set_attention_mask(layer, block(mask, blocked, self.heads, ctx.n_heads, may_empty_rows=not self.keep_self))

    def affected_from(self, example: Example) -> int:
        """The earliest target position: only targets' attention changes, and earlier positions never read them."""
        return earliest(example, self.target)

    def first_layer(self) -> int:
        """The first blocked layer: earlier layers compute as in the clean run."""
        return min(self.layers)

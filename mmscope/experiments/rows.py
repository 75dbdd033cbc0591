"""Contexts restricted to some rows of a batched forward that starts after a cached prefix: how the sweep engine
gives each variant of a suffix pass its own `Context`.

The engine runs several variants as rows of one forward over only the positions from `offset` on (the keys and
values before it come from a cache). Each variant's interventions apply through a `RowContext` restricted to
its rows (`Restriction`), so an intervention written for a full forward runs there unchanged:

  - sites are that row slice (views: edits reach the forward), from the forward's first position on;
  - positions (`positions`, `row_positions`) count from that position, and a group that starts before it is
    refused, naming the `affected_from` claim that would have kept it out of the suffix;
  - `write_positions` writes only the positions the forward runs: the engine starts a pass after a position
    an intervention writes only where its `source_prefix` claims that the cached prefix already carries the
    values written there;
  - mask edits change those rows only: the first variant to edit a layer's mask copies it once per forward,
    and every variant writes its rows into that copy (`Restriction.masks`); the conversion of a received mask
    to additive form is likewise shared (`Restriction.converted`);
  - a layer skip, which skips for the whole batch, is refused unless the context holds every row;
  - vision sites are refused: the vision tower does not run in a suffix pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mmscope.context import ActivationCache, Context, Group
from mmscope.errors import InterventionError

if TYPE_CHECKING:
    from mmscope.envoys import Sites
    from mmscope.layout import Example


@dataclass
class Restriction:
    """One variant's share of a batched forward: its `rows` of the running batch (of `batch_rows` rows), and
    `offset`, the forward's first position (earlier positions come from a cache).

    `masks` is shared by every variant of one forward: per layer, the batch's private copy of the attention
    mask that each variant writes its own rows into (copied once per layer, not once per variant).
    """

    rows: slice
    offset: int = 0
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_rows: int | None = None  # None: more rows than `rows` (a layer skip would reach other variants)
    converted: dict = field(default_factory=dict)  # the received masks as additive tensors, shared likewise


class RowContext(Context):
    """A `Context` restricted to `restriction.rows` of a batched forward starting at `restriction.offset`;
    `example` holds just those rows."""

    def __init__(self, sites: Sites, example: Example, restriction: Restriction,
                 source: ActivationCache | None = None) -> None:
        super().__init__(sites, example, source)
        if restriction.rows.stop - restriction.rows.start != self.batch_size:
            raise InterventionError(
                f"rows {restriction.rows} do not hold the {self.batch_size} row(s) of this context's example"
            )
        self.restriction = restriction
        # id(mask as received) -> (it, additive); one conversion serves every variant of a batched forward
        self._converted = restriction.converted

    @property
    def offset(self) -> int:
        """The forward's first position (earlier positions come from a cache)."""
        return self.restriction.offset

    def row_positions(self, group: Group, row: int) -> torch.Tensor:
        """Positions `[n]` of `group` in batch row `row`, counted from the forward's first position."""
        found = self.example.positions(group, row)
        offset = self.offset
        if offset and len(found) and int(found.min()) < offset:
            raise InterventionError(
                f"group {group!r} of row {row} starts at position {int(found.min())}, before this forward's first "
                f"position {offset} (earlier positions come from a cache); an intervention that touches it "
                f"must not claim affected_from > {int(found.min())}"
            )
        return found - offset

    def write_positions(self, value: torch.Tensor, row: int, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Write `new` at the example's `positions` of row `row`, those before the forward's first one left out."""
        live = positions >= self.offset
        super().write_positions(value, row, positions[live] - self.offset, new[live])

    def skip(self, layer: int, output: torch.Tensor | None = None) -> None:
        """Skip layer `layer` (see `Context.skip`); refused unless this context holds every row of the forward."""
        restriction = self.restriction
        if restriction.batch_rows != restriction.rows.stop - restriction.rows.start:
            rows = restriction.rows
            raise InterventionError(
                f"cannot skip layer {layer} for rows {rows.start}..{rows.stop - 1} only: a skipped layer skips for "
                "the whole batch; run this intervention in a forward of its own"
            )
        super().skip(layer, output)

    def _vision(self, value) -> torch.Tensor:
        """Refused: the vision tower does not run in a suffix pass, and its rows are images, not batch rows."""
        raise InterventionError(
            "vision sites are read in a full forward only: this context is restricted to some rows of a sweep "
            "engine's pass; an intervention on them must claim first_layer() == 0 and affected_from() == 0"
        )

    def _own_rows(self, value: torch.Tensor) -> torch.Tensor:
        return value[self.restriction.rows]  # a view: edits reach on

    def _batch_mask(self, layer: int, args, kwargs, mask: torch.Tensor) -> torch.Tensor:
        """The forward's private copy of the mask at `layer` with this context's rows replaced by `mask`."""
        whole = self._additive(args, kwargs)
        masks, rows = self.restriction.masks, self.restriction.rows
        private = masks.get(layer)
        # The first variant to edit a layer copies the shared mask once (widened to per-head when its edit is);
        # later variants of the same forward write their rows into that copy.
        if private is not whole or mask.shape[1] > whole.shape[1]:
            private = whole.expand(whole.shape[0], max(mask.shape[1], whole.shape[1]), *whole.shape[2:]).clone()
            masks[layer] = private
        private[rows] = mask
        return private


def row_contexts(sites: Sites, example: Example, rows: int, offset: int,
                 source: ActivationCache | None = None) -> list[RowContext]:
    """One context per row of a forward of `rows` variant rows of the one-row `example`, starting at position
    `offset`, sharing the forward's mask copies and mask conversions."""
    masks: dict[int, torch.Tensor] = {}  # per layer, the one mask copy every row's edits write into
    converted: dict = {}
    return [RowContext(sites, example, Restriction(slice(row, row + 1), offset, masks, rows, converted), source)
            for row in range(rows)]

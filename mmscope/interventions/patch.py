"""Activation patching: copy a site's activation at chosen positions from one run into another.

Clean and corrupted prompts run side by side in one batch (`model.batch([clean, corrupted])`); the patch reads
the source row's activation and writes it into the other rows at the same site, layer and token group. If the
metric moves back toward the clean value, the patched activation carries the information the corruption took
away (Meng et al. 2022; Heimersheim & Nanda 2024 discuss pitfalls such as choosing the metric and the
direction — clean→corrupted "denoising" vs corrupted→clean "noising").

Sites: "residual" (the stream after the layer), "attention" and "mlp" (each block's output before it is added
to the stream). The group must have as many positions in the source row as in each target row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmscope.errors import InterventionError
from mmscope.interventions.base import SITES, Context, Group, Intervention

if TYPE_CHECKING:
    from mmscope.layout import Example


@dataclass(frozen=True)
class ActivationPatch(Intervention):
    """Overwrite `site` at `positions` in `target_rows` (default: every other row) with `source_row`'s value."""

    site: str
    layers: tuple[int, ...]
    positions: Group
    source_row: int = 0
    target_rows: tuple[int, ...] | None = None

    def check(self) -> None:
        if self.site not in SITES:
            raise InterventionError(f"unknown site {self.site!r}; known: {', '.join(SITES)}")

    def apply(self, ctx: Context) -> None:
        targets = self._targets(ctx.batch_size)
        source = ctx.row_positions(self.positions, self.source_row)
        for layer in sorted(self.layers):
            activation = ctx.site(self.site, layer)
            value = activation[self.source_row, source].clone()
            for row in targets:
                destination = ctx.row_positions(self.positions, row)
                if len(destination) != len(source):
                    raise InterventionError(
                        f"group {self.positions!r} has {len(source)} positions in row {self.source_row} "
                        f"but {len(destination)} in row {row}"
                    )
                activation[row, destination] = value

    def _targets(self, batch_size: int) -> list[int]:
        """The rows written to; a patch that would write none, or outside the batch, is refused."""
        rows = range(batch_size)
        if self.source_row not in rows:
            raise InterventionError(f"source_row {self.source_row} not in a batch of {batch_size}")
        targets = [row for row in rows if row != self.source_row] if self.target_rows is None else list(self.target_rows)
        outside = [row for row in targets if row not in rows]
        if outside:
            raise InterventionError(f"target_rows {outside} not in a batch of {batch_size}")
        if not targets:
            raise InterventionError(
                f"ActivationPatch has no row to patch into: a batch of {batch_size} holds only its source row "
                f"{self.source_row}; batch the source with the runs to patch, e.g. model.batch([clean, corrupted])"
            )
        return targets

    def affected_from(self, example: Example) -> int:
        """The earliest patched position, in the source row (read) or a target row (written)."""
        targets = self._targets(len(example))
        touched = [example.positions(self.positions, row) for row in (self.source_row, *targets)]
        return min((int(found.min()) for found in touched if len(found)), default=example.seq_len)

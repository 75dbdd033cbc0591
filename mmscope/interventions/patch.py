"""Activation patching: copy a site's activation at chosen positions from one run into another.

Two ways, the same edit. `CachedPatch` writes a cached run's activation (`ctx.source`, an `ActivationCache` of
the clean example from `model.cache(clean)`) into the running one — TransformerLens' `generic_activation_patch
(model, corrupted, clean_cache, ...)` shape, which the sweep engine runs as variants of the corrupted example:
the clean run once, each patch from the first position and layer it touches. `ActivationPatch` runs clean and
corrupted prompts side by side in one batch (`model.batch([clean, corrupted])`), reads the source row's
activation and writes it into the other rows at the same site, layer and token group, for users who batch
their own pairs. If the
metric moves back toward the clean value, the patched activation carries the information the corruption took
away (Meng et al. 2022; Heimersheim & Nanda 2024 discuss pitfalls such as choosing the metric and the
direction — clean→corrupted "denoising" vs corrupted→clean "noising").

Sites: "residual" (the stream after the layer), "attention" and "mlp" (each block's output before it is added
to the stream). The group must have as many positions in the source as in each row patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from mmscope.context import check_site
from mmscope.errors import InterventionError
from mmscope.interventions.base import Context, Group, Intervention, earliest

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
    counted: ClassVar[tuple[str, ...]] = ("layers", "source_row", "target_rows")

    def check(self) -> None:
        check_site(self.site)

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
        return earliest(example, self.positions, (self.source_row, *self._targets(len(example))))

    def first_layer(self) -> int:
        return min(self.layers)


@dataclass(frozen=True)
class CachedPatch(Intervention):
    """Overwrite `site` at `positions` in every row with the source run's activation there (`ctx.source`).

        cache = model.cache(clean)                            # every site of every layer of the clean run
        probs = model.next_token_probs(corrupted, [CachedPatch("residual", 12, "image")], source=cache)

    The group must have as many positions in the source example as in each row. In an engine's suffix pass,
    positions before the forward's first one are left alone (`Context.write_positions`): the engine starts there
    only where they already hold the source's values (`source_prefix`).
    """

    site: str
    layers: tuple[int, ...]
    counted: ClassVar[tuple[str, ...]] = ("layers",)
    positions: Group

    def check(self) -> None:
        check_site(self.site)

    def apply(self, ctx: Context) -> None:
        source = ctx.source
        from_positions = source.positions(self.positions)
        for layer in sorted(self.layers):
            activation = ctx.site(self.site, layer)
            value = source.site(self.site, layer)[0, from_positions]
            for row in range(ctx.batch_size):
                destination = ctx.example.positions(self.positions, row)
                if len(destination) != len(from_positions):
                    raise InterventionError(
                        f"group {self.positions!r} has {len(from_positions)} positions in the source example but "
                        f"{len(destination)} in row {row}"
                    )
                ctx.write_positions(activation, row, destination, value)

    def affected_from(self, example: Example) -> int:
        """The earliest patched position."""
        return earliest(example, self.positions)

    def first_layer(self) -> int:
        return min(self.layers)

    def source_sites(self) -> frozenset[tuple[str, int]]:
        return frozenset((self.site, layer) for layer in self.layers)

    def source_prefix(self, example: Example, source: Example, agree_before: int) -> tuple[int, int] | None:
        """A residual patch makes its group carry the source's stream after its first layer; positions before
        `agree_before` carry it anyway. Every position before the first one that is neither then computes exactly
        the source's values in later layers (attention being causal) — a claim made only when the group lies
        wholly before that position (as every image position does, patched in an image swap)."""
        if self.site != "residual" or len(example) != 1 or example.seq_len != source.seq_len:
            return None
        patched = example.positions(self.positions, 0)
        if not torch.equal(patched, source.positions(self.positions, 0)):
            return None
        covered = torch.zeros(example.seq_len + 1, dtype=torch.bool)
        covered[:agree_before] = True
        covered[patched] = True
        prefix = int((~covered).nonzero()[0])
        return (prefix, min(self.layers)) if len(patched) and int(patched.max()) < prefix else None

"""Knockout's masks: block (target → source) edges on top of the additive mask the model built.

Convention (as in transformers' eager attention): the mask is added to the attention scores, 0 where a query
may attend and the dtype's minimum where it may not. Knockout *sets* blocked entries to the minimum (never adds,
which would overflow to -inf), and never blocks a position from itself, so no row is fully masked.
"""

from __future__ import annotations

import torch


def pair_mask(example, target, source, keep_self: bool = True) -> torch.Tensor:
    """Boolean `[B, T, T]`: True at (target query, source key) pairs to block.

    With `keep_self` the diagonal is never blocked; without it (e.g. a last → last knockout) `block` still
    keeps the diagonal of any row that the edit would otherwise mask completely.
    """
    size = example.seq_len
    blocked = torch.zeros(len(example), size, size, dtype=torch.bool)
    for row in range(len(example)):
        targets, sources = example.positions(target, row), example.positions(source, row)
        blocked[row, targets.unsqueeze(1), sources.unsqueeze(0)] = True
    if keep_self:
        blocked &= ~torch.eye(size, dtype=torch.bool)
    return blocked


def block(mask: torch.Tensor, blocked: torch.Tensor, heads: tuple[int, ...] | None, n_heads: int,
          may_empty_rows: bool = True) -> torch.Tensor:
    """A copy of additive `mask [B, h, Q, K]` with the dtype minimum where `blocked [B, T, T]` is True.

    Queries of `mask` are the last Q of the T positions (Q < T when keys come from a cache); `heads` restricts
    the block to some heads, expanding the mask to `[B, n_heads, Q, K]`. `may_empty_rows=False` (the diagonal
    is never in `blocked`) skips the guard that restores the diagonal of rows the edit would empty.
    """
    queries, keys = mask.shape[-2], mask.shape[-1]
    edges = blocked[:, keys - queries : keys, :keys].to(mask.device).unsqueeze(1)  # [B, 1, Q, K]
    if heads is not None:
        chosen = torch.zeros(n_heads, dtype=torch.bool, device=mask.device)
        chosen[list(heads)] = True
        edges = edges & chosen[None, :, None, None]
        mask = mask.expand(mask.shape[0], n_heads, queries, keys)
    minimum = torch.finfo(mask.dtype).min
    edited = mask.masked_fill(edges, minimum)
    if not may_empty_rows:
        return edited
    emptied = (edited == minimum).all(-1) & ~(mask == minimum).all(-1)  # [B, h, Q]: rows the edit emptied
    if emptied.any():
        diagonal = torch.eye(keys, dtype=torch.bool, device=mask.device)[keys - queries :]
        edited = torch.where(emptied.unsqueeze(-1) & diagonal, mask, edited)
    return edited

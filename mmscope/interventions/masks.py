"""Knockout's masks: block (target → source) edges on top of the additive mask the model built.

Convention (as in transformers' eager attention): the mask is added to the attention scores, 0 where a query
may attend and the dtype's minimum where it may not. Knockout *sets* blocked entries to the minimum (never adds,
which would overflow to -inf), and never blocks a position from itself, so no row is fully masked.
"""

from __future__ import annotations

import torch


def pair_mask(example, target, source, keep_self: bool = True, queries: int | None = None,
              keys: int | None = None) -> torch.Tensor:
    """Boolean `[B, Q, K]`: True at (target query, source key) pairs to block, for the last `queries` of the first
    `keys` positions as queries (default: every position, `[B, T, T]`).

    With `keep_self` the diagonal is never blocked; without it (e.g. a last → last knockout) `block` still
    keeps the diagonal of any row that the edit would otherwise mask completely.
    """
    keys = example.seq_len if keys is None else keys
    queries = keys if queries is None else queries
    first = keys - queries
    blocked = torch.zeros(len(example), queries, keys, dtype=torch.bool)
    for row in range(len(example)):
        targets, sources = example.positions(target, row), example.positions(source, row)
        targets = targets[(targets >= first) & (targets < keys)] - first
        blocked[row, targets.unsqueeze(1), sources[sources < keys].unsqueeze(0)] = True
    if keep_self:
        diagonal = torch.arange(queries)
        blocked[:, diagonal, diagonal + first] = False
    return blocked


def block(mask: torch.Tensor, blocked: torch.Tensor, heads: tuple[int, ...] | None, n_heads: int,
          may_empty_rows: bool = True) -> torch.Tensor:
    """A copy of additive `mask [B, h, Q, K]` with the dtype minimum where `blocked` is True: `[B, T, T]` over
    all positions, or `[B, Q, K]` already aligned with the mask (`pair_mask(..., queries=Q, keys=K)`).

    Queries of `mask` are the last Q of the K positions (Q < K when keys come from a cache); `heads` restricts
    the block to some heads, expanding the mask to `[B, n_heads, Q, K]`. `may_empty_rows=False` (the diagonal
    is never in `blocked`) skips the guard that restores the diagonal of rows the edit would empty.
    """
    queries, keys = mask.shape[-2], mask.shape[-1]
    aligned = blocked.shape[-2:] == (queries, keys)
    edges = blocked if aligned else blocked[:, keys - queries : keys, :keys]
    edges = (edges if edges.device == mask.device else edges.to(mask.device)).unsqueeze(1)  # [B, 1, Q, K]
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

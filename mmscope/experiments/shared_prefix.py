"""A key/value cache whose prefix every row of a batch shares, and the attention that reads it without copies.

A sweep runs many variants of one prompt that differ only from some position p on. Their keys and values
before p are the clean run's, the same for every variant, so a batch of n variants needs them once. A Hugging
Face cache, though, returns `torch.cat([past, new])` per row: even a stride-0 `expand` of the prefix along the
batch is copied n times per layer and forward — n × p × layers × 2 × kv width (for LLaVA-1.5-7B about 335 MB
per row in float16), which on a CPU costs more than the suffix's own compute and on a GPU caps the batch.

`SharedPrefixCache` keeps the prefix `[1, kv_heads, p, head_dim]` once and each row's suffix keys apart, and
`shared_prefix_attention` computes what eager attention computes, in two parts:

    scores  = [q · prefix_keysᵀ | q · suffix_keysᵀ] · scale + mask      # [n, heads, S, p + S]
    weights = softmax(scores) over all p + S keys, in float32
    output  = weights[..., :p] · prefix_values + weights[..., p:] · suffix_values

The prefix products fold every row (and every query head sharing a key head) into the query dimension of one
matrix product per key head, so the prefix is only ever read. The mask is the model's own `[n, 1 or H, S, p+S]`
additive mask, so a knockout edits it exactly as in a full forward.

`shared_prefix_attention_in(config)` switches a language model to this attention inside a `with` block; the
implementation name is registered with transformers' attention and mask interfaces on import.

What to watch for: the split sums round differently from one product over all keys (about 1e-7 relative in
float32), and attention with extra terms (logit soft-capping, sinks) or sliding windows is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from mmscope.errors import UnsupportedModelError

IMPLEMENTATION = "mmscope_shared_prefix"
UNSUPPORTED_TERMS = ("softcap", "s_aux", "sinks", "sliding_window")


class PrefixedStates(NamedTuple):
    """Keys (or values) of one layer as the attention sees them: the shared prefix and each row's suffix."""

    prefix: torch.Tensor  # [1, kv_heads, p, head_dim]
    suffix: torch.Tensor  # [n, kv_heads, S, head_dim]


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache: the clean prefix, once, and the suffix keys and values of the running forward."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.dtype, self.device = prefix_keys.dtype, prefix_keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        if self.keys is not None:
            raise RuntimeError("a SharedPrefixCache serves one forward pass; build a new one for the next")
        self.keys, self.values = key_states, value_states
        return PrefixedStates(self.prefix_keys, key_states), PrefixedStates(self.prefix_values, value_states)

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + (0 if self.keys is None else self.keys.shape[-2])


class SharedPrefixCache(Cache):
    """The first `length` positions of a clean `cache` (batch 1), shared by every row of the next forward."""

    def __init__(self, cache: Cache, length: int) -> None:
        if not shareable(cache):
            raise UnsupportedModelError(
                "the prefix engine needs full attention in every layer; this model's cache has sliding-window or "
                "linear-attention layers — use engine='naive'"
            )
        super().__init__(
            layers=[SharedPrefixLayer(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in cache.layers]
        )


def shareable(cache: Cache) -> bool:
    """Whether every layer of `cache` keeps all positions' keys and values (no sliding window, no recurrence)."""
    return not any(cache.is_sliding) and not any(cache.is_linear)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: PrefixedStates,
    value: PrefixedStates,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Eager attention of `query [n, heads, S, d]` over a shared prefix and per-row suffix keys.

    Returns the output `[n, S, heads, d]` (and no weights, as SDPA attention does).
    """
    if not isinstance(key, PrefixedStates):
        raise TypeError(f"{IMPLEMENTATION} attention runs only over a SharedPrefixCache; got {type(key).__name__} keys")
    extra = sorted(name for name in UNSUPPORTED_TERMS if kwargs.get(name) is not None)
    if extra:
        raise UnsupportedModelError(
            f"this model's attention takes {', '.join(extra)}, which the prefix engine does not compute; "
            "use engine='naive'"
        )
    rows, heads, queries, head_dim = query.shape
    kv_heads, prefix = key.prefix.shape[1], key.prefix.shape[2]
    group = heads // kv_heads
    # Scores live as [kv_heads, rows, group, S, p + S]: for each key head, the prefix block of every row and
    # grouped query head is one strided [rows·group·S, p] matrix, which one product writes in place.
    grouped = query.reshape(rows, kv_heads, group, queries, head_dim).transpose(0, 1)
    scores = query.new_empty(kv_heads, rows, group, queries, prefix + queries)
    folded_rows = rows * group * queries
    torch.matmul(grouped.reshape(kv_heads, folded_rows, head_dim), key.prefix[0].transpose(1, 2),
                 out=scores[..., :prefix].view(kv_heads, folded_rows, prefix))
    suffix_keys = key.suffix.transpose(0, 1).unsqueeze(2)  # [kv, n, 1, S, d]
    scores[..., prefix:] = torch.matmul(grouped, suffix_keys.transpose(-1, -2))
    scores.mul_(scaling)
    if attention_mask is not None:  # [n, 1 or heads, S, p + S], laid out like the scores
        per_head = attention_mask.shape[1] > 1
        mask = attention_mask.view(len(attention_mask), kv_heads if per_head else 1, group if per_head else 1,
                                   queries, -1)
        scores.add_(mask.transpose(0, 1))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights[..., :prefix].view(kv_heads, folded_rows, prefix), value.prefix[0])
    output = output.view(kv_heads, rows, group, queries, head_dim)
    output += torch.matmul(weights[..., prefix:], value.suffix.transpose(0, 1).unsqueeze(2))
    return output.permute(1, 3, 0, 2, 4).reshape(rows, queries, heads, head_dim), None


@contextmanager
def shared_prefix_attention_in(config) -> Iterator[None]:
    """Run the language model configured by `config` (its text config) with `shared_prefix_attention`."""
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous


AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)

"""The sweep engine: every variant of one example, at close to the minimum cost of each.

A sweep asks for the next-token distribution of one prompt under many variants — flows × knockout windows,
patching sites — each a small set of interventions. Run naively, every variant is a full forward: the vision
tower and all ~600 image positions of a LLaVA-1.5 prompt, again and again. But an intervention that touches no
position before p cannot change any position before p (attention is causal), so the clean keys and values of
that prefix — system prompt and image, about 95% of the sequence — are the same in every such variant.

Per example the engine therefore
  1. runs the clean pass once: vision tower, every layer's keys and values, the decoder's input embeddings and
     position ids, the clean next-token probabilities, and where a suffix may start (below);
  2. asks each variant from which position it can change anything (`Intervention.affected_from`; the earliest
     over its interventions) and moves that back to the nearest position a suffix may start from;
  3. runs the variants of each start as batched suffix passes — one row per variant, over positions start…T-1
     only, the clean prefix shared by all rows without copies (`SharedPrefixCache`), position ids continuing
     the prefix's, each variant's interventions applied through a `Context` restricted to its row — in
     batches sized to a memory budget;
  4. runs the variants no suffix can serve (start 0) as plain full forwards, one each.

Where a suffix may start: at a position p only if no earlier position attends to p or beyond in any layer
(read off the masks of the clean pass, so prefix-LM families whose prompt attends bidirectionally are caught),
and only after the last image token (some families add image features inside the decoder, which a suffix pass
would not repeat). Models whose cache cannot be shared (sliding-window or linear-attention layers) or whose
decoder is not handed input embeddings and position ids run every variant as a full forward, with a warning.

`engine="naive"` is the straightforward reference: one full `Model.run` per variant and one for the clean run.
Both engines agree to float rounding (the suffix computes in other matrix shapes; ≤1e-6 in probability).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from mmscope.context import Restriction
from mmscope.errors import InputError, known
from mmscope.experiments.shared_prefix import SharedPrefixCache, shareable, shared_prefix_attention_in
from mmscope.interventions import Intervention
from mmscope.layout import Example
from mmscope.model import Model

ENGINES = ("prefix", "naive")


@dataclass(frozen=True)
class Variant:
    """One variant of a sweep: an opaque `key` (e.g. `("image->last", 12)`) and the interventions it applies."""

    key: tuple
    interventions: tuple[Intervention, ...]

    @property
    def groups(self) -> frozenset[str]:
        """The token groups its interventions name: it runs only on an example that holds them all."""
        return frozenset().union(*(intervention.groups() for intervention in self.interventions))


@dataclass
class CleanRun:
    """The clean pass of one example and, from the prefix engine, what its suffix passes reuse."""

    probs: torch.Tensor  # [V] next-token probabilities at the last prompt position, float32
    cache: DynamicCache | None = None  # every layer's keys and values, [1, kv_heads, T, head_dim]
    embeds: torch.Tensor | None = None  # the decoder's input embeddings (image features in place), [1, T, D]
    position_ids: torch.Tensor | None = None  # the decoder's position ids, [..., 1, T]
    suffix_starts: torch.Tensor | None = None  # [T] bool: a suffix pass may start at this position


@dataclass(frozen=True)
class Batch:
    """Variants (indices into the sweep) that run together from position `start`; start 0: one full forward each."""

    start: int
    variants: tuple[int, ...]


def run_variants(
    model: Model,
    example: Example,
    variants: Sequence[Variant],
    *,
    engine: str = "prefix",
    memory_budget_mb: float = 1024,
    progress: bool = False,
) -> tuple[CleanRun, torch.Tensor]:
    """For ONE example (batch of 1): the clean run and next-token probs `[n_variants, V]` at the last prompt
    position under each variant (float32). `engine="naive"`: one full `model.run` per variant."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; known: {known(ENGINES)}")
    if len(example) != 1:
        raise InputError(f"run_variants takes one example (a batch of 1); got a batch of {len(example)}")
    if not memory_budget_mb > 0:
        raise InputError(f"memory_budget_mb must be positive; got {memory_budget_mb}")
    variants = list(variants)
    bar = tqdm(total=len(variants), desc="variants", unit="variant", disable=not progress, leave=False)
    if engine == "naive":
        clean = CleanRun(model.next_token_probs(example))
        probs = []
        for variant in variants:
            probs.append(model.next_token_probs(example, variant.interventions))
            bar.update()
        bar.close()
        return clean, torch.stack(probs) if probs else clean.probs.new_empty(0, len(clean.probs))
    clean = clean_pass(model, example)
    probs = clean.probs.new_empty(len(variants), len(clean.probs))
    for batch in plan(model, example, clean, variants, memory_budget_mb):
        if batch.start == 0:
            for index in batch.variants:
                probs[index] = model.next_token_probs(example, variants[index].interventions)
        else:
            chosen = [variants[index] for index in batch.variants]
            probs[list(batch.variants)] = suffix_pass(model, example, clean, batch.start, chosen)
        bar.update(len(batch.variants))
    bar.close()
    return clean, probs


def clean_pass(model: Model, example: Example) -> CleanRun:
    """One full forward that keeps every layer's keys and values, the decoder's inputs and its masks' reach."""
    cache = DynamicCache(config=model.adapter.text_config)
    inputs = {**model.model_inputs(example), model.adapter.cache_keyword: cache, "use_cache": True}
    ctx = model.context(example)
    last = last_position(example)

    def readout() -> tuple:
        kwargs = model.sites.decoder.inputs[1]
        reach = torch.full((example.seq_len,), -1, device=model.device)
        seen = []  # layers usually share one mask object (the context converts each once): measure it once
        for layer in range(model.n_layers):
            mask = ctx.attention_mask(layer)
            if not any(mask is other for other in seen):
                seen.append(mask)
                reach = torch.maximum(reach, latest_key(mask))
        return kwargs.get("inputs_embeds"), kwargs.get("position_ids"), reach, ctx.logits()[0, last].float()

    embeds, position_ids, reach, logits = model.run_inputs(inputs, [], readout)
    starts = torch.zeros(example.seq_len, dtype=torch.bool)
    positions = torch.arange(1, example.seq_len)
    starts[1:] = reach.cpu().cummax(0).values[:-1] < positions
    starts[: max(example.layout.get("image", [0])) + 1] = False
    if not shareable(cache) or embeds is None or position_ids is None:
        warnings.warn(
            f"{model.name}: the prefix engine needs full attention in every layer and a decoder that takes input "
            "embeddings and position ids; every variant runs as a full forward",
            stacklevel=3,
        )
        starts[:] = False
    return CleanRun(logits.softmax(-1), cache, embeds, position_ids, starts)


def latest_key(mask: torch.Tensor) -> torch.Tensor:
    """Per query of an additive mask `[B, h, T, T]`, the latest key position any row or head attends to, `[T]`."""
    attended = mask > torch.finfo(mask.dtype).min
    keys = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(attended, keys, -1).amax(-1).flatten(0, 1).amax(0)


def suffix_pass(model: Model, example: Example, clean: CleanRun, start: int,
                variants: Sequence[Variant]) -> torch.Tensor:
    """Next-token probs `[n, V]`: one row per variant over positions `start`…T-1, the clean prefix shared."""
    rows = len(variants)
    positions = clean.position_ids[..., start:]
    inputs = {
        "inputs_embeds": clean.embeds[:, start:].expand(rows, -1, -1).contiguous(),
        "attention_mask": example.inputs["attention_mask"].to(model.device).expand(rows, -1),
        "position_ids": positions.expand(*positions.shape[:-2], rows, positions.shape[-1]),
        model.adapter.cache_keyword: SharedPrefixCache(clean.cache, start),
        "use_cache": True,
    }
    masks: dict[int, torch.Tensor] = {}  # per layer, the one mask copy every row's edits write into
    contexts = [model.context(example, Restriction(slice(row, row + 1), start, masks)) for row in range(rows)]
    applied = [
        (intervention, contexts[row]) for row, variant in enumerate(variants) for intervention in variant.interventions
    ]
    whole = model.context(example)  # unrestricted: its logits are every variant row's
    last = last_position(example) - start
    with shared_prefix_attention_in(model.adapter.text_config):
        logits = model.run_inputs(inputs, applied, lambda: whole.logits()[:, last].float())
    return logits.softmax(-1)


def plan(model: Model, example: Example, clean: CleanRun, variants: Sequence[Variant],
         memory_budget_mb: float) -> list[Batch]:
    """Group variants by the position their suffix starts from, in batches that fit `memory_budget_mb`.

    A variant starts at the latest position a suffix may start from (`clean.suffix_starts`) at or before the
    earliest `affected_from` of its interventions; where there is none it starts at 0 and runs as a full
    forward. Later starts come first.
    """
    last = last_position(example)
    groups: dict[int, list[int]] = {}
    for index, variant in enumerate(variants):
        claim = min((intervention.affected_from(example) for intervention in variant.interventions), default=last)
        allowed = torch.nonzero(clean.suffix_starts[: min(claim, last) + 1]).flatten()
        groups.setdefault(int(allowed[-1]) if len(allowed) else 0, []).append(index)
    batches = []
    for start in sorted(groups, reverse=True):
        indices = groups[start]
        size = len(indices) if start == 0 else rows_within(model, example.seq_len - start, example.seq_len,
                                                           memory_budget_mb)
        batches += [Batch(start, tuple(indices[i : i + size])) for i in range(0, len(indices), size)]
    return batches


def rows_within(model: Model, queries: int, keys: int, memory_budget_mb: float) -> int:
    """How many variant rows of a suffix pass (`queries` positions over `keys`) fit `memory_budget_mb` (≥ 1).

    Per row, an estimate of what a suffix pass holds at its peak: the suffix's keys and values in every layer;
    one layer's scores, weights (float32 and model dtype) and edited per-head mask; the MLP's and the
    residual's activations; and the logits (model dtype and float32).
    """
    config = model.adapter.text_config
    size = model.hf.dtype.itemsize
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    cache = model.n_layers * 2 * queries * kv_heads * head_dim * size
    attention = config.num_attention_heads * queries * keys * (3 * size + 4)
    activations = queries * (3 * config.intermediate_size + 6 * config.hidden_size) * size
    logits = queries * config.vocab_size * (size + 4)
    return max(1, int(memory_budget_mb * 2**20 // (cache + attention + activations + logits)))


def last_position(example: Example) -> int:
    """The last prompt position of a one-row example."""
    return example.layout["last"][0]

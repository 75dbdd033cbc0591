"""The sweep engine: every variant of one example, at close to the minimum cost of each.

A sweep asks for the next-token distribution of one prompt under many variants — flows × knockout windows,
patching sites × layers, early exits — each a small set of interventions. Run naively, every variant is a full
forward: the vision tower and every layer over all ~600 image positions of a LLaVA-1.5 prompt, again and again.
But an intervention that touches no position before p and no layer below a cannot change any position before p
(attention is causal) nor anything below layer a: the clean keys and values of that prefix — system prompt and
image, about 95% of the sequence — and the clean stream entering layer a are the same in every such variant.

Per example the engine therefore
  1. runs the clean pass once: vision tower, every layer's keys and values and the stream entering it, the
     decoder's input embeddings and position ids, the clean next-token probabilities, and where a suffix may
     start (below). With a `source` example (clean → corrupted patching: the example is the corrupted one) it
     runs the source's clean pass too, keeping the activations the patches read (`CachedPatch`);
  2. asks each variant from which position and which layer it can change anything (`Intervention.
     affected_from`, `first_layer`: the earliest over its interventions) and moves the position back to the
     nearest one a suffix may start from. A residual patch whose group, with the positions where the two runs'
     inputs agree, covers a whole prefix (`source_prefix`: patching every image position of an image swap)
     leaves that prefix carrying the source's values in later layers: it starts after the prefix, with the
     source's keys and values there;
  3. runs the variants of each start as batched suffix passes — one row per variant, over positions start…T-1
     and layers first…L-1 only, the clean prefix shared by all rows without copies (`SharedPrefixCache`), the
     stream entering the first layer from the clean pass, each variant's interventions applied through a
     `Context` restricted to its row (`RowContext`, `mmscope.experiments.rows`). Rows of one pass start at the
     pass's first layer, the earliest of its rows: a planner groups rows whose first layers are close, weighing
     the compute a row spends on layers it did not need against the fixed cost of one more pass
     (`layer_overhead`), in batches that fit a memory budget;
  4. runs the variants that no suffix can serve (position 0) as full forwards, one each — from their first
     layer on, the earlier ones skipped — and those that claim nothing as plain full forwards.

Where a suffix may start: at a position p only if no earlier position attends to p or beyond in any layer
(read off the masks of the clean pass, so prefix-LM families whose prompt attends bidirectionally are caught),
and, in families that add image features inside the decoder (`Adapter.image_in_input_embeddings`), only after
the last image token. Models whose cache cannot be shared (sliding-window or linear-attention layers) or whose
decoder is not handed input embeddings and position ids run every variant as a full forward, with a warning.

`engine="naive"` is the straightforward reference: one full `Model.run` per variant, one for the clean run and,
with a source, one `Model.cache` of it. Both engines agree to float rounding (the suffix computes in other
matrix shapes; ≤1e-6 in probability in float32).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from mmscope.context import VISION_SITES, ActivationCache, Context
from mmscope.errors import InputError, known
from mmscope.experiments.options import ENGINES
from mmscope.experiments.rows import row_contexts
from mmscope.experiments.shared_prefix import SharedPrefixCache, shareable, shared_prefix_attention_in
from mmscope.interventions import Intervention
from mmscope.layout import Example
from mmscope.model import Model

LAYER_OVERHEAD = {"cpu": 32, "cuda": 1024}  # positions' worth of compute one more pass costs per layer
DEFAULT_OVERHEAD = 256


@dataclass(frozen=True)
class Variant:
    """One variant of a sweep: an opaque `key` (e.g. `("image->last", 12)`) and the interventions it applies."""

    key: tuple
    interventions: tuple[Intervention, ...]

    @property
    def groups(self) -> frozenset[str]:
        """The token groups its interventions name: it runs only on an example that holds them all."""
        return frozenset().union(*(intervention.groups() for intervention in self.interventions))

    def source_sites(self) -> frozenset[tuple[str, int]]:
        """The `(site, layer)` activations of a source run its interventions read."""
        return frozenset().union(*(intervention.source_sites() for intervention in self.interventions))


@dataclass
class CleanPass:
    """The clean pass of one example and, from the prefix engine, what its suffix passes reuse."""

    probs: torch.Tensor  # [V] next-token probabilities at the last prompt position, float32
    cache: DynamicCache | None = None  # every layer's keys and values, [1, kv_heads, T, head_dim]
    embeds: torch.Tensor | None = None  # the decoder's input embeddings (image features in place), [1, T, D]
    position_ids: torch.Tensor | None = None  # the decoder's position ids, [..., 1, T]
    suffix_starts: torch.Tensor | None = None  # [T] bool: a suffix pass may start at this position
    states: list[torch.Tensor] | None = None  # per layer, the stream entering it, then the last one's output, [1, T, D]
    activations: ActivationCache | None = None  # a source run's: the activations its patches read
    source: CleanPass | None = None  # the source example's clean pass (clean → corrupted patching)

    @property
    def shared(self) -> bool:
        """Whether suffix passes can reuse this pass (else every variant runs as a full forward)."""
        return self.cache is not None


@dataclass(frozen=True)
class SuffixBatch:
    """Variants (indices into the sweep) that run together over positions `start`…, each row from its own first
    layer (`first_layers`; the pass runs from the earliest). Start 0: one variant, a full forward; first layer
    `n_layers`: nothing to compute (the clean probabilities). `from_source`: the prefix's keys and values are
    the source run's, and `omitted[row]` is the intervention of that row the prefix stands for."""

    start: int
    variants: tuple[int, ...]
    first_layers: tuple[int, ...] = ()
    from_source: bool = False
    omitted: tuple[int | None, ...] = ()

    @property
    def first_layer(self) -> int:
        """The first layer the pass computes."""
        return min(self.first_layers, default=0)


def run_variants(
    model: Model,
    example: Example,
    variants: Sequence[Variant],
    *,
    source: Example | None = None,
    engine: str = "prefix",
    memory_budget_mb: float | None = None,
    layer_overhead: float | None = None,
    progress: bool = False,
) -> tuple[CleanPass, torch.Tensor]:
    """For ONE example (batch of 1): the clean run and next-token probs `[n_variants, V]` at the last prompt
    position under each variant (float32). `source`: the example patches read from (`ctx.source`; its clean
    run is `clean.source`). `engine="naive"`: one full `model.run` per variant.

    `memory_budget_mb` bounds what one suffix pass holds (default: about what one full batch-1 forward does);
    `layer_overhead` is the fixed cost of one more pass, per layer, in positions' worth of compute (default by
    device: `LAYER_OVERHEAD`) — it sets how the planner groups rows of different first layers.
    """
    check_sweep("run_variants", example, engine, memory_budget_mb, layer_overhead)
    if source is not None and len(source) != 1:
        raise InputError(f"the source is one example (a batch of 1); got a batch of {len(source)}")
    variants = list(variants)
    needed = frozenset().union(*(variant.source_sites() for variant in variants))
    if needed and source is None:
        raise InputError("these variants patch from a source run (CachedPatch): pass source=<the clean example>")
    bar = tqdm(total=len(variants), desc="variants", unit="variant", disable=not progress, leave=False)
    if engine == "naive":
        clean = CleanPass(model.next_token_probs(example))
        cache = None
        if source is not None:
            vision = {pair for pair in needed if pair[0] in VISION_SITES}
            cache = model.cache(source, sorted({site for site, _ in needed}),
                                sorted({layer for _, layer in needed - vision}),
                                vision_layers=sorted({layer for site, layer in vision if site != "projector"}))
            clean.source = CleanPass(cache.probs, activations=cache)
        probs = []
        for variant in variants:
            probs.append(model.next_token_probs(example, variant.interventions, source=cache))
            bar.update()
        bar.close()
        return clean, torch.stack(probs) if probs else clean.probs.new_empty(0, len(clean.probs))
    clean = clean_pass(model, example)
    if source is not None:
        clean.source = clean_pass(model, source, keep=needed, streams=False)
    probs = clean.probs.new_empty(len(variants), len(clean.probs))
    cache = clean.source.activations if clean.source is not None else None
    for batch in plan(model, example, clean, variants, memory_budget_mb, layer_overhead):
        if batch.first_layer >= model.n_layers:  # nothing changes where the answer is read
            probs[list(batch.variants)] = clean.probs
        elif batch.start == 0 and batch.first_layer == 0:
            for index in batch.variants:
                probs[index] = model.next_token_probs(example, variants[index].interventions, source=cache)
        else:
            chosen = [variants[index] for index in batch.variants]
            probs[list(batch.variants)] = suffix_pass(model, example, clean, batch, chosen)
        bar.update(len(batch.variants))
    bar.close()
    return clean, probs


def check_sweep(name: str, example: Example, engine: str, memory_budget_mb: float | None,
                layer_overhead: float | None) -> None:
    """Refuse what a sweep of one example cannot take, naming the argument."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; known: {known(ENGINES)}")
    if len(example) != 1:
        raise InputError(f"{name} takes one example (a batch of 1); got a batch of {len(example)}")
    if memory_budget_mb is not None and not memory_budget_mb > 0:
        raise InputError(f"memory_budget_mb must be positive; got {memory_budget_mb}")
    if layer_overhead is not None and not layer_overhead >= 0:
        raise InputError(f"layer_overhead must be at least 0; got {layer_overhead}")


def variant_features(
    model: Model,
    example: Example,
    variants: Sequence[Variant],
    groups: Sequence[str],
    *,
    engine: str = "prefix",
    memory_budget_mb: float | None = None,
    layer_overhead: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For ONE example (batch of 1): the residual stream pooled over each token group of `groups` (the mean over
    its positions) at every depth — the decoder's input embeddings, then after each layer: the probes'
    features (`mmscope.probes.layer_features`) — in the clean run, `{group: [L + 1, D]}`, and under each
    variant, `{group: [n_variants, L + 1, D]}`, float32.

    The prefix engine reads them from the passes `run_variants` runs: a variant's depths up to its first layer,
    and its positions before its suffix's start, are the clean pass's (the very values: a depth no variant
    reaches equals the clean features exactly); the rest comes from its row of the suffix pass. A variant that
    no suffix can serve runs as a full forward. `engine="naive"`: one full `model.hidden_states` per variant.
    """
    check_sweep("variant_features", example, engine, memory_budget_mb, layer_overhead)
    variants = list(variants)
    if any(variant.source_sites() for variant in variants):
        raise InputError("variant_features reads no source run: these variants patch from one (CachedPatch)")
    if isinstance(groups, str) or not groups:
        raise InputError(f"groups must be a non-empty sequence of token group names; got {groups!r}")
    positions = {group: example.positions(group, 0) for group in groups}  # refuses an unknown group
    empty = [group for group, at in positions.items() if not len(at)]
    if empty:
        raise InputError(f"token group(s) {empty} hold no position in this example: nothing to pool")

    def pool(states: torch.Tensor) -> dict[str, torch.Tensor]:  # [L + 1, T, D] → {group: [L + 1, D]}
        return {group: states[:, at].sum(1) / len(at) for group, at in positions.items()}

    bar = tqdm(total=len(variants), desc="variants", unit="variant", disable=not progress, leave=False)
    if engine == "naive":
        clean = pool(model.hidden_states(example)[:, 0])
        edited = []
        for variant in variants:
            edited.append(pool(model.hidden_states(example, variant.interventions)[:, 0]))
            bar.update()
        bar.close()
        return clean, {group: torch.stack([one[group] for one in edited]) if edited else
                       clean[group].new_empty(0, *clean[group].shape) for group in positions}
    run = clean_pass(model, example)
    if run.states is None or not run.shared:
        states = model.hidden_states(example)[:, 0]
    else:
        states = torch.stack([state[0].to(model.device).float() for state in run.states])  # [L + 1, T, D]
    clean = pool(states)
    features = {group: value.expand(len(variants), -1, -1).clone() for group, value in clean.items()}
    for batch in plan(model, example, run, variants, memory_budget_mb, layer_overhead):
        if batch.first_layer >= model.n_layers:  # nothing changes: the clean features
            pass
        elif batch.start == 0 and batch.first_layer == 0:
            for index in batch.variants:
                for group, value in pool(model.hidden_states(example, variants[index].interventions)[:, 0]).items():
                    features[group][index] = value
        else:
            chosen = [variants[index] for index in batch.variants]
            sums = suffix_pass(model, example, run, batch, chosen, readout=suffix_sums(model, positions, batch))
            for group, at in positions.items():
                if not (at >= batch.start).any():  # every position in the shared prefix: clean in every layer
                    continue
                prefix = states[:, at[at < batch.start]].sum(1)  # [L + 1, D]
                for row, index in enumerate(batch.variants):
                    own = batch.first_layers[row]  # depths own + 1 … L are the outputs of layers own … L − 1
                    features[group][index, own + 1 :] = (prefix[own + 1 :] + sums[group][row, own - batch.first_layer :]
                                                         ) / len(at)
        bar.update(len(batch.variants))
    bar.close()
    return clean, features


def suffix_sums(model: Model, positions: dict[str, torch.Tensor], batch: SuffixBatch) -> Callable[[Context], dict]:
    """A suffix pass's readout for `variant_features`: per group, each row's residual stream after each layer
    from the pass's first one, summed over the group's positions in the suffix, `{group: [rows, L − first, D]}`
    (float32)."""
    start, first = batch.start, batch.first_layer
    within = {group: at[at >= start] - start for group, at in positions.items()}

    def read(ctx: Context) -> dict[str, torch.Tensor]:
        sums: dict[str, list[torch.Tensor]] = {group: [] for group in within}
        for layer in range(first, model.n_layers):
            output = ctx.residual(layer)
            for group, at in within.items():
                sums[group].append(output[:, at.to(output.device)].float().sum(1).to(model.device))
        return {group: torch.stack(parts, 1) for group, parts in sums.items()}

    return read


def clean_pass(model: Model, example: Example, keep: frozenset[tuple[str, int]] = frozenset(),
               streams: bool = True) -> CleanPass:
    """One full forward that keeps every layer's keys and values and (with `streams`) input stream, the
    decoder's inputs, its masks' reach and the activations `keep` (`(site, layer)` pairs, for a source run)."""
    cache = DynamicCache(config=model.adapter.text_config)
    inputs = {**model.model_inputs(example), model.adapter.cache_keyword: cache, "use_cache": True}
    ctx = model.context(example)
    last = last_position(example)
    order = ("attention", "mlp", "residual")  # the order a layer computes its sites in

    def readout() -> tuple:
        # sites in forward order: the vision tower's (a source for vision patches), then the decoder's
        within = {"vision_attention": 0, "vision_mlp": 1, "vision_residual": 2, "projector": 3}
        vision = sorted((pair for pair in keep if pair[0] in VISION_SITES),
                        key=lambda pair: (pair[0] == "projector", pair[1], within[pair[0]]))
        kept = {pair: ctx.vision_site(*pair).clone() for pair in vision}
        kwargs = model.sites.decoder.inputs[1]
        reach = torch.full((example.seq_len,), -1, device=model.device)
        seen, states = [], []  # layers usually share one mask object: measure each once
        for layer in range(model.n_layers):
            if streams:
                states.append(model.sites.layer(layer).input)
            mask = ctx.attention_mask(layer)
            if not any(mask is other for other in seen):
                seen.append(mask)
                reach = torch.maximum(reach, latest_key(mask).to(reach.device))  # layers may sit on other devices
            for site in order:
                if (site, layer) in keep:
                    kept[site, layer] = ctx.site(site, layer).clone()
        if streams:  # and the stream after the last layer (read once: a second read of one output is refused)
            top = ("residual", model.n_layers - 1)
            states.append(kept[top] if top in kept else ctx.residual(model.n_layers - 1))
        return (kwargs.get("inputs_embeds"), kwargs.get("position_ids"), reach, states, kept,
                ctx.logits()[0, last].float())

    embeds, position_ids, reach, states, kept, logits = model.run_inputs(inputs, [], readout)
    probs = logits.softmax(-1)
    activations = ActivationCache(example, kept, probs)
    starts = torch.zeros(example.seq_len, dtype=torch.bool)
    positions = torch.arange(1, example.seq_len)
    starts[1:] = reach.cpu().cummax(0).values[:-1] < positions
    if not model.adapter.image_in_input_embeddings:
        starts[: max(example.layout.get("image", [0])) + 1] = False
    if not shareable(cache) or embeds is None or position_ids is None:
        warnings.warn(
            f"{model.name}: the prefix engine needs full attention in every layer and a decoder that takes input "
            "embeddings and position ids; every variant runs as a full forward",
            stacklevel=3,
        )
        return CleanPass(probs, suffix_starts=torch.zeros_like(starts), activations=activations)
    return CleanPass(probs, cache, embeds, position_ids, starts, states if streams else None, activations)


def latest_key(mask: torch.Tensor) -> torch.Tensor:
    """Per query of an additive mask `[B, h, T, T]`, the latest key position any row or head attends to, `[T]`."""
    attended = mask > torch.finfo(mask.dtype).min
    keys = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(attended, keys, -1).amax(-1).flatten(0, 1).amax(0)


@dataclass(frozen=True)
class LayerStart:
    """The engine's own edit of a suffix pass over positions `start`…: layers below the pass's first layer do
    nothing and the one before it hands on the clean stream entering it; a row whose own first layer is later
    gets the clean stream entering that layer there, so whatever it computed before is dropped."""

    first_layers: tuple[int, ...]  # per row
    streams: list[torch.Tensor]  # per layer, the clean stream entering it, [1, T, D]
    start: int

    def stream(self, layer: int, rows: int) -> torch.Tensor:
        return self.streams[layer][:, self.start :].expand(rows, -1, -1).contiguous()

    def apply(self, ctx: Context) -> None:
        first = min(self.first_layers)
        if first > 0:
            for below in range(first - 1):
                ctx.skip(below)
            ctx.skip(first - 1, self.stream(first, len(self.first_layers)))
        for layer in sorted(set(self.first_layers) - {first}):
            rows = [row for row, own in enumerate(self.first_layers) if own == layer]
            residual = ctx.residual(layer - 1)
            residual[rows] = self.stream(layer, len(rows)).to(residual.device)


def suffix_pass(model: Model, example: Example, clean: CleanPass, batch: SuffixBatch,
                variants: Sequence[Variant], readout: Callable[[Context], object] | None = None):
    """Next-token probs `[n, V]`: one row per variant over positions `batch.start`…T-1 and layers from each
    row's first layer, the clean prefix (or the source's) shared and the stream entering a row's first layer
    taken from the clean pass. `readout(ctx)`: what to return instead, read through the pass's unrestricted
    context (its positions start at `batch.start`)."""
    rows, start = len(variants), batch.start
    if start == 0:  # one row, the full forward's own inputs (what a family builds from them, e.g. a prefix-LM
        if rows != 1:  # mask, stays its own); only the layers before its first are skipped
            raise InputError(f"a pass from position 0 runs one variant; got {rows}")
        inputs = model.model_inputs(example)
    else:
        positions = clean.position_ids[..., start:]
        inputs = {
            "inputs_embeds": clean.embeds[:, start:].expand(rows, -1, -1).contiguous(),
            "attention_mask": example.inputs["attention_mask"].to(model.device).expand(rows, -1),
            "position_ids": positions.expand(*positions.shape[:-2], rows, positions.shape[-1]),
            model.adapter.cache_keyword: SharedPrefixCache((clean.source if batch.from_source else clean).cache, start),
            "use_cache": True,
        }
    source = clean.source.activations if clean.source is not None else None
    contexts = row_contexts(model.sites, example, rows, start, source)
    whole = model.context(example)  # unrestricted: its logits are every variant row's
    omitted = batch.omitted or (None,) * rows
    applied = [(LayerStart(batch.first_layers, clean.states, start), whole)] if max(batch.first_layers) > 0 else []
    applied += [
        (intervention, contexts[row])
        for row, variant in enumerate(variants)
        for which, intervention in enumerate(variant.interventions)
        if which != omitted[row]
    ]
    last = last_position(example) - start
    attention = shared_prefix_attention_in(model.adapter.text_config) if start > 0 else nullcontext()
    with attention:
        if readout is not None:
            return model.run_inputs(inputs, applied, lambda: readout(whole))
        logits = model.run_inputs(inputs, applied, lambda: whole.logits()[:, last].float())
    return logits.softmax(-1)


def plan(model: Model, example: Example, clean: CleanPass, variants: Sequence[Variant],
         memory_budget_mb: float | None = None, layer_overhead: float | None = None) -> list[SuffixBatch]:
    """Group variants by the position their suffix starts from and the layers they run, in batches that fit
    `memory_budget_mb`.

    A variant starts at the latest position a suffix may start from (`clean.suffix_starts`) at or before the
    earliest `affected_from` of its interventions, and at their earliest `first_layer`. Where one of them claims
    a `source_prefix` whose start is later — and the others touch neither its prefix nor its layers — it starts
    there instead, from the layer after the claim's, on the source's keys and values. Variants that claim
    neither start at 0 and run as full forwards. Among variants of one start, sorted by first layer,
    `partition` chooses the batches.
    """
    n_layers, last, length = model.n_layers, last_position(example), example.seq_len
    agree = agree_before(clean, clean.source) if clean.source is not None else 0
    groups: dict[tuple[int, bool], list[tuple[int, int, int | None]]] = {}
    batches = []
    for index, variant in enumerate(variants):
        interventions = variant.interventions
        claims = [intervention.affected_from(example) for intervention in interventions]
        layers = [intervention.first_layer() for intervention in interventions]
        first = min(max(min(layers, default=n_layers), 0), n_layers)
        start, from_source, omitted = latest_start(clean, min(claims, default=last), last), False, None
        by_source = clean.source is not None and model.adapter.image_in_input_embeddings  # else the decoder adds
        for which, intervention in enumerate(interventions if by_source else ()):  # each run's own features
            found = intervention.source_prefix(example, clean.source.activations.example, agree)
            if found is None:
                continue
            prefix, layer = found
            others = [*range(which), *range(which + 1, len(interventions))]
            later = latest_start(clean, min([prefix, *(claims[other] for other in others)]), last)
            if later > start and all(layers[other] > layer for other in others):
                start, from_source, omitted = later, True, which
                first = min([layer + 1, *(layers[other] for other in others), n_layers])
            break
        if not clean.shared or (start == 0 and not model.adapter.image_in_input_embeddings):
            start, first, from_source, omitted = 0, 0, False, None  # a pass over the image positions would lack
            # what the decoder adds there
        if first >= n_layers:
            batches.append(SuffixBatch(start, (index,), (n_layers,), from_source, (omitted,)))
        elif start == 0 or any(intervention.whole_batch for intervention in interventions):
            batches.append(SuffixBatch(start, (index,), (first,), from_source, (omitted,)))  # a forward of its own
        else:
            groups.setdefault((start, from_source), []).append((first, index, omitted))
    overhead = layer_overhead if layer_overhead is not None else LAYER_OVERHEAD.get(model.device.type,
                                                                                    DEFAULT_OVERHEAD)
    for (start, from_source), members in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1])):
        members.sort()
        cap = rows_within(model, length - start, length, memory_budget_mb)
        cuts = partition([first for first, _, _ in members], length - start, cap, overhead, n_layers)
        for begin, end in zip(cuts, cuts[1:], strict=False):
            chosen = members[begin:end]
            batches.append(SuffixBatch(start, tuple(index for _, index, _ in chosen),
                                       tuple(first for first, _, _ in chosen), from_source,
                                       tuple(omitted for _, _, omitted in chosen)))
    return batches


def latest_start(clean: CleanPass, claim: int, last: int) -> int:
    """The latest position a suffix may start from at or before `claim` (and the last prompt position); 0: none."""
    allowed = torch.nonzero(clean.suffix_starts[: min(claim, last) + 1]).flatten()
    return int(allowed[-1]) if len(allowed) else 0


def agree_before(clean: CleanPass, source: CleanPass) -> int:
    """The first position where the two runs' decoder inputs (embeddings or position ids) differ: every earlier
    position computes the same in both, in every layer."""
    if not (clean.shared and source.shared) or clean.embeds.shape != source.embeds.shape or \
            clean.position_ids.shape != source.position_ids.shape:
        return 0
    differ = (clean.embeds[0] != source.embeds[0]).any(-1)
    differ |= (clean.position_ids != source.position_ids).flatten(0, -2).any(0)
    found = torch.nonzero(differ).flatten()
    return int(found[0]) if len(found) else len(differ)


def partition(first_layers: Sequence[int], queries: int, cap: int, overhead: float, n_layers: int) -> list[int]:
    """Cut rows sorted by first layer into batches of at most `cap` rows at the least estimated cost; returns the
    cut points (0, …, n).

    A batch runs every row from its earliest first layer: it costs, per layer it runs, `overhead` (the fixed
    cost of a pass) plus one unit per row and query position. Dynamic programming over the cuts, O(n · cap).
    """
    n = len(first_layers)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(max(0, end - cap), end):
            cost = best[begin] + (n_layers - first_layers[begin]) * (overhead + (end - begin) * queries)
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(cut[cuts[-1]])
    return cuts[::-1] if n else [0]


def row_bytes(model: Model, queries: int, keys: int) -> int:
    """An estimate of what one variant row of a suffix pass (`queries` positions over `keys`) holds at its peak:
    the suffix's keys and values in every layer; one layer's scores, weights (float32 and model dtype) and
    edited per-head mask; the MLP's and the residual's activations; and the logits (model dtype and float32)."""
    config = model.adapter.text_config
    size = model.hf.dtype.itemsize
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    cache = model.n_layers * 2 * queries * kv_heads * head_dim * size
    attention = config.num_attention_heads * queries * keys * (3 * size + 4)
    activations = queries * (3 * config.intermediate_size + 6 * config.hidden_size) * size
    logits = queries * config.vocab_size * (size + 4)
    return cache + attention + activations + logits


def rows_within(model: Model, queries: int, keys: int, memory_budget_mb: float | None = None) -> int:
    """How many variant rows of a suffix pass (`queries` positions over `keys`) fit `memory_budget_mb` (≥ 1);
    by default, what one full-length row holds — about one batch-1 forward."""
    budget = row_bytes(model, keys, keys) if memory_budget_mb is None else memory_budget_mb * 2**20
    return max(1, int(budget // row_bytes(model, queries, keys)))


def last_position(example: Example) -> int:
    """The last prompt position of a one-row example."""
    return example.layout["last"][0]

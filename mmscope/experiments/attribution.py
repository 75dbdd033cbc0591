"""Attribution patching: every activation patch's effect estimated from one forward and one backward pass.

Exact clean → corrupted activation patching runs one (suffix) forward per site × layer × position. Its
first-order estimate (Nanda 2023, "Attribution patching"; Syed et al. 2023; Kramár et al. 2024, AtP*) needs the
corrupted run's activations and the gradient of the metric there, and the clean run's activations:

    effect(site, layer, position) ≈ (a_clean − a_corrupted) · ∂metric/∂a |corrupted

summed over the hidden dimension — the change of the metric to first order when that position's activation is
replaced by the clean run's. The metric is p(token) at the last prompt position by default, as in the exact
experiments, or its log (`metric="logprob"`). Estimates are approximations: attention saturation and other
non-linearities make some of them wrong, so the estimate ranks candidates and the exact engine verifies the top
of the ranking (`CachedPatch` through `run_variants`).

The same holds for attention knockout at one layer: blocking target → source attention zeroes those weights
and renormalises each target row over what it still attends to; its first-order effect is the metric's
gradient with respect to the attention weights times that change of the weights (`knockout_attribution`).

The gradients come from nnsight's backward tracing (`with metric.backward(): activation.grad`), read in the
reverse of the forward order; the forward runs with gradients enabled, the model's weights untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nnsight
import torch
from scipy import stats

from mmscope.context import ActivationCache, Context, Group, check_site
from mmscope.errors import InputError, known
from mmscope.experiments.engine import Variant, run_variants
from mmscope.interventions import CachedPatch
from mmscope.interventions.masks import pair_mask
from mmscope.layout import Example
from mmscope.model import Model

METRICS = ("prob", "logprob")
ORDER = ("attention", "mlp", "residual")  # the order a layer computes its sites in


def traced_gradients(model: Model, example: Example, token: int, metric: str,
                     read: Callable[[Context], list[torch.Tensor]], name: str
                     ) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """One forward (gradients enabled) and one backward pass over a one-row `example`: the metric (p or log p of
    `token` at the last prompt position), and for each tensor `read(ctx)` returns (in forward order) its value and
    the metric's gradient with respect to it, batch row dropped, float32. `name` is the caller's, for errors."""
    if len(example) != 1:
        raise InputError(f"{name} takes one example (a batch of 1); got a batch of {len(example)}")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; known: {known(METRICS)}")
    ctx = model.context(example)
    last = example.layout["last"][0]
    with torch.enable_grad(), model.envoy.trace(**model.model_inputs(example)):
        found = read(ctx)
        values = nnsight.save([value.detach().clone() for value in found])
        scores = ctx.logits()[0, last].float().log_softmax(-1)[token]
        measured = scores if metric == "logprob" else scores.exp()
        kept = nnsight.save(measured.detach().clone())
        with measured.backward():
            grads = nnsight.save([found[index].grad for index in reversed(range(len(found)))])  # reverse order
    return float(kept), [value[0].float() for value in values], [grad[0].float() for grad in grads[::-1]]


def metric_gradients(model: Model, example: Example, sites: Sequence[str], layers: Sequence[int], token: int,
                     metric: str = "prob") -> tuple[float, dict[tuple[str, int], torch.Tensor],
                                                    dict[tuple[str, int], torch.Tensor]]:
    """The metric, and per `(site, layer)` the activation `[T, D]` and the metric's gradient with respect to it
    `[T, D]` (`traced_gradients`)."""
    for site in sites:
        check_site(site)
    pairs = [(site, layer) for layer in sorted(set(layers)) for site in ORDER if site in sites]
    for _, layer in pairs:
        model.sites.layer(layer)  # refuses a layer the model lacks
    measured, values, grads = traced_gradients(
        model, example, token, metric, lambda ctx: [ctx.site(site, layer) for site, layer in pairs],
        "metric_gradients")
    return measured, dict(zip(pairs, values, strict=True)), dict(zip(pairs, grads, strict=True))


def weight_gradients(model: Model, example: Example, layers: Sequence[int], token: int, metric: str = "prob"
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Under eager attention, per layer the self-attention weights `[H, T, T]` and the metric's gradient with
    respect to them (`traced_gradients`)."""
    layers = sorted(set(layers))
    for layer in layers:
        model.sites.layer(layer)  # refuses a layer the model lacks
    _, values, grads = traced_gradients(  # attention_weights refuses a layer that gives none
        model, example, token, metric, lambda ctx: [ctx.attention_weights(layer) for layer in layers],
        "weight_gradients")
    return {layer: (value, grad) for layer, value, grad in zip(layers, values, grads, strict=True)}


def renormalised_change(weights: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """How blocking the `blocked` `[T, T]` edges changes attention weights `[H, T, T]`: blocked weights drop to
    0, and each row's other weights grow by the share it lost (`w / (1 − w_blocked)` − `w`)."""
    lost = (weights * blocked).sum(-1, keepdim=True)  # [H, T, 1]
    kept = (1 - lost).clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.where(blocked, -weights, weights * lost / kept)


def knockout_attribution(model: Model, example: Example, source: Group, target: Group, layers: Sequence[int],
                         token: int, metric: str = "prob", keep_self: bool = True) -> torch.Tensor:
    """The first-order estimate of blocking `target` → `source` attention at each single layer of `layers`
    (the change of the metric: its gradient with respect to the attention weights times the weights' change,
    `renormalised_change`, summed over heads and edges), `[len(layers)]` in `layers`' sorted order."""
    blocked = pair_mask(example, target, source, keep_self)[0]  # [T, T]
    estimates = []
    for _, (weights, grads) in sorted(weight_gradients(model, example, layers, token, metric).items()):
        change = renormalised_change(weights, blocked.to(weights.device))
        estimates.append((grads * change).sum())
    return torch.stack(estimates).cpu()


def patch_attribution(model: Model, corrupted: Example, source: ActivationCache, sites: Sequence[str],
                      layers: Sequence[int], token: int, metric: str = "prob") -> dict[str, torch.Tensor]:
    """The first-order estimate of patching each `(site, layer, position)` of the `source` run (the clean one,
    `model.cache`) into the `corrupted` run: `{site: [len(layers), T]}`, rows in `layers`' sorted order. The two
    examples must have the same length (the same prompt over two images of one geometry)."""
    if source.example.seq_len != corrupted.seq_len:
        raise InputError(f"the source example has {source.example.seq_len} positions and the corrupted one "
                         f"{corrupted.seq_len}: attribution patches position by position, so they must match")
    layers = sorted(set(layers))
    _, activations, gradients = metric_gradients(model, corrupted, sites, layers, token, metric)
    estimates = {}
    for site in (name for name in ORDER if name in sites):
        rows = []
        for layer in layers:
            difference = source.site(site, layer)[0].float().to(activations[site, layer].device) - \
                activations[site, layer]
            rows.append((difference * gradients[site, layer]).sum(-1))
        estimates[site] = torch.stack(rows).cpu()
    return estimates


@dataclass
class Verified:
    """Estimated patches, some verified exactly: `cells` `(layer, position)` in the estimate's order (largest
    |estimate| first), their `estimates`, and `exact` effects (NaN where not verified); `top` and `sampled` index
    the cells verified as the K largest estimates and as a seeded random sample of the rest."""

    cells: list[tuple[int, int]]
    estimates: torch.Tensor
    exact: torch.Tensor
    top: list[int]
    sampled: list[int]

    def agreement(self, which: str = "top") -> tuple[float, float]:
        """Spearman's rank correlation between estimate and exact effect over the `which` ("top", "sampled" or
        "verified": both) cells, and the recall of the estimate's top K among the K largest |exact| effects of
        the verified cells (K = len(top))."""
        chosen = {"top": self.top, "sampled": self.sampled, "verified": self.top + self.sampled}[which]
        rho = float(stats.spearmanr(self.estimates[chosen].numpy(), self.exact[chosen].numpy()).statistic) \
            if len(chosen) > 2 else float("nan")
        verified = self.top + self.sampled
        largest = sorted(verified, key=lambda index: -abs(float(self.exact[index])))[: len(self.top)]
        recall = len(set(largest) & set(self.top)) / len(self.top) if self.top else float("nan")
        return rho, recall


def verify_patches(model: Model, clean: Example, corrupted: Example, site: str, token: int, *, top: int = 20,
                   sampled: int = 20, seed: int = 0, metric: str = "prob") -> Verified:
    """Estimate every `(layer, position)` patch of `site` from `clean` into `corrupted` (`patch_attribution`),
    then run exactly, through the sweep engine, the `top` largest |estimates| and a seeded random sample of
    `sampled` of the rest: how far to trust the estimate on this model."""
    if top < 1 or sampled < 0:
        raise InputError(f"top must be at least 1 and sampled at least 0; got top={top}, sampled={sampled}")
    cache = model.cache(clean, [site])
    grid = patch_attribution(model, corrupted, cache, [site], range(model.n_layers), token, metric)[site]
    order = grid.flatten().abs().argsort(descending=True, stable=True)
    cells = [divmod(int(index), grid.shape[1]) for index in order]
    estimates = grid.flatten()[order]
    chosen = list(range(min(top, len(cells))))
    rest = torch.randperm(len(cells) - len(chosen), generator=torch.Generator().manual_seed(seed))
    drawn = sorted(int(index) + len(chosen) for index in rest[:sampled])
    variants = [Variant(cells[index], (CachedPatch(site, (cells[index][0],), (cells[index][1],)),))
                for index in chosen + drawn]
    base, probs = run_variants(model, corrupted, variants, source=clean)
    score = (lambda p: p.log()) if metric == "logprob" else (lambda p: p)
    exact = torch.full((len(cells),), float("nan"))
    exact[chosen + drawn] = (score(probs[:, token].double()) - score(base.probs[token].double())).float().cpu()
    return Verified(cells, estimates, exact, chosen, drawn)

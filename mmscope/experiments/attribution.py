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

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nnsight
import numpy as np
import pandas as pd
import torch
from scipy import stats

from mmscope.context import ActivationCache, Context, Group, check_site
from mmscope.errors import InputError, known
from mmscope.experiments.declarations import METRICS  # declared without torch, for the options
from mmscope.experiments.engine import Variant, run_variants
from mmscope.interventions import CachedPatch
from mmscope.interventions.masks import pair_mask
from mmscope.layout import Example
from mmscope.model import Model

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
    gradients = weight_gradients(model, example, layers, token, metric)
    return knockout_estimates(example, gradients, target, [source], keep_self)[:, 0]


def knockout_estimates(example: Example, gradients: dict[int, tuple[torch.Tensor, torch.Tensor]], target: Group,
                       sources: Sequence[Group], keep_self: bool = True) -> torch.Tensor:
    """`[n_layers, len(sources)]`: per layer of `gradients` (`weight_gradients`: the attention weights and the
    metric's gradient, sorted by layer) and per source, the first-order effect of blocking `target` → source
    attention at that layer alone. Only the target's rows change, so only they are read."""
    rows = example.positions(target, 0)
    masks = [pair_mask(example, target, source, keep_self)[0][rows] for source in sources]  # [R, T] each
    estimates = torch.zeros(len(gradients), len(sources))
    for i, (_, (weights, grads)) in enumerate(sorted(gradients.items())):
        weights, grads = weights[:, rows.to(weights.device)], grads[:, rows.to(grads.device)]  # [H, R, T]
        for j, blocked in enumerate(masks):
            estimates[i, j] = (grads * renormalised_change(weights, blocked.to(weights.device))).sum().cpu()
    return estimates


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


VERIFIED = ("top", "random")  # how a verified candidate was chosen: among the largest |estimates|, or by chance


def choose_verified(estimates: torch.Tensor, top: int, sampled: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Which candidates to run exactly: the indices of the `top` largest |estimates| (largest first), and a seeded
    random sample of `sampled` of the rest (ascending)."""
    if top < 0 or sampled < 0:
        raise InputError(f"the candidates verified must be at least 0; got top={top}, sampled={sampled}")
    order = estimates.flatten().abs().argsort(descending=True, stable=True)
    chosen = [int(index) for index in order[:top]]
    rest = order[len(chosen):]
    drawn = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:sampled]
    return chosen, sorted(int(rest[index]) for index in drawn)


def rank_agreement(estimates: Sequence[float], exact: Sequence[float], top: Sequence[int],
                   compared: Sequence[int]) -> tuple[float, float]:
    """Spearman's rank correlation between estimate and exact effect over the `compared` candidates (NaN below
    3), and the recall of the estimate's `top` among the len(top) largest |exact| effects of the `compared` and
    `top` candidates together (NaN without a top)."""
    estimates, exact = np.asarray(estimates, dtype=float), np.asarray(exact, dtype=float)
    compared = list(compared)
    rho = float(stats.spearmanr(estimates[compared], exact[compared]).statistic) if len(compared) > 2 \
        else float("nan")
    pool = list(dict.fromkeys([*top, *compared]))
    largest = sorted(pool, key=lambda index: -abs(exact[index]))[: len(top)]
    recall = len(set(largest) & set(top)) / len(top) if len(top) else float("nan")
    return rho, recall


@dataclass
class Verified:
    """Estimated patches, some verified exactly: `cells` `(layer, position)`, their `estimates`, and `exact`
    effects (NaN where not verified); `top` and `sampled` index the cells verified as the K largest |estimates|
    (largest first) and as a seeded random sample of the rest (`choose_verified`)."""

    cells: list[tuple[int, int]]
    estimates: torch.Tensor
    exact: torch.Tensor
    top: list[int]
    sampled: list[int]

    def agreement(self, which: str = "top") -> tuple[float, float]:
        """Spearman's rank correlation between estimate and exact effect over the `which` ("top", "sampled" or
        "verified": both) cells, and the recall of the estimate's top K among the K largest |exact| effects of
        the verified cells (K = len(top)) (`rank_agreement`)."""
        chosen = {"top": self.top, "sampled": self.sampled, "verified": self.top + self.sampled}[which]
        estimates, exact = self.estimates.numpy(), self.exact.numpy()
        rho = rank_agreement(estimates, exact, self.top, chosen)[0]
        return rho, rank_agreement(estimates, exact, self.top, self.sampled)[1]


@dataclass(frozen=True)
class Verification:
    """Estimated candidates, the chosen ones run exactly (`verify_estimates`): per candidate its `columns`
    (`verified_columns`: estimate, exact, verified) and `p` of the token under it (NaN where not run); `p_example`
    of the example itself, and `p_source` of the source run (patches; None without one); `top` and `drawn` index
    the candidates run (`choose_verified`)."""

    columns: list[dict]
    p: list[float]
    p_example: float
    p_source: float | None
    top: list[int]
    drawn: list[int]


def verify_estimates(model: Model, example: Example, variant_of: Callable[[int], Variant], estimates: torch.Tensor,
                     token: int, *, top: int, sampled: int, seed: int = 0, metric: str = "prob",
                     source: Example | None = None, engine: str = "prefix") -> Verification:
    """Estimate, then verify: run exactly, through the sweep engine, the `top` largest |estimates| and a seeded
    random sample of `sampled` of the rest (`choose_verified`), candidate `i` being the variant `variant_of(i)`
    of `example` (patches read `source`); the exact change of the metric of `token` under each."""
    chosen, drawn = choose_verified(estimates, top, sampled, seed)
    run, probs = run_variants(model, example, [variant_of(i) for i in chosen + drawn], source=source, engine=engine)
    exact = exact_change(run.probs[token], probs[:, token], metric)
    p = torch.full((estimates.numel(),), float("nan"), dtype=torch.float64)
    if chosen or drawn:
        p[chosen + drawn] = probs[:, token].double().cpu()
    return Verification(verified_columns(estimates, chosen, drawn, exact), p.tolist(), run.probs[token].item(),
                        run.source.probs[token].item() if source is not None else None, chosen, drawn)


def verify_patches(model: Model, clean: Example, corrupted: Example, site: str, token: int, *, top: int = 20,
                   sampled: int = 20, seed: int = 0, metric: str = "prob") -> Verified:
    """Estimate every `(layer, position)` patch of `site` from `clean` into `corrupted` (`patch_attribution`),
    then run exactly, through the sweep engine, the `top` largest |estimates| and a seeded random sample of
    `sampled` of the rest: how far to trust the estimate on this model."""
    if top < 1 or sampled < 0:
        raise InputError(f"top must be at least 1 and sampled at least 0; got top={top}, sampled={sampled}")
    cache = model.cache(clean, [site])
    grid = patch_attribution(model, corrupted, cache, [site], range(model.n_layers), token, metric)[site]
    cells = [divmod(index, grid.shape[1]) for index in range(grid.numel())]

    def patch(index: int) -> Variant:
        layer, position = cells[index]
        return Variant(cells[index], (CachedPatch(site, (layer,), (position,)),))

    found = verify_estimates(model, corrupted, patch, grid.flatten(), token, top=top, sampled=sampled, seed=seed,
                             metric=metric, source=clean)
    exact = torch.tensor([column["exact"] for column in found.columns], dtype=torch.float32)
    return Verified(cells, grid.flatten(), exact, found.top, found.drawn)


def exact_change(before: torch.Tensor, after: torch.Tensor, metric: str = "prob") -> torch.Tensor:
    """The metric's exact change from probability `before` to probabilities `after` (float64)."""
    before, after = before.double(), after.double()
    return after.log() - before.log() if metric == "logprob" else after - before


def verified_columns(estimates: torch.Tensor, top: Sequence[int], drawn: Sequence[int], exact: torch.Tensor
                     ) -> list[dict]:
    """Estimate, then verify: per candidate (in `estimates`' order) its `estimate`, its `exact` effect where
    verified (NaN elsewhere) and `verified` — "top" (among the largest |estimates|), "random" (drawn from the
    rest) or "" (not run); `top` and `drawn` from `choose_verified`, `exact` their effects in that order."""
    values = torch.full((estimates.numel(),), float("nan"), dtype=torch.float64)
    if len(top) + len(drawn):
        values[[*top, *drawn]] = exact.double().cpu()
    how = {index: "top" for index in top} | {index: "random" for index in drawn}
    return [{"estimate": float(estimate), "exact": float(value), "verified": how.get(index, "")}
            for index, (estimate, value) in enumerate(zip(estimates.flatten().tolist(), values.tolist(), strict=True))]


AGREEMENT = ("questions", "top", "random", "spearman_top", "spearman_random", "median_spearman_top",
             "median_spearman_random", "recall_top")


def agreement_table(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """How far the estimate holds on this run, per `by` group (e.g. kind × target): over the verified rows of
    every question (`example`), Spearman's rank correlation between `estimate` and `exact` for the top and the
    random candidates (pooled over the questions, and the median of the per-question ones), and the mean
    per-question recall of the top K among the K largest |exact| effects of the verified ones (`rank_agreement`).
    `top` and `random` count the verified rows."""
    rows = []
    verified = table[table["verified"].isin(VERIFIED)]
    for key, group in verified.groupby(list(by), sort=False) if by else [((), verified)]:
        per_question = []
        for _, question in group.groupby("example", sort=True):
            estimates, exact = question["estimate"].to_numpy(float), question["exact"].to_numpy(float)
            where = question["verified"].to_numpy()
            top, drawn = np.flatnonzero(where == "top"), np.flatnonzero(where == "random")
            per_question.append((rank_agreement(estimates, exact, top, top)[0],
                                 rank_agreement(estimates, exact, top, drawn)))
        pooled = {which: group[group["verified"] == which] for which in VERIFIED}
        rho = {which: float(stats.spearmanr(part["estimate"], part["exact"]).statistic) if len(part) > 2 else
               float("nan") for which, part in pooled.items()}
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the median of no finite value is NaN, as said
            rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                         "questions": len(per_question), "top": len(pooled["top"]), "random": len(pooled["random"]),
                         "spearman_top": rho["top"], "spearman_random": rho["random"],
                         "median_spearman_top": float(np.nanmedian([q[0] for q in per_question])),
                         "median_spearman_random": float(np.nanmedian([q[1][0] for q in per_question])),
                         "recall_top": float(np.nanmean([q[1][1] for q in per_question]))})
    return pd.DataFrame(rows, columns=[*by, *AGREEMENT])


def agreement_lines(table: pd.DataFrame, by: Sequence[str], what: str) -> list[str]:
    """The report's lines on the estimate's agreement with the exact effects, per `by` group (`what` names the
    estimated effect)."""
    lines = ["", f"{what}: the first-order estimate against the exact effect of the verified candidates"]
    for _, row in agreement_table(table, by).iterrows():
        name = " · ".join(str(row[column]) for column in by) or "all"
        lines.append(f"  {name}: {int(row['questions'])} questions; {int(row['top'])} candidates among their questions' "
                     f"largest |estimates|: Spearman {row['spearman_top']:+.2f} (median per question "
                     f"{row['median_spearman_top']:+.2f}), recall of the largest exact effects "
                     f"{row['recall_top']:.2f}; {int(row['random'])} random others: Spearman "
                     f"{row['spearman_random']:+.2f} (median {row['median_spearman_random']:+.2f})")
    return lines


def agreement_scalars(table: pd.DataFrame, by: Sequence[str]) -> dict[str, float]:
    """The agreement numbers for the W&B run summary: `agreement/<group>/<number>`."""
    scalars = {}
    for _, row in agreement_table(table, by).iterrows():
        name = "/".join(str(row[column]) for column in by)
        scalars |= {"/".join(filter(None, ["agreement", name, column])): float(row[column]) for column in AGREEMENT}
    return scalars

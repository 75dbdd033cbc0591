"""Benchmark: attribution patching of every residual patch (position × layer) against the exact engine on the same
grid, on LLaVA-1.5 geometry; and how well the estimate ranks the exact effects on the embedded model.

The estimate (`mmscope.experiments.attribution.patch_attribution`) costs the clean run's cache, one forward and
one backward of the corrupted run. The exact grid is one `CachedPatch` per position × layer through the prefix
engine (`run_variants` with the clean run as source). On LLaVA-1.5 geometry (576 image tokens, 32 layers: ~20k
patches) the exact grid is timed on an evenly spaced `--exact-sample` of its patches and scaled to all of them
(said so in its line), as `map_sweep.py` does. On the embedded model the whole exact grid runs, and the benchmark
prints the Spearman rank correlation between estimate and exact effect over every cell, and the top-20 recall
(how many of the 20 largest |exact| effects are among the 20 largest |estimates|), per question pair (a
question, and the same question about another scene that halves p of the answer at least); the
correlation over the cells the corruption reaches (the prompt's text before the image is the same in both runs,
so both are exactly 0 there).

    python benchmarks/attribution.py --exact-sample 256

It also compares the single-layer knockout estimate (`knockout_attribution`: the study's six flows × every
layer) with the exact knockouts, per question (Spearman over the 48 cells, top-5 recall).

Last line: `atp_speedup <x> spearman <r>` (r: residual patching's median over the embedded model's pairs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from knockout_sweep import QUESTIONS, add_model_arguments, model_from, random_image
from scipy import stats

import mmscope
from mmscope.experiments.attribution import knockout_attribution, patch_attribution
from mmscope.experiments.declarations import STUDY_FLOWS
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.scores import Flow
from mmscope.interventions import CachedPatch


def grid(model: mmscope.Model, length: int) -> list[Variant]:
    """One residual patch per layer × position."""
    return [Variant((layer, position), (CachedPatch("residual", (layer,), (position,)),))
            for layer in range(model.n_layers) for position in range(length)]


def estimate(model: mmscope.Model, clean, corrupted, token: int) -> tuple[float, torch.Tensor]:
    """Seconds for the clean cache plus the estimate, and the estimate `[L, T]`."""
    begin = time.perf_counter()
    cache = model.cache(clean, ["residual"])
    found = patch_attribution(model, corrupted, cache, ["residual"], range(model.n_layers), token)["residual"]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin, found


def exact(model: mmscope.Model, clean, corrupted, token: int, chosen: list[int] | None = None
          ) -> tuple[float, torch.Tensor]:
    """Seconds for the exact patches (`chosen` indices of the grid, or all), and their effects on p(token)."""
    variants = grid(model, corrupted.seq_len)
    if chosen is not None:
        variants = [variants[index] for index in chosen]
    begin = time.perf_counter()
    base, probs = run_variants(model, corrupted, variants, source=clean)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin, (probs[:, token] - base.probs[token]).cpu()


def speedup(args) -> float:
    """The estimate against the exact engine on one LLaVA-1.5-geometry pair (the exact grid timed on a sample)."""
    with tempfile.TemporaryDirectory() as folder:
        model = model_from(args, Path(folder))
    clean = model.prepare(random_image(), QUESTIONS[0])
    corrupted = model.prepare(random_image(), QUESTIONS[0])
    token = int(model.next_token_probs(clean).argmax())
    model.next_token_probs(corrupted)  # warm-up
    seconds, _ = estimate(model, clean, corrupted, token)
    cells = model.n_layers * corrupted.seq_len
    chosen = torch.linspace(0, cells - 1, min(args.exact_sample, cells)).round().long().tolist()
    sampled, _ = exact(model, clean, corrupted, token, chosen)
    scaled = sampled * cells / len(chosen)
    print(f"LLaVA-1.5 geometry: {model.n_layers} layers x width {model.adapter.text_config.hidden_size}, "
          f"{corrupted.seq_len} positions: {cells} residual patches")
    print(f"  estimate (clean cache + one forward and backward): {seconds:.2f} s; exact engine: {scaled:.1f} s "
          f"(timed {len(chosen)} of them, {sampled:.2f} s, scaled); speed-up {scaled / seconds:.0f}x")
    return scaled / seconds


def rank_agreement(found: torch.Tensor, effects: torch.Tensor, k: int) -> tuple[float, float]:
    """Spearman's correlation of estimates and exact effects, and how many of the `k` largest |exact| effects are
    among the `k` largest |estimates| (a share)."""
    rho = stats.spearmanr(found.numpy(), effects.numpy()).statistic
    top = set(effects.abs().topk(k).indices.tolist())
    return float(rho), len(top & set(found.abs().topk(k).indices.tolist())) / k


def corrupting_pairs(model: mmscope.Model, pairs: int, pool: int = 60) -> list[tuple]:
    """Question pairs of the embedded test split: a question, and the same question about another scene that
    moves p of the model's answer by at least half (else every patch's effect is about 0)."""
    samples = [mmscope.sample(index) for index in range(pool)]
    found = []
    for first in samples:
        clean = model.prepare(first.image, first.question)
        probs = model.next_token_probs(clean)
        token = int(probs.argmax())
        for second in samples:
            if second.image.tobytes() == first.image.tobytes():
                continue
            corrupted = model.prepare(second.image, first.question)
            if model.next_token_probs(corrupted)[token] < probs[token] / 2:
                found.append((first, second, clean, corrupted, token))
                break
        if len(found) == pairs:
            return found
    return found


def agreement(pairs: int) -> float:
    """Spearman and top-20 recall of the estimate against every exact cell on the embedded model's pairs."""
    model = mmscope.load("shapes-llava")
    correlations = []
    for first, second, clean, corrupted, token in corrupting_pairs(model, pairs):
        _, found = estimate(model, clean, corrupted, token)
        _, effects = exact(model, clean, corrupted, token)
        found = found.flatten()
        reached = (found != 0) | (effects != 0)  # cells where the two runs differ (not the shared text before
        rho = rank_agreement(found[reached], effects[reached], 20)[0]  # the image)
        recall = rank_agreement(found, effects, 20)[1]
        correlations.append(rho)
        print(f"  shapes-llava, {first.question!r} (image of question {first.question_id} → "
              f"{second.question_id}'s): {int(reached.sum())} of {len(effects)} cells reached, Spearman {rho:.3f}, "
              f"top-20 recall {recall:.2f}, largest |exact| {effects.abs().max():.3f}")
    return float(torch.tensor(correlations).median())


def knockout_agreement(questions: int) -> float:
    """Single-layer knockout of the study's flows: the estimate (`knockout_attribution`) against the exact
    knockout at every layer, per question of the embedded test split with an object box: Spearman over the
    flows × layers and top-5 recall."""
    model = mmscope.load("shapes-llava")
    correlations, index = [], 0
    while len(correlations) < questions:
        sample = mmscope.sample(index)
        index += 1
        if not sample.boxes:
            continue
        example = model.prepare(sample.image, sample.question, boxes=sample.boxes)
        probs = model.next_token_probs(example)
        token = int(probs.argmax())
        found, effects = [], []
        for flow in (Flow.parse(name) for name in STUDY_FLOWS):
            keep_self = flow.source != flow.target
            found += knockout_attribution(model, example, flow.source, flow.target, range(model.n_layers), token,
                                          keep_self=keep_self).tolist()
            variants = [Variant((flow.name, layer), (flow.knockout((layer,)),)) for layer in range(model.n_layers)]
            _, exact_probs = run_variants(model, example, variants)
            effects += (exact_probs[:, token] - probs[token]).tolist()
        found, effects = torch.tensor(found), torch.tensor(effects)
        rho, recall = rank_agreement(found, effects, 5)
        correlations.append(rho)
        print(f"  shapes-llava knockout, {sample.question!r}: {len(effects)} flow × layer cells, Spearman {rho:.3f}, "
              f"top-5 recall {recall:.2f}, largest |exact| {effects.abs().max():.3f}, largest |estimate| "
              f"{found.abs().max():.3f}")
    return float(torch.tensor(correlations).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--exact-sample", type=int, default=256, help="exact patches timed on LLaVA-1.5 geometry")
    parser.add_argument("--pairs", type=int, default=3, help="question pairs of the embedded model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratio = speedup(args)
    rho = agreement(args.pairs)
    knockout_rho = knockout_agreement(args.pairs)
    print(f"median Spearman: residual patching {rho:.3f}, single-layer knockout {knockout_rho:.3f}")
    print(f"atp_speedup {ratio:.1f} spearman {rho:.3f}")


if __name__ == "__main__":
    main()

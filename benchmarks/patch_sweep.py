"""Benchmark: a clean → corrupted activation-patching sweep through the engine against one full forward per patch.

On the random LLaVA of `knockout_sweep.py` (LLaVA-1.5 sequence geometry: 576 image tokens, 32 decoder layers),
each example is a question asked of two images: clean and corrupted. The sweep patches the clean run's residual
stream into the corrupted run at every layer for the study's token groups — image, object (the patches under
a box), question, last — as `CachedPatch` variants of the corrupted example. The naive loop is the usual one:
cache the clean run once (`Model.cache`), then one full forward of the corrupted example per patch. The engine
runs the clean and corrupted clean passes once and every patch from the first position and layer it touches
(a patch of the whole image leaves every image position carrying the clean run's values, so those rows start
after the image, reading the clean run's keys and values there). Both run in one process, taking turns per
example; the last line reads `patch_speedup <ratio> max_abs_dp <value>`.

    python benchmarks/patch_sweep.py --examples 2
    python benchmarks/patch_sweep.py --device cuda --dtype float16 --geometry 7b --examples 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from knockout_sweep import (
    QUESTIONS,
    Measured,
    add_model_arguments,
    compare,
    described,
    forward_peak,
    model_from,
    planned_steps,
    random_image,
    report,
)
from tqdm.auto import tqdm

from mmscope.experiments.engine import Variant, clean_pass
from mmscope.interventions import CachedPatch

GROUPS = ("image", "object", "question", "last")
BOX = (150, 100, 200, 150)  # (x, y, w, h) in the 500 x 375 image: the object's patches


def sweep(model, site: str) -> list[Variant]:
    """Every group x layer, each patching the clean run's `site` into the corrupted run."""
    return [Variant((group, layer), (CachedPatch(site, (layer,), group),))
            for group in GROUPS for layer in range(model.n_layers)]


def token_layers(model, pairs, variants, budget, overhead) -> tuple[int, int, int]:
    """Position x layer steps of the naive loop (clean cache, corrupted clean run, one full forward per patch) and
    of the engine (two clean passes and each batch from its start and first layer), and the engine's forwards."""
    naive = prefix = forwards = 0
    for clean, corrupted in pairs:
        full = corrupted.seq_len * model.n_layers
        run = clean_pass(model, corrupted)
        run.source = clean_pass(model, clean)
        steps, batches = planned_steps(model, corrupted, run, variants, budget, overhead)
        naive += (2 + len(variants)) * full
        prefix += 2 * full + steps
        forwards += 2 + batches
    return naive, prefix, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--site", default="residual", choices=("residual", "attention", "mlp"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        model = model_from(args, Path(folder))
    pairs = []
    for index in range(args.examples):
        question = QUESTIONS[index % len(QUESTIONS)]
        pairs.append(tuple(model.prepare(random_image(), question, boxes=[BOX]) for _ in range(2)))
    variants = sweep(model, args.site)
    corrupted = pairs[0][1]
    print(f"{described(model)}; {len(pairs)} clean/corrupted pairs of {corrupted.seq_len} positions "
          f"({len(corrupted.layout['image'])} image tokens, {len(corrupted.layout['object'])} under the box), "
          f"{len(variants)} patches each ({args.site}: {len(GROUPS)} groups x {model.n_layers} layers)")
    model.next_token_probs(corrupted)  # warm-up, charged to neither engine
    one_forward = forward_peak(model, corrupted)

    prefix, naive = Measured(), Measured()
    for clean, corrupted in tqdm(pairs, desc="examples", leave=False):
        prefix.run(model, corrupted, variants, "prefix", args.memory_budget_mb, args.layer_overhead, source=clean)
        naive.run(model, corrupted, variants, "naive", source=clean)
    report(prefix, naive, one_forward, len(variants) * len(pairs))
    naive_steps, prefix_steps, forwards = token_layers(model, pairs, variants, args.memory_budget_mb,
                                                       args.layer_overhead)
    speedup, _, max_dp = compare(prefix, naive, (naive_steps, len(pairs) * (2 + len(variants))),
                                 (prefix_steps, forwards))
    print(f"patch_speedup {speedup:.2f} max_abs_dp {max_dp:.3e}")


if __name__ == "__main__":
    main()

"""Benchmark: one region-knockout map (`mmscope map`) through the sweep engine against one naive forward per region.

A map blocks, for each region of the image-token grid and each target group (`last`, `question`), the target's
attention to the region's image tokens in one window of layers (a third of the depth around the middle layer,
`mmscope map`'s default). Per example and per region side (1x1 and 2x2 patches), this runs the map's variants
(`knockout_variants` of `example_regions`) with the prefix engine and with the naive loop (one full forward per
region × target), taking turns per example in one process, and prints each one's wall time, its time per
variant, the ratio naive / prefix and the largest difference in any next-token probability between the two.

Models: the embedded `shapes-llava` (8 layers, 64x64 images in 8-px patches: 64 image tokens) and a random
LLaVA with LLaVA-1.5's geometry (336-px images in 14-px patches: 576 image tokens, the study's prompt,
`--layers` decoder layers of width `--width`; `benchmarks/knockout_sweep.py`'s model). Where a map has more
variants than `--naive-limit`, the naive loop times an evenly spaced `--naive-limit` of them and its total is
that per-variant time times the map's variants (said so in its line); the prefix engine always runs them all.

    python benchmarks/map_sweep.py --examples 2
    python benchmarks/map_sweep.py --device cuda --width 1024 --naive-limit 0   # 0: time every naive forward

One run on the 2-core CPU of the development machine (one thread, float32), niced beside a training job, so
absolute times are noisy (the engines take turns per example, so load falls on both alike):
`python benchmarks/map_sweep.py --examples 2` (3.5 min):

    shapes-llava: 8 layers x width 128, 2 examples of [114, 116] positions (64 image tokens); layers 3..5 blocked, targets last + question
      region 1x1: 256 variants; prefix engine    0.90 s (   3.5 ms/variant); naive loop   10.44 s (  40.8 ms/variant) (timed 192 of them, scaled); naive/prefix  11.6x; max |dp| 5.4e-07
      region 2x2: 64 variants; prefix engine    0.31 s (   4.9 ms/variant); naive loop    2.79 s (  43.6 ms/variant); naive/prefix   8.9x; max |dp| 4.8e-07
    random LLaVA, LLaVA-1.5 geometry: 32 layers x width 64, 2 examples of [636, 637] positions (576 image tokens); layers 11..21 blocked, targets last + question
      region 1x1: 2304 variants; prefix engine   21.46 s (   9.3 ms/variant); naive loop  919.16 s ( 398.9 ms/variant) (timed 192 of them, scaled); naive/prefix  42.8x; max |dp| 4.7e-09
      region 2x2: 576 variants; prefix engine    4.47 s (   7.8 ms/variant); naive loop  248.51 s ( 431.4 ms/variant) (timed 192 of them, scaled); naive/prefix  55.6x; max |dp| 4.7e-09
    shapes-llava 1x1 11.58 shapes-llava 2x2 8.89 llava-1.5 geometry 1x1 42.84 llava-1.5 geometry 2x2 55.57

The naive loop's cost is linear in the variants, so its scaled total is its per-forward time (timed on 96 of each
example's variants) times the map's; what the ratio leans on is that per-forward time under the machine's load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

import torch
from PIL import Image

import mmscope
from mmscope.experiments.engine import run_variants
from mmscope.experiments.declarations import TARGETS
from mmscope.experiments.maps import example_regions, knockout_variants
from mmscope.interventions import knockout_window

sys.path.insert(0, str(Path(__file__).parent))
from knockout_sweep import QUESTIONS, build_model, random_image  # noqa: E402

EMBEDDED_QUESTIONS = ("What color is the cube?", "Is the sphere left of the cube?", "What shape is the red object?")
SIDES = (1, 2)


def map_layers(model: mmscope.Model) -> tuple[int, ...]:
    """The window timed: a third of the depth (rounded) around the middle layer."""
    return knockout_window(model.n_layers // 2, max(1, round(model.n_layers / 3)), model.n_layers)


def timed(model, example, variants, engine: str) -> tuple[float, torch.Tensor]:
    begin = time.perf_counter()
    clean, probs = run_variants(model, example, variants, engine=engine)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin, torch.cat([clean.probs[None], probs]).cpu()


def benchmark(name: str, model: mmscope.Model, examples, naive_limit: int) -> dict[int, float]:
    """Print one line per region side: prefix and naive time (per variant), ratio, max |dp|; returns the ratios."""
    layers = map_layers(model)
    image_tokens = len(examples[0][1].layout["image"])
    print(f"{name}: {model.n_layers} layers x width {model.adapter.text_config.hidden_size}, {len(examples)} "
          f"examples of {sorted({e.seq_len for _, e in examples})} positions ({image_tokens} image tokens); "
          f"layers {layers[0]}..{layers[-1]} blocked, targets {' + '.join(TARGETS)}")
    model.next_token_probs(examples[0][1])  # warm-up, charged to neither engine
    ratios = {}
    for side in SIDES:
        prefix_s = naive_s = 0.0
        n_variants = n_timed = 0
        max_dp = 0.0
        for image, example in examples:  # the engines take turns per example
            window = SimpleNamespace(centers=[model.n_layers // 2], targets=TARGETS,
                                     window=max(1, round(model.n_layers / 3)))  # the layers of `map_layers`
            variants = knockout_variants(example_regions(model, image, example, side), window, model.n_layers)
            seconds, prefix_probs = timed(model, example, variants, "prefix")
            prefix_s += seconds
            chosen = list(range(len(variants)))
            if naive_limit and len(variants) > naive_limit:
                chosen = torch.linspace(0, len(variants) - 1, naive_limit).round().long().tolist()
            seconds, naive_probs = timed(model, example, [variants[i] for i in chosen], "naive")
            naive_s += seconds * len(variants) / len(chosen)
            n_variants, n_timed = n_variants + len(variants), n_timed + len(chosen)
            rows = torch.tensor([0, *[i + 1 for i in chosen]])
            max_dp = max(max_dp, (prefix_probs[rows] - naive_probs).abs().max().item())
        ratios[side] = naive_s / prefix_s
        scaled = "" if n_timed == n_variants else f" (timed {n_timed} of them, scaled)"
        print(f"  region {side}x{side}: {n_variants} variants; prefix engine {prefix_s:7.2f} s "
              f"({1000 * prefix_s / n_variants:6.1f} ms/variant); naive loop {naive_s:7.2f} s "
              f"({1000 * naive_s / n_variants:6.1f} ms/variant){scaled}; naive/prefix {ratios[side]:5.1f}x; "
              f"max |dp| {max_dp:.1e}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the LLaVA-1.5-geometry model")
    parser.add_argument("--width", type=int, default=64, help="decoder width of the LLaVA-1.5-geometry model")
    parser.add_argument("--naive-limit", type=int, default=96,
                        help="naive forwards timed per example and side at most (0: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-llava15", action="store_true", help="only the embedded model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    embedded = mmscope.load("shapes-llava", device=args.device)
    images = [Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()) for _ in range(args.examples)]
    examples = [(image, embedded.prepare(image, EMBEDDED_QUESTIONS[i % len(EMBEDDED_QUESTIONS)]))
                for i, image in enumerate(images)]
    ratios = {"shapes-llava": benchmark("shapes-llava", embedded, examples, args.naive_limit)}
    if not args.skip_llava15:
        with tempfile.TemporaryDirectory() as folder:
            model = build_model(Path(folder), args.width, args.layers, args.device, "float32")
        images = [random_image() for _ in range(args.examples)]
        examples = [(image, model.prepare(image, QUESTIONS[i % len(QUESTIONS)])) for i, image in enumerate(images)]
        ratios["llava-1.5 geometry"] = benchmark("random LLaVA, LLaVA-1.5 geometry", model, examples, args.naive_limit)
    print(" ".join(f"{name} {side}x{side} {ratio:.2f}" for name, by_side in ratios.items()
                   for side, ratio in by_side.items()))


if __name__ == "__main__":
    main()

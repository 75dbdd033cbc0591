"""Benchmark: the features of a probe-under-edits sweep through the prefix engine against one full forward per
edit, on LLaVA-1.5 geometry.

`mmscope probe --flow ...` scores probes on the residual stream read under each edit: per example, every edit's
features at every depth, pooled over the last token, the image and the question. This reads them for edits ×
examples with `variant_features` both ways in one process, taking turns per example: the prefix engine (one
clean pass, then the edits as batched suffix passes; depths below an edit's first layer and positions before
its suffix are the clean pass's) and the naive loop (one full `model.hidden_states` forward per edit). It
prints each way's wall and CPU time, the speed-up and the largest difference in any pooled feature. The last
line reads `probe_edit_speedup <ratio> max_abs_diff <value>`.

    python benchmarks/probe_sweep.py --examples 3 --width 64
    python benchmarks/probe_sweep.py --device cuda --width 1024 --examples 8

The model is `knockout_sweep.py`'s: LLaVA-1.5's sequence (336-px images in 14-px patches, 576 image tokens, the
study's Vicuna prompt, 32 decoder layers) at a small width, random weights; see there for what it leaves out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from knockout_sweep import QUESTIONS, add_model_arguments, described, model_from, random_image
from tqdm.auto import tqdm

from mmscope.experiments.engine import Variant, variant_features
from mmscope.interventions import Knockout, knockout_window

FLOWS = (("image", "question"), ("image", "last"))  # the probing issue's joint question
GROUPS = ("last", "image", "question")  # the probes' poolings: last, image, text


def edits(n_layers: int, k: int) -> list[Variant]:
    """Each flow blocked in the window around every centre layer, as `mmscope probe --flow` builds them."""
    return [Variant((f"{source}->{target}", center),
                    (Knockout(source, target, knockout_window(center, k, n_layers), keep_self=source != target),))
            for source, target in FLOWS for center in range(n_layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--window", type=int, default=2, help="knockout window k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        model = model_from(args, Path(folder))
    examples = [model.prepare(random_image(), QUESTIONS[i % len(QUESTIONS)]) for i in range(args.examples)]
    variants = edits(model.n_layers, args.window)
    print(f"{described(model)}; {len(examples)} examples of {sorted({e.seq_len for e in examples})} positions "
          f"({len(examples[0].layout['image'])} image tokens), {len(variants)} edits each ({len(FLOWS)} flows x "
          f"{model.n_layers} centres, k={args.window}), features pooled over {', '.join(GROUPS)} at "
          f"{model.n_layers + 1} depths")
    model.hidden_states(examples[0])  # warm-up, charged to neither way

    seconds = {"prefix": 0.0, "naive": 0.0}
    cpu = dict(seconds)
    largest = 0.0
    for example in tqdm(examples, desc="examples", leave=False):
        read = {}
        for engine in ("prefix", "naive"):  # turns per example: load from other processes falls on both alike
            begin, begun = time.perf_counter(), time.process_time()
            read[engine] = variant_features(model, example, variants, GROUPS, engine=engine,
                                            memory_budget_mb=args.memory_budget_mb,
                                            layer_overhead=args.layer_overhead)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[engine] += time.perf_counter() - begin
            cpu[engine] += time.process_time() - begun
        for ours, theirs in zip(read["prefix"], read["naive"], strict=True):  # clean, then edited
            largest = max(largest, *((ours[group] - theirs[group]).abs().max().item() for group in GROUPS))
    n = len(examples) * len(variants)
    for engine, name in (("prefix", "prefix engine"), ("naive", "full forward per edit")):
        print(f"{name + ':':23}{seconds[engine]:8.2f} s wall {cpu[engine]:8.2f} s CPU  "
              f"{n / seconds[engine]:8.1f} edits/s")
    speedup = seconds["naive"] / seconds["prefix"]
    print(f"speed-up {speedup:.1f}x wall, {cpu['naive'] / cpu['prefix']:.1f}x CPU; max |difference| of any pooled "
          f"feature {largest:.2e}")
    print(f"probe_edit_speedup {speedup:.2f} max_abs_diff {largest:.3e}")


if __name__ == "__main__":
    main()

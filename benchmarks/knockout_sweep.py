"""Benchmark: a full knockout sweep with the prefix engine against the naive loop, on LLaVA-1.5 geometry.

Builds a randomly initialised LLaVA with LLaVA-1.5's sequence geometry — 336-px images in 14-px patches (576
image tokens), the study's Vicuna prompt around a ~15-word question, 32 decoder layers — but a small hidden
width, so it runs on a CPU. Then it sweeps 4 flows × every centre layer (window k) over several examples with
both engines in one process, taking turns per example, and prints each engine's wall and CPU time and peak
memory, the speed-up, the token-layer bound (how many fewer position × layer steps the prefix engine
computes), and the largest difference in any next-token probability between the engines. The last line reads
`speedup <ratio> bound <ratio> max_abs_dp <value>`.

    python benchmarks/knockout_sweep.py --examples 3 --width 64
    python benchmarks/knockout_sweep.py --device cuda --width 1024 --examples 8

What the model leaves out, and which way it leans: the vision tower is 2 layers (LLaVA-1.5's has 24) and the
vocabulary holds only the prompts' words (32000 in LLaVA-1.5), which both make the naive full forward cheaper
than on the real model, so the measured speed-up understates the real one. Peak memory is the peak of memory
in use above its level when an engine starts: glibc's live heap, sampled every millisecond (CPU, Linux), or
allocated GPU memory (CUDA). On a CPU the benchmark uses one thread unless told otherwise: on a machine
shared with other jobs, a second thread mostly waits for a core, which slows small operations tenfold.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import ctypes.util
import pstats
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import mmscope
from mmscope.experiments.engine import Variant, clean_pass, plan, run_variants
from mmscope.interventions import Knockout, knockout_window
from mmscope.zoo.build import TinyLlavaSpec, build_llava, build_word_tokenizer, save_llava

QUESTIONS = (
    "What color is the small metal cube to the left of the large red rubber sphere?",
    "Is the wooden table in front of the woman on the right large or small?",
    "Which animal is standing on the green grass next to the old fence?",
    "Are there both cars and trucks parked along the busy street near the tall white building?",
)
FLOWS = (("image", "last"), ("question", "last"), ("last", "last"), ("image", "question"))


def build_model(folder: Path, width: int, layers: int, device: str, dtype: str) -> mmscope.Model:
    """A random LLaVA with LLaVA-1.5 sequence geometry and `width`-wide decoder, saved and loaded as usual."""
    heads = min(32, max(1, width // 16))
    spec = TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
        text_hidden=width, text_layers=layers, text_heads=heads, intermediate=round(width * 11008 / 4096),
        max_positions=2048,
    )
    model, processor = build_llava(build_word_tokenizer(QUESTIONS), spec)
    save_llava(model, processor, folder)
    return mmscope.load(folder, device=device, dtype=dtype)


def sweep(model: mmscope.Model, k: int) -> list[Variant]:
    """4 flows × every centre layer; a last → last knockout blocks the last position's attention to itself."""
    return [
        Variant((f"{source}->{target}", center),
                (Knockout(source, target, knockout_window(center, k, model.n_layers), keep_self=source != target),))
        for source, target in FLOWS
        for center in range(model.n_layers)
    ]


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2`: heap statistics in bytes."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
LIBC.mallinfo2.restype = MallInfo2


def live_heap() -> int:
    """Bytes the process has allocated and not freed (CPU tensors included): heap chunks plus mmapped ones."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak memory above the level at entry, in MiB: allocated GPU memory on CUDA; on CPU the live heap, sampled
    every millisecond by a thread (the resident set would also count memory freed but kept by the allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = live_heap()
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, live_heap())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.sampler.join()
            peak = max(self.peak, live_heap())
        self.mib = (peak - self.base) / 2**20


@dataclass
class Measured:
    """One engine's totals over the examples: wall and CPU seconds, peak memory, probs (clean first)."""

    seconds: float = 0.0
    cpu: float = 0.0
    peak_mib: float = 0.0
    probs: list = field(default_factory=list)

    def run(self, model, example, variants, engine: str, budget: float) -> None:
        with PeakMemory(model.device) as memory:
            begin, cpu = time.perf_counter(), time.process_time()
            clean, probs = run_variants(model, example, variants, engine=engine, memory_budget_mb=budget)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - begin
            self.cpu += time.process_time() - cpu
        self.peak_mib = max(self.peak_mib, memory.mib)
        self.probs.append(torch.cat([clean.probs[None], probs]).cpu())


def token_layers(model, examples, variants, budget: float) -> tuple[int, int, int]:
    """Position × layer steps of the naive loop and of the prefix engine (clean pass + suffixes + fallbacks),
    and the number of batched forwards the prefix engine runs."""
    naive = prefix = forwards = 0
    for example in examples:
        length = example.seq_len
        naive += (1 + len(variants)) * length * model.n_layers
        prefix += length * model.n_layers
        batches = plan(model, example, clean_pass(model, example), variants, budget)
        for batch in batches:
            prefix += len(batch.variants) * (length - batch.start) * model.n_layers
        forwards += 1 + sum(1 if batch.start else len(batch.variants) for batch in batches)
    return naive, prefix, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--width", type=int, default=64, help="decoder hidden size")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--window", type=int, default=9, help="knockout window k")
    parser.add_argument("--memory-budget-mb", type=float, default=1024)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads mostly wait)")
    parser.add_argument("--profile", action="store_true", help="also profile the prefix engine (cProfile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        model = build_model(Path(folder), args.width, args.layers, args.device, args.dtype)
    examples = [
        model.prepare(Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy()), QUESTIONS[i % len(QUESTIONS)])
        for i in range(args.examples)
    ]
    variants = sweep(model, args.window)
    lengths = sorted({example.seq_len for example in examples})
    print(f"random LLaVA, {model.n_layers} layers x width {args.width} ({model.n_heads} heads), on {model.device} "
          f"({torch.get_num_threads()} threads); "
          f"{len(examples)} examples of {lengths} positions ({len(examples[0].layout['image'])} image tokens), "
          f"{len(variants)} variants each ({len(FLOWS)} flows x {model.n_layers} centres, k={args.window})")
    model.next_token_probs(examples[0])  # warm-up, charged to neither engine

    # The engines take turns per example, so load from other processes falls on both alike.
    prefix, naive = Measured(), Measured()
    for example in examples:
        prefix.run(model, example, variants, "prefix", args.memory_budget_mb)
        naive.run(model, example, variants, "naive", args.memory_budget_mb)
    for name, measured in (("prefix engine", prefix), ("naive loop", naive)):
        print(f"{name + ':':15}{measured.seconds:8.2f} s wall {measured.cpu:8.2f} s CPU  "
              f"peak memory {measured.peak_mib:8.1f} MiB")
    naive_steps, prefix_steps, forwards = token_layers(model, examples, variants, args.memory_budget_mb)
    speedup, bound = naive.seconds / prefix.seconds, naive_steps / prefix_steps
    max_dp = max((ours - theirs).abs().max().item() for ours, theirs in zip(prefix.probs, naive.probs, strict=True))
    print(f"token-layers: naive {naive_steps:,} in {len(examples) * (1 + len(variants))} forwards; "
          f"prefix {prefix_steps:,} in {forwards} forwards")
    print(f"speed-up {speedup:.1f}x wall, {naive.cpu / prefix.cpu:.1f}x CPU (token-layer bound {bound:.1f}x); "
          f"max |dp| between engines {max_dp:.2e}")
    if args.profile:
        profiler = cProfile.Profile()
        for example in examples:
            profiler.runcall(run_variants, model, example, variants, memory_budget_mb=args.memory_budget_mb)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    print(f"speedup {speedup:.2f} bound {bound:.2f} max_abs_dp {max_dp:.3e}")


if __name__ == "__main__":
    main()

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
from tqdm.auto import tqdm

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


GEOMETRIES = {  # decoder width, heads, MLP width, vocabulary; vision tower width, layers, heads
    "small": None,  # --width wide, width // 16 heads, MLP 11008/4096 x width, the prompts' words; a 2-layer tower
    "7b": dict(width=4096, heads=32, intermediate=11008, vocab=32000, vision=(1024, 24, 16)),  # LLaVA-1.5-7B
}


def build_model(folder: Path, width: int, layers: int, device: str, dtype: str, *, heads: int | None = None,
                intermediate: int | None = None, vocab: int | None = None,
                vision: tuple[int, int, int] = (64, 2, 4)) -> mmscope.Model:
    """A random LLaVA with LLaVA-1.5 sequence geometry and a `width`-wide decoder, saved and loaded as usual
    (`vocab`: pad the prompts' words with filler words up to that many tokens)."""
    vision_hidden, vision_layers, vision_heads = vision
    spec = TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=vision_hidden, vision_layers=vision_layers,
        vision_heads=vision_heads, text_hidden=width, text_layers=layers,
        text_heads=heads or min(32, max(1, width // 16)), intermediate=intermediate or round(width * 11008 / 4096),
        max_positions=2048,
    )
    tokenizer = build_word_tokenizer(QUESTIONS)
    if vocab and vocab > len(tokenizer):
        tokenizer = build_word_tokenizer(QUESTIONS, [f"filler{i}" for i in range(vocab - len(tokenizer))])
    model, processor = build_llava(tokenizer, spec)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))  # saved as loaded: half the disk at 7B
    save_llava(model, processor, folder)
    del model
    return mmscope.load(folder, device=device, dtype=dtype)


def model_from(args, folder: Path) -> mmscope.Model:
    """The benchmark model the command line asks for (`--geometry`, `--width`, `--layers`, device, dtype)."""
    geometry = GEOMETRIES[args.geometry] or {"width": args.width}
    return build_model(folder, layers=args.layers, device=args.device, dtype=args.dtype, **geometry)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small",
                        help="7b: LLaVA-1.5-7B's decoder (width 4096, 32 heads, MLP 11008, vocabulary 32000) and "
                             "CLIP ViT-L tower, random weights (for a GPU); small: --width")
    parser.add_argument("--width", type=int, default=64, help="decoder hidden size (geometry small)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="what one suffix pass may hold (default: about one batch-1 forward)")
    parser.add_argument("--layer-overhead", type=float, default=None,
                        help="the planner's cost of one more pass per layer, in positions (default by device)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads mostly wait)")


def random_image() -> Image.Image:
    return Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy())


def forward_peak(model: mmscope.Model, example) -> float:
    """Peak memory (MiB) of one batch-1 forward over `example`, above the level before it."""
    with PeakMemory(model.device) as memory:
        model.next_token_probs(example)
    return memory.mib


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

    def run(self, model, example, variants, engine: str, budget: float | None = None,
            overhead: float | None = None, source=None) -> None:
        with PeakMemory(model.device) as memory:
            begin, cpu = time.perf_counter(), time.process_time()
            clean, probs = run_variants(model, example, variants, engine=engine, memory_budget_mb=budget,
                                        layer_overhead=overhead, source=source)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - begin
            self.cpu += time.process_time() - cpu
        self.peak_mib = max(self.peak_mib, memory.mib)
        self.probs.append(torch.cat([clean.probs[None], probs]).cpu())


def planned_steps(model, example, clean, variants, budget: float | None, overhead: float | None) -> tuple[int, int]:
    """Position × layer steps of the engine's batches for `example` (each from its start and first layer) given
    its clean pass, and how many batches the engine runs."""
    batches = plan(model, example, clean, variants, budget, overhead)
    steps = sum(len(batch.variants) * (example.seq_len - batch.start) * (model.n_layers - batch.first_layer)
                for batch in batches)
    return steps, len(batches)


def token_layers(model, examples, variants, budget: float | None, overhead: float | None) -> tuple[int, int, int]:
    """Position × layer steps of the naive loop and of the prefix engine (clean pass + suffixes from their
    first layers + fallbacks), and the number of forwards the prefix engine runs."""
    naive = prefix = forwards = 0
    for example in examples:
        full = example.seq_len * model.n_layers
        steps, batches = planned_steps(model, example, clean_pass(model, example), variants, budget, overhead)
        naive += (1 + len(variants)) * full
        prefix += full + steps
        forwards += 1 + batches
    return naive, prefix, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--window", type=int, default=9, help="knockout window k")
    parser.add_argument("--profile", action="store_true", help="also profile the prefix engine (cProfile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        model = model_from(args, Path(folder))
    examples = [model.prepare(random_image(), QUESTIONS[i % len(QUESTIONS)]) for i in range(args.examples)]
    variants = sweep(model, args.window)
    lengths = sorted({example.seq_len for example in examples})
    print(f"{described(model)}; {len(examples)} examples of {lengths} positions ({len(examples[0].layout['image'])} image tokens), "
          f"{len(variants)} variants each ({len(FLOWS)} flows x {model.n_layers} centres, k={args.window})")
    model.next_token_probs(examples[0])  # warm-up, charged to neither engine
    one_forward = forward_peak(model, examples[0])

    # The engines take turns per example, so load from other processes falls on both alike.
    prefix, naive = Measured(), Measured()
    for example in tqdm(examples, desc="examples", leave=False):
        prefix.run(model, example, variants, "prefix", args.memory_budget_mb, args.layer_overhead)
        naive.run(model, example, variants, "naive")
    report(prefix, naive, one_forward, len(variants) * len(examples))
    naive_steps, prefix_steps, forwards = token_layers(model, examples, variants, args.memory_budget_mb,
                                                       args.layer_overhead)
    speedup, bound, max_dp = compare(prefix, naive, (naive_steps, len(examples) * (1 + len(variants))),
                                     (prefix_steps, forwards))
    if args.profile:
        profiler = cProfile.Profile()
        for example in examples:
            profiler.runcall(run_variants, model, example, variants, memory_budget_mb=args.memory_budget_mb)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    print(f"speedup {speedup:.2f} bound {bound:.2f} max_abs_dp {max_dp:.3e}")


def described(model: mmscope.Model) -> str:
    """The benchmark model in one line: depth, widths, vocabulary, dtype, device, threads."""
    config = model.adapter.text_config
    return (f"random LLaVA, {model.n_layers} layers x width {config.hidden_size} ({model.n_heads} heads, MLP "
            f"{config.intermediate_size}, vocabulary {config.vocab_size}), {model.hf.dtype} on {model.device} "
            f"({torch.get_num_threads()} threads)")


def compare(prefix: Measured, naive: Measured, naive_work: tuple[int, int],
            prefix_work: tuple[int, int]) -> tuple[float, float, float]:
    """Print each engine's token-layers and forwards (`(steps, forwards)` each) and the speed-up against the
    token-layer bound; returns the speed-up, the bound and the largest probability difference."""
    speedup, bound = naive.seconds / prefix.seconds, naive_work[0] / prefix_work[0]
    max_dp = max_difference(prefix, naive)
    print(f"token-layers: naive {naive_work[0]:,} in {naive_work[1]} forwards; "
          f"prefix {prefix_work[0]:,} in {prefix_work[1]} forwards")
    print(f"speed-up {speedup:.1f}x wall, {naive.cpu / prefix.cpu:.1f}x CPU (token-layer bound {bound:.1f}x, "
          f"{speedup / bound:.0%} of it); max |dp| between engines {max_dp:.2e}")
    return speedup, bound, max_dp


def report(prefix: Measured, naive: Measured, one_forward: float, n_variants: int) -> None:
    """Each engine's time, variants per second and peak memory, against one batch-1 forward's peak."""
    print(f"one batch-1 forward: peak memory {one_forward:8.1f} MiB")
    for name, measured in (("prefix engine", prefix), ("naive loop", naive)):
        print(f"{name + ':':15}{measured.seconds:8.2f} s wall {measured.cpu:8.2f} s CPU  "
              f"{n_variants / measured.seconds:8.1f} variants/s  peak memory {measured.peak_mib:8.1f} MiB "
              f"({measured.peak_mib / one_forward:.2f}x one forward)")


def max_difference(prefix: Measured, naive: Measured) -> float:
    """The largest difference in any probability between the engines (clean runs included)."""
    return max((ours - theirs).abs().max().item() for ours, theirs in zip(prefix.probs, naive.probs, strict=True))


if __name__ == "__main__":
    main()

"""Benchmark: one example of `mmscope knockout`, end to end, against the study authors' protocol loop.

On the random LLaVA of `knockout_sweep.py` (LLaVA-1.5 sequence geometry: 576 image tokens, 32 decoder layers,
small width), one example with a box runs the study's six flows × every centre layer twice, taking turns:

- the authors' protocol: the clean answer by Hugging Face `generate` (greedy, KV cache, up to 128 new tokens),
  then one full forward per variant (the naive engine);
- mmscope: the clean answer by `Model.generate_answer` (cached greedy decode, 8 new tokens, what every sweep
  uses), then the prefix engine.

Both read p(first answer token) at the last position for every variant; the benchmark prints both times, the
largest difference in Δp% between the two, and last `end_to_end_speedup <ratio> max_abs_ddp <value>`.

    python benchmarks/end_to_end.py --width 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from knockout_sweep import QUESTIONS, add_model_arguments, model_from
from PIL import Image

from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.declarations import STUDY_FLOWS
from mmscope.experiments.knockout import Flow
from mmscope.interventions import knockout_window


def study_variants(n_layers: int, k: int) -> list[Variant]:
    """The study's six flows × every centre layer, as `mmscope knockout` builds them."""
    flows = [Flow.parse(flow) for flow in STUDY_FLOWS]
    return [Variant((flow.name, center), (flow.knockout(knockout_window(center, k, n_layers)),))
            for flow in flows for center in range(n_layers)]


def delta_pct(clean: torch.Tensor, probs: torch.Tensor, token: int) -> torch.Tensor:
    """Δp% of `token` for every variant."""
    return (probs[:, token] - clean[token]) / clean[token] * 100


def authors(model, example, variants) -> tuple[float, torch.Tensor]:
    """HF generate (KV cache, up to 128 tokens) for the answer, then one full forward per variant."""
    started = time.perf_counter()
    inputs = model.model_inputs(example)
    inputs.pop("position_ids", None)  # generate makes its own
    with torch.no_grad():
        generated = model.hf.generate(**inputs, max_new_tokens=128, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)
    token = int(generated[0, inputs["input_ids"].shape[1]])
    clean, probs = run_variants(model, example, variants, engine="naive")
    return time.perf_counter() - started, delta_pct(clean.probs, probs, token)


def ours(model, example, variants, budget=None, overhead=None) -> tuple[float, torch.Tensor]:
    """mmscope's clean answer (cached greedy decode), then the prefix engine."""
    started = time.perf_counter()
    model.generate_answer(example)  # the sweep's clean answer (its correctness filter)
    clean, probs = run_variants(model, example, variants, engine="prefix", memory_budget_mb=budget,
                                layer_overhead=overhead)
    token = int(clean.probs.argmax())  # the greedy answer's first token, as generate's
    return time.perf_counter() - started, delta_pct(clean.probs, probs, token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--window", type=int, default=9, help="knockout window k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = model_from(args, Path(folder))
    image = Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy())
    example = model.prepare(image, QUESTIONS[0], boxes=[(120, 80, 150, 120)])
    variants = study_variants(model.n_layers, args.window)
    print(f"random LLaVA, {model.n_layers} layers x width {args.width}, {example.seq_len} positions "
          f"({len(example.layout['image'])} image tokens, {len(example.layout['object'])} object patches); "
          f"{len(variants)} variants (6 study flows x {model.n_layers} centres, k={args.window})")
    model.next_token_probs(example)  # warm-up, charged to neither
    theirs_seconds, theirs_dp = authors(model, example, variants)
    ours_seconds, ours_dp = ours(model, example, variants, args.memory_budget_mb, args.layer_overhead)
    max_ddp = (theirs_dp - ours_dp).abs().max().item()
    print(f"authors' protocol: {theirs_seconds:8.2f} s   mmscope: {ours_seconds:8.2f} s   "
          f"max |Δp% difference| {max_ddp:.2e}")
    print(f"end_to_end_speedup {theirs_seconds / ours_seconds:.2f} max_abs_ddp {max_ddp:.3e}")


if __name__ == "__main__":
    main()

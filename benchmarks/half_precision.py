"""Benchmark: how far the knockout engine in bfloat16 and float16 lands from a float32 naive loop.

For each model (the embedded `shapes-llava`; with `--random`, also the random LLaVA of `knockout_sweep.py` at
LLaVA-1.5 sequence geometry) and a few of the embedded world's held-out questions with boxes, the study's six
flows × every centre layer run four ways: the float32 naive loop (one full forward per variant: the reference),
and the prefix engine in float32, bfloat16 and float16 (the model loaded in that dtype; masks use the dtype's
minimum). Each row prints, over all questions × variants, the largest difference from the reference in p of the
clean greedy answer's first token (absolute), in Δp% (percentage points), and the median |ΔΔp%|.

    python benchmarks/half_precision.py --questions 4
    python benchmarks/half_precision.py --families   # also each family's tiny random checkpoint (the tests')

With `--families`, each family's tiny random checkpoint of the test suite (`tests/families.py`) is checked the
way `mmscope check` checks half precision: the study's flows each example holds, at the first, middle and last
centre, on two prompts, the engine in bfloat16 and float16 against the float32 naive loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from end_to_end import study_variants
from knockout_sweep import add_model_arguments, model_from

import mmscope
from mmscope.experiments.engine import run_variants

DTYPES = ("float32", "bfloat16", "float16")


def delta_pct(clean: torch.Tensor, probs: torch.Tensor, token: int) -> torch.Tensor:
    return (probs[:, token].double() - clean[token].double()) / clean[token].double() * 100


def measure(name: str, load, questions, window: int) -> list[str]:
    """The table's rows for one model, `name`: `load(dtype)` gives it in that dtype."""
    reference = load("float32")
    examples = [reference.prepare(q.image, q.question, boxes=q.boxes) for q in questions]
    variants = study_variants(reference.n_layers, window)
    truth = []
    for example in examples:
        clean, probs = run_variants(reference, example, variants, engine="naive")
        token = int(clean.probs.argmax())
        truth.append((token, probs[:, token].double(), delta_pct(clean.probs, probs, token)))
    rows = []
    for dtype in DTYPES:
        model = reference if dtype == "float32" else load(dtype)
        started = time.perf_counter()
        p_diff, dp_diff = [], []
        for question, (token, p_ref, dp_ref) in zip(questions, truth, strict=True):
            example = model.prepare(question.image, question.question, boxes=question.boxes)
            clean, probs = run_variants(model, example, variants, engine="prefix")
            p_diff.append((probs[:, token].double() - p_ref).abs())
            dp_diff.append((delta_pct(clean.probs, probs, token) - dp_ref).abs())
        p_diff, dp_diff = torch.cat(p_diff), torch.cat(dp_diff)
        rows.append(f"{name:<22} {dtype:<9} engine vs float32 naive: max |Δp| {p_diff.max():.2e}   "
                    f"max |ΔΔp%| {dp_diff.max():8.3f} pp   median |ΔΔp%| {dp_diff.median():.3f} pp   "
                    f"({len(dp_diff)} variants, {time.perf_counter() - started:.1f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--questions", type=int, default=4, help="held-out questions (with a box) per model")
    parser.add_argument("--window", type=int, default=3, help="knockout window k")
    parser.add_argument("--random", action="store_true", help="also the random LLaVA of knockout_sweep.py")
    parser.add_argument("--families", action="store_true", help="also each family's tiny random checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    questions, index = [], 0
    while len(questions) < args.questions:
        sample = mmscope.sample(index)
        index += 1
        if sample.boxes:
            questions.append(sample)
    rows = measure("shapes-llava", lambda dtype: mmscope.load("shapes-llava", dtype=dtype), questions, args.window)
    if args.random:
        with tempfile.TemporaryDirectory() as folder:
            def random_llava(dtype):
                args.dtype = dtype
                return model_from(args, Path(folder) / dtype)
            rows += measure(f"random LLaVA, {args.layers} layers", random_llava, questions, args.window)
    if args.families:
        rows += families()
    print("\n".join(rows))


def families() -> list[str]:
    """Each tiny family checkpoint's half-precision agreement, as `mmscope check` measures it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import scene
    from families import BUILDERS, QUESTIONS

    from mmscope.experiments.check import half_precision

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, build in sorted(BUILDERS.items()):
            try:
                model = mmscope.load(build(Path(folder) / name))
            except ImportError as error:  # e.g. SmolVLM's processor without num2words
                rows.append(f"{name:<22} skipped: {error}")
                continue
            examples = [model.prepare(scene(40, 30, seed=1), QUESTIONS[0]),
                        model.prepare(scene(40, 30, seed=2), QUESTIONS[1])]
            for dtype in DTYPES[1:]:
                outcome = half_precision(model, examples, dtype)
                rows.append(f"{name:<22} {dtype:<9} {outcome.status:<4} {outcome.said}")
    return rows


if __name__ == "__main__":
    main()

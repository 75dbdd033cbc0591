"""Benchmark: clean greedy answers with the key/value-cached decode against the uncached loop.

`Model.generate_answer` without interventions prefills the prompt once and then runs one token per step on a
cache; the uncached loop (what it runs under interventions) runs a full forward over the whole sequence for
every token. Sweeps take one clean answer per question, `mmscope evaluate` answers batches of left-padded
questions with 4 new tokens; this times both paths on such batches in one process, taking turns per batch, and
checks they give the same answers. The last line reads `generation_speedup <ratio> answers_equal <True/False>`.

    python benchmarks/generation.py                                  # the embedded shapes-llava, synthetic scenes
    python benchmarks/generation.py --model llava-1.5-geometry --width 256
    python benchmarks/generation.py --model llava-1.5-geometry --device cuda --width 1024 --batch-size 16

`llava-1.5-geometry` is a randomly initialised LLaVA with LLaVA-1.5's sequence geometry (336-px images in 14-px
patches: 576 image tokens, the study's Vicuna prompt, 32 decoder layers) but a small hidden width, a 2-layer
vision tower and a vocabulary of only the prompts' words. Its answers are arbitrary words; a random model may
stop early at its end-of-sequence token, which both paths then do alike. Its lm_head never prefers `<image>`
(a trained model does not write it): the uncached loop cannot run on an answer holding one, since the prompt's
image tokens would then outnumber the image's features. On a CPU the benchmark uses one thread
unless told otherwise (on a shared machine a second thread mostly waits for a core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import mmscope
from mmscope.zoo.build import TinyLlavaSpec, build_llava, build_word_tokenizer, save_llava

QUESTIONS = (
    "What color is the small metal cube to the left of the large red rubber sphere?",
    "Is the wooden table in front of the woman on the right large or small?",
    "Which animal is standing on the green grass next to the old fence?",
    "Are there both cars and trucks parked along the busy street near the tall white building?",
)
MODELS = ("shapes-llava", "llava-1.5-geometry")


def geometry_model(folder: Path, width: int, layers: int, device: str, dtype: str) -> mmscope.Model:
    """A random LLaVA with LLaVA-1.5 sequence geometry and a `width`-wide decoder, saved and loaded as usual."""
    spec = TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
        text_hidden=width, text_layers=layers, text_heads=min(32, max(1, width // 16)),
        intermediate=round(width * 11008 / 4096), max_positions=2048,
    )
    tokenizer = build_word_tokenizer(QUESTIONS)
    model, processor = build_llava(tokenizer, spec)
    with torch.no_grad():  # never `<image>`: eos wins its ties (the lower id), as a trained model never writes it
        image, eos = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.eos_token_id
        model.lm_head.weight[image] = model.lm_head.weight[eos]
    save_llava(model, processor, folder)
    return mmscope.load(folder, device=device, dtype=dtype)


def questions(model_name: str, n: int, folder: Path) -> list[tuple[Image.Image, str]]:
    """`n` (image, question) pairs: the embedded model's own kind of synthetic scenes, or random pictures."""
    if model_name == "shapes-llava":
        from mmscope.data import synthesize
        from mmscope.experiments.workspace import load_questions

        synthesize(folder, 4 * n, seed=11, image_size=64, progress=False)
        rows = load_questions(folder, "test", limit=-(-n // 6))  # at most that many per category, of six
        return [(row["image"].convert("RGB"), row["question"]) for row in rows][:n]
    return [(Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy()), QUESTIONS[i % len(QUESTIONS)])
            for i in range(n)]


def timed(model: mmscope.Model, answer, *args) -> tuple[list[str], float]:
    """The answers `answer(*args)` gives and its wall time (GPU work finished)."""
    begin = time.perf_counter()
    answers = answer(*args)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return answers if isinstance(answers, list) else [answers], time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="shapes-llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--width", type=int, default=64, help="decoder hidden size (llava-1.5-geometry)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (llava-1.5-geometry)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (1: one at a time)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="as mmscope evaluate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads mostly wait)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        if args.model == "shapes-llava":
            model = mmscope.load("shapes-llava", device=args.device, dtype=args.dtype)
        else:
            model = geometry_model(Path(folder), args.width, args.layers, args.device, args.dtype)
        pairs = questions(args.model, args.questions, Path(folder) / "world")
    examples = [model.prepare(image, question) for image, question in pairs]
    batches = [model.batch(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    lengths = sorted({example.seq_len for example in examples})
    print(f"{args.model}: {model.n_layers} layers, on {model.device} ({torch.get_num_threads()} threads); "
          f"{len(examples)} questions of {lengths[0]}-{lengths[-1]} positions in batches of {args.batch_size}, "
          f"{args.max_new_tokens} new tokens")
    model.generate_answer(batches[0], max_new_tokens=1)  # warm-up, charged to neither path

    # The paths take turns per batch, so load from other processes falls on both alike.
    cached, uncached, seconds = [], [], {"cached": 0.0, "uncached": 0.0}
    for batch in batches:
        answers, spent = timed(model, model.generate_answer, batch, (), args.max_new_tokens)
        cached += answers
        seconds["cached"] += spent
        answers, spent = timed(model, model._generate_uncached, batch, (), args.max_new_tokens)
        uncached += answers
        seconds["uncached"] += spent
    for name, spent in seconds.items():
        print(f"{name + ':':10}{spent:8.2f} s wall, {1000 * spent / len(examples):8.1f} ms per question")
    equal = cached == uncached
    both = enumerate(zip(cached, uncached, strict=True))
    differing = [(i, ours, theirs) for i, (ours, theirs) in both if ours != theirs]
    print(f"answers: {cached[:4]}{' …' if len(cached) > 4 else ''}; {len(differing)} differ {differing[:3]}")
    speedup = seconds["uncached"] / seconds["cached"]
    print(f"generation_speedup {speedup:.2f} answers_equal {equal}")


if __name__ == "__main__":
    main()

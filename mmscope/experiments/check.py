"""`mmscope check`: is mmscope right on *this* model? The invariants every experiment relies on, measured on a
few of the model's own examples, and what mmscope can do with it.

mmscope's correctness is tested on tiny random checkpoints and the embedded model, in float32 on a CPU. A
researcher's model differs in what matters most: a real tokenizer and processor decide the token groups and
image positions, half precision changes what a mask's minimum is, a GPU runs other kernels. `check` runs the
oracles of the test suite on the researcher's checkpoint, in the dtype and on the device it will run in:

  * clean forward — mmscope's traced forward gives the model's own logits (a plain `model.hf(...)` call);
  * empty edit — an empty intervention list, and a sweep variant with no interventions, change nothing;
  * groups decode — the question group decodes to exactly the question, `last` is the prompt's last token;
  * image tokens — the image group is exactly the positions where the decoder's input embeddings are not the
    token embeddings of the input ids (where the model wrote its image features);
  * batched = per-row — a left-padded batch of two prompts gives each the probabilities it gets alone;
  * eager ≈ sdpa — both attention implementations give the same probabilities (where the family has both);
  * knockout blocks — under image → last blocked in every layer, the last position's attention weights on the
    image are 0 in every layer, and its rows still sum to 1;
  * knockout moves p — blocking image → last in every layer changes p(answer), with no NaN anywhere;
  * engine = naive — the prefix engine equals one full forward per variant on a sample of the study's flows;
  * cached greedy — greedy decoding with a key/value cache writes the tokens of the uncached loop;
  * half precision — the engine in half precision against a float32 naive loop (a float32 model is checked in
    a bfloat16 copy, a half-precision one against a float32 copy), within `HALF_TOLERANCE`.

Each check passes, fails (with the number it measured and the bound), or does not apply (and says why). The
report ends with the model's capabilities: family, attention, dtype, devices, the sites interventions reach,
what the sweep engine can share, the token layout of one example, and the time and memory of one forward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mmscope
from mmscope.errors import InputError, MMScopeError
from mmscope.experiments.declarations import STUDY_FLOWS, CheckOptions, default_window
from mmscope.experiments.engine import Variant, clean_pass, last_position, latest_start, run_variants
from mmscope.experiments.scores import Flow
from mmscope.experiments.workspace import load_questions
from mmscope.interventions import Knockout, knockout_window
from mmscope.layout import Example
from mmscope.model import Model

# Largest differences allowed, by the dtype the model computes in: next-token probabilities between two ways
# that should agree (mmscope and the model's own forward, batched and per-row, engine and naive loop, eager and
# sdpa), and logits relative to their largest magnitude. Float32 differs by rounding in other matrix shapes;
# half precision by its 8 (bfloat16) or 11 (float16) bits of mantissa.
TOLERANCE = {"float32": {"probs": 1e-5, "logits": 1e-5}, "half": {"probs": 2e-2, "logits": 2e-2}}
# The engine in half precision against a float32 naive loop: the largest |Δp| and the median |ΔΔp%| (percentage
# points) over every checked variant (`benchmarks/half_precision.py` measures them on more models).
HALF_TOLERANCE = {"max_dp": 5e-2, "median_ddp_pct": 1.0}
PASS, FAIL, NOT_APPLICABLE = "pass", "FAIL", "n/a"


@dataclass
class Outcome:
    """One check's result: `status` pass / FAIL / n/a, and what was measured against what bound (or why not)."""

    name: str
    status: str
    said: str
    measured: float | None = None
    bound: float | None = None


@dataclass
class Report:
    """A model's check: every `Outcome`, its capabilities, one example's token layout, and one forward's cost."""

    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    capabilities: dict[str, str] = field(default_factory=dict)
    layout: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the model's forwards warned, once each

    @property
    def passed(self) -> bool:
        """No check failed (a check that does not apply does not fail)."""
        return all(outcome.status != FAIL for outcome in self.outcomes)

    def lines(self) -> list[str]:
        """The report as printed: a line per check, then the capability table and the token layout."""
        width = max(len(outcome.name) for outcome in self.outcomes)
        lines = [f"mmscope check {self.model}", ""]
        lines += [f"  {outcome.status:<4}  {outcome.name:<{width}}  {outcome.said}" for outcome in self.outcomes]
        failed = sum(outcome.status == FAIL for outcome in self.outcomes)
        lines += ["", f"{len(self.outcomes) - failed} of {len(self.outcomes)} checks pass or do not apply; "
                      f"{failed} failed" if failed else f"all {len(self.outcomes)} checks pass or do not apply", ""]
        name_width = max(len(name) for name in self.capabilities)
        lines += ["capabilities:"] + [f"  {name:<{name_width}}  {value}" for name, value in self.capabilities.items()]
        lines += ["", "token layout of the first example (group: positions — text):"]
        lines += [f"  {row['group']:<15} {row['positions']:<22} {row['text']}" for row in self.layout]
        if self.warnings:
            lines += ["", "warnings while checking:"] + [f"  {warning}" for warning in self.warnings]
        return lines

    def to_dict(self) -> dict:
        return {"model": self.model, "passed": self.passed, "checks": [dataclasses.asdict(o) for o in self.outcomes],
                "capabilities": self.capabilities, "layout": self.layout, "warnings": self.warnings}


def check(model: Model | str | Path = "shapes-llava", examples: Sequence[Example] | None = None, *,
          n_examples: int = 3, half: str | None = "bfloat16", progress: bool = False) -> Report:
    """Run every check on `model` (a loaded `Model`, or what `mmscope.load` takes) over `examples` (one-row
    prepared examples, at least two; default: the first `n_examples` questions with object boxes of the embedded
    test split). `half`: the dtype a float32 model's half-precision check copies it to (None: skip that check).
    Never raises for a failed check: read `Report.passed`."""
    if not isinstance(model, Model):
        model = mmscope.load(model)
    if examples is None:
        examples = default_examples(model, n_examples)
    examples = list(examples)
    if len(examples) < 2 or any(not isinstance(e, Example) or len(e) != 1 for e in examples):
        raise InputError(f"check takes at least two one-row examples (model.prepare(...)); got {len(examples)}")
    if half not in (None, "bfloat16", "float16"):
        raise InputError(f"half must be 'bfloat16', 'float16' or None; got {half!r}")
    report = Report(model.name)
    checks: list[tuple[str, Callable[[], Outcome]]] = [
        ("clean forward", lambda: clean_forward(model, examples)),
        ("empty edit", lambda: empty_edit(model, examples)),
        ("groups decode", lambda: groups_decode(model, examples)),
        ("image tokens", lambda: image_tokens(model, examples)),
        ("batched = per-row", lambda: batched_rows(model, examples)),
        ("eager ≈ sdpa", lambda: eager_sdpa(model, examples)),
        ("knockout blocks", lambda: knockout_blocks(model, examples)),
        ("knockout moves p", lambda: knockout_moves(model, examples)),
        ("engine = naive", lambda: engine_naive(model, examples)),
        ("cached greedy", lambda: cached_greedy(model, examples)),
        ("half precision", lambda: half_precision(model, examples, half)),
    ]
    with warnings.catch_warnings(record=True) as caught:  # said once, in the report, not once per forward
        warnings.simplefilter("always")
        for name, run in checks:
            if progress:
                print(f"checking {name} …", flush=True)
            try:
                outcome = run()
            except (MMScopeError, RuntimeError, ValueError, IndexError, KeyError) as error:
                outcome = Outcome(name, FAIL, f"raised {type(error).__name__}: {' '.join(str(error).split())[:200]}")
            report.outcomes.append(dataclasses.replace(outcome, name=name))
        report.capabilities = capabilities(model, examples[0])
    report.warnings = list(dict.fromkeys(" ".join(str(warning.message).split()) for warning in caught))
    report.layout = token_layout(model, examples[0])
    return report


def default_examples(model: Model, n: int) -> list[Example]:
    """The first `n` questions of the embedded test split that come with object boxes, prepared for `model`."""
    dataset = load_questions(None, "test")
    rows = [row for row in dataset.select(range(min(len(dataset), 200))) if row.get("object_boxes")][:n]
    return [model.prepare(row["image"].convert("RGB"), row["question"],
                          boxes=[tuple(float(v) for v in box) for box in row["object_boxes"] if len(box) == 4])
            for row in rows]


def kind(model: Model) -> str:
    """"float32" or "half": which `TOLERANCE` applies."""
    return "float32" if model.hf.dtype == torch.float32 else "half"


def bounded(name: str, measured: float, bound: float, what: str) -> Outcome:
    """Pass when `measured` ≤ `bound` (and is a number)."""
    ok = measured == measured and measured <= bound
    return Outcome(name, PASS if ok else FAIL, f"{what} {measured:.2e} (≤ {bound:.0e})", measured, bound)


def clean_forward(model: Model, examples: Sequence[Example]) -> Outcome:
    """mmscope's traced forward against `model.hf(**inputs)`: the last position's logits."""
    worst, scale = 0.0, 1.0
    for example in examples:
        ours = model.run(example)[0]
        with torch.no_grad():
            theirs = model.hf(**model.model_inputs(example)).logits[0, example.layout["last"][0]].float()
        worst = max(worst, (ours - theirs.to(ours.device)).abs().max().item())
        scale = max(scale, theirs.abs().max().item())
    bound = TOLERANCE[kind(model)]["logits"] * scale
    return bounded("", worst, bound, "max |Δlogit| against model.hf(...)")


def empty_edit(model: Model, examples: Sequence[Example]) -> Outcome:
    """`next_token_probs(example, [])`, and a sweep variant with no interventions (both engines), against the
    model's own softmax."""
    worst = 0.0
    for example in examples:
        with torch.no_grad():
            theirs = model.hf(**model.model_inputs(example)).logits[0, example.layout["last"][0]].float().softmax(-1)
        ours = [model.next_token_probs(example, [])]
        for engine in ("prefix", "naive"):
            clean, probs = run_variants(model, example, [Variant(("empty",), ())], engine=engine)
            ours += [clean.probs, probs[0]]
        worst = max(worst, *((one.to(theirs.device) - theirs).abs().max().item() for one in ours))
    return bounded("", worst, TOLERANCE[kind(model)]["probs"], "max |Δp| against the model's own forward")


def groups_decode(model: Model, examples: Sequence[Example]) -> Outcome:
    """The question group decodes to exactly the question (as the tokenizer writes it back); `last` is the
    prompt's last token. (The image group is `image_tokens`'.)"""
    for index, example in enumerate(examples):
        ids = example.inputs["input_ids"][0]
        asked = example.meta[0].get("question")
        decoded = written(model, ids[example.positions("question", 0)].tolist())
        if asked is not None and decoded != written(model, model.tokenizer(asked.strip(), add_special_tokens=False)
                                                    ["input_ids"]):
            return Outcome("", FAIL, f"example {index}: the question group decodes to {decoded!r}, the question "
                                     f"is {asked.strip()!r}")
        last = example.positions("last", 0)
        if last.tolist() != [example.seq_len - 1]:
            return Outcome("", FAIL, f"example {index}: `last` is position {last.tolist()}, the prompt ends at "
                                     f"{example.seq_len - 1}")
    return Outcome("", PASS, f"{len(examples)} examples: the question group decodes to the question, last = the "
                             "prompt's last token")


def written(model: Model, tokens: Sequence[int]) -> str:
    """Tokens decoded, spaces normalised: a text as the tokenizer writes it back (a lower-casing tokenizer's
    question reads lower case; a BPE's, as asked)."""
    return " ".join(model.tokenizer.decode(tokens).split())


def image_tokens(model: Model, examples: Sequence[Example]) -> Outcome:
    """The image group against where the decoder's input embeddings differ from the token embeddings."""
    embed = model.hf.get_input_embeddings()
    for index, example in enumerate(examples):
        run = clean_pass(model, example)
        if run.embeds is None:
            return Outcome("", NOT_APPLICABLE, "the decoder is not handed input embeddings: nothing to compare")
        ids = example.inputs["input_ids"][0].to(embed.weight.device)
        with torch.no_grad():
            tokens = embed(ids.clamp(max=embed.weight.shape[0] - 1))
        written = (run.embeds[0].to(tokens.device) != tokens).any(-1)
        written &= example.inputs["attention_mask"][0].to(written.device).bool()
        found = torch.nonzero(written).flatten().cpu()
        ours = example.positions("image", 0)
        if not torch.equal(found, ours):
            return Outcome("", FAIL, f"example {index}: image group holds {len(ours)} positions, the model wrote "
                                     f"image features at {len(found)} (first difference at "
                                     f"{first_difference(found.tolist(), ours.tolist())})", len(found), len(ours))
    return Outcome("", PASS, f"{len(examples[0].layout['image'])} image tokens in the first example = the positions "
                             "holding the model's image features (every example)")


def first_difference(first: list[int], second: list[int]) -> str:
    for a, b in zip(first, second, strict=False):
        if a != b:
            return f"position {min(a, b)}"
    return f"position {(first if len(first) > len(second) else second)[min(len(first), len(second))]}"


def batched_rows(model: Model, examples: Sequence[Example]) -> Outcome:
    """A left-padded batch of the examples against each alone."""
    batch = model.batch(list(examples))
    together = model.next_token_probs(batch)
    worst = max((together[row] - model.next_token_probs(example)).abs().max().item()
                for row, example in enumerate(examples))
    lengths = sorted({example.seq_len for example in examples})
    padded = padded_pixels(batch, examples)
    if padded and worst > TOLERANCE[kind(model)]["probs"]:
        return Outcome("", FAIL, f"max |Δp| {worst:.2e} (≤ {TOLERANCE[kind(model)]['probs']:.0e}); the batch pads "
                                 f"pixel_values to {padded} and the image encoder reads the padding: batch only "
                                 "images of one size (or answer one by one)", worst)
    if len(lengths) == 1:
        said = f"max |Δp| {worst:.2e} (all prompts of {lengths[0]} tokens: no padding exercised)"
        return Outcome("", PASS if worst <= TOLERANCE[kind(model)]["probs"] else FAIL, said, worst)
    return bounded("", worst, TOLERANCE[kind(model)]["probs"], f"{len(lengths)} lengths padded together: max |Δp|")


def padded_pixels(batch: Example, examples: Sequence[Example]) -> tuple[int, ...] | None:
    """The batch's pixel_values size where it differs from some row's own (the processor padded the images)."""
    pixels = batch.inputs.get("pixel_values")
    if pixels is None or pixels.dim() < 3:
        return None
    own = {tuple(example.inputs["pixel_values"].shape[-2:]) for example in examples}
    return tuple(pixels.shape[-2:]) if own != {tuple(pixels.shape[-2:])} else None


@contextlib.contextmanager
def attention_as(model: Model, name: str) -> Iterator[str | None]:
    """Run the block with the model's attention implementation switched to `name` in place, and back after;
    yields None, or why the model cannot switch (the block then runs unswitched)."""
    current = model.adapter.text_config._attn_implementation
    if current == name:
        yield None
        return
    try:
        model.hf.set_attn_implementation(name)
    except (ValueError, ImportError, AttributeError) as error:
        yield f"the family cannot switch to {name}: {str(error).splitlines()[0][:120]}"
        return
    try:
        switched = model.adapter.text_config._attn_implementation == name
        yield None if switched else f"{type(model.hf).__name__} cannot switch to {name} in place"
    finally:
        model.hf.set_attn_implementation(current)


def eager_sdpa(model: Model, examples: Sequence[Example]) -> Outcome:
    """The probabilities under the other attention implementation (switched in place, then back)."""
    current = model.adapter.text_config._attn_implementation
    other = "sdpa" if current == "eager" else "eager"
    before = [model.next_token_probs(example) for example in examples]
    with attention_as(model, other) as refused:
        if refused:
            return Outcome("", NOT_APPLICABLE, refused)
        after = [model.next_token_probs(example) for example in examples]
    worst = max((a - b).abs().max().item() for a, b in zip(before, after, strict=True))
    return bounded("", worst, TOLERANCE[kind(model)]["probs"], f"{current} against {other}: max |Δp|")


def knockout_blocks(model: Model, examples: Sequence[Example]) -> Outcome:
    """Under image → last blocked in every layer, eager attention gives the last position no weight on any image
    position in any layer, and each of its rows still sums to 1 (the mask holds the dtype's minimum there)."""
    with attention_as(model, "eager") as refused:
        if refused:
            current = model.adapter.text_config._attn_implementation
            return Outcome("", NOT_APPLICABLE, f"{current} attention gives no weights, and {refused}")
        return blocked_weights(model, examples)


def blocked_weights(model: Model, examples: Sequence[Example]) -> Outcome:
    """`knockout_blocks` under eager attention."""
    everywhere = Knockout("image", "last", tuple(range(model.n_layers)))
    leaked, off = 0.0, 0.0
    for example in examples:
        last, image = example.positions("last", 0), example.positions("image", 0)

        def readout(ctx) -> torch.Tensor:
            return torch.stack([ctx.attention_weights(layer)[0, :, last[0]].float().to(model.device)
                                for layer in range(model.n_layers)])  # [L, H, K]

        weights = model.run(example, [everywhere], readout)
        leaked = max(leaked, weights[..., image].abs().max().item())
        off = max(off, (weights.sum(-1) - 1).abs().max().item())
    bound = TOLERANCE[kind(model)]["probs"]
    ok = leaked <= bound and off <= 100 * bound
    return Outcome("", PASS if ok else FAIL, f"largest attention weight left from last to an image position "
                                             f"{leaked:.2e} (≤ {bound:.0e}); rows sum to 1 within {off:.1e}",
                   leaked, bound)


def knockout_moves(model: Model, examples: Sequence[Example]) -> Outcome:
    """Blocking image → last in every layer changes p(answer) on some example; no probability is NaN."""
    everywhere = Knockout("image", "last", tuple(range(model.n_layers)))
    largest = 0.0
    for example in examples:
        clean = model.next_token_probs(example)
        blocked = model.next_token_probs(example, [everywhere])
        if not (torch.isfinite(clean).all() and torch.isfinite(blocked).all()):
            return Outcome("", FAIL, "a probability is NaN or infinite under the knockout")
        token = int(clean.argmax())
        largest = max(largest, abs(blocked[token] - clean[token]).item() / clean[token].item())
    bound = 10 * TOLERANCE[kind(model)]["probs"]
    ok = largest > bound
    return Outcome("", PASS if ok else FAIL, f"largest |Δp|/p of the greedy answer {largest:.2e} (must exceed "
                                             f"{bound:.0e}: else the knockout does nothing); no NaN", largest, bound)


def sample_variants(model: Model, example: Example) -> list[Variant]:
    """The study's flows the example holds, at the first, middle and last centre, knockout's default window."""
    window = default_window(model.n_layers)
    centers = sorted({0, model.n_layers // 2, model.n_layers - 1})
    flows = [Flow.parse(flow) for flow in STUDY_FLOWS]
    return [Variant((flow.name, center), (flow.knockout(knockout_window(center, window, model.n_layers)),))
            for flow in flows if flow.source in example.layout and flow.target in example.layout
            for center in centers]


def engine_naive(model: Model, examples: Sequence[Example]) -> Outcome:
    """The prefix engine against one full forward per variant."""
    worst, count = 0.0, 0
    for example in examples:
        variants = sample_variants(model, example)
        _, ours = run_variants(model, example, variants)
        _, theirs = run_variants(model, example, variants, engine="naive")
        worst = max(worst, (ours - theirs).abs().max().item())
        count += len(variants)
    return bounded("", worst, TOLERANCE[kind(model)]["probs"], f"{count} variants: max |Δp|")


def cached_greedy(model: Model, examples: Sequence[Example]) -> Outcome:
    """Greedy tokens with a key/value cache against one full forward per token."""
    if model.adapter.forward_position_ids(examples[0].inputs) is None:
        return Outcome("", NOT_APPLICABLE, "the family decodes without a cache (every step a full forward)")
    for index, example in enumerate(examples):
        cached = model.generate_tokens(example, max_new_tokens=4)
        uncached = model._greedy(example, model._uncached_steps(example, ()), 4)
        if cached != uncached:
            return Outcome("", FAIL, f"example {index}: cached {cached[0]} ≠ uncached {uncached[0]}")
    return Outcome("", PASS, f"{len(examples)} examples × 4 tokens equal")


def converted(model: Model, dtype: torch.dtype) -> Model:
    """A copy of `model` in `dtype` (same adapter, processor and preprocessing)."""
    adapter = copy.copy(model.adapter)
    adapter.model = copy.deepcopy(model.hf).to(dtype)
    return Model(adapter, name=f"{model.name} ({str(dtype).removeprefix('torch.')})")


def half_precision(model: Model, examples: Sequence[Example], half: str | None) -> Outcome:
    """The engine in half precision against a float32 naive loop, on `sample_variants`."""
    if model.hf.dtype == torch.float32:
        if half is None:
            return Outcome("", NOT_APPLICABLE, "skipped (--half none)")
        reference, halved = model, converted(model, getattr(torch, half))
    else:
        reference, halved = converted(model, torch.float32), model
    p_diff, dp_diff = [], []
    for example in examples:
        variants = sample_variants(model, example)
        clean, truth = run_variants(reference, example, variants, engine="naive")
        token = int(clean.probs.argmax())
        half_clean, ours = run_variants(halved, example, variants)
        p_diff.append((ours[:, token].double() - truth[:, token].double()).abs())
        delta = (truth[:, token].double() - clean.probs[token].double()) / clean.probs[token].double() * 100
        half_delta = (ours[:, token].double() - half_clean.probs[token].double()) / half_clean.probs[token].double()
        dp_diff.append((half_delta * 100 - delta).abs())
    p_diff, dp_diff = torch.cat(p_diff), torch.cat(dp_diff)
    max_dp, median = p_diff.max().item(), dp_diff.median().item()
    ok = max_dp <= HALF_TOLERANCE["max_dp"] and median <= HALF_TOLERANCE["median_ddp_pct"]
    said = (f"{str(halved.hf.dtype).removeprefix('torch.')} engine vs float32 naive, {len(p_diff)} variants: max "
            f"|Δp| {max_dp:.2e} (≤ {HALF_TOLERANCE['max_dp']:.0e}), median |ΔΔp%| {median:.3f} pp (≤ "
            f"{HALF_TOLERANCE['median_ddp_pct']}), max |ΔΔp%| {dp_diff.max().item():.3f} pp")
    return Outcome("", PASS if ok else FAIL, said, max_dp, HALF_TOLERANCE["max_dp"])


def capabilities(model: Model, example: Example) -> dict[str, str]:
    """What mmscope can do with `model`, and one forward's time and memory."""
    adapter = model.adapter
    config = adapter.text_config
    devices = sorted({str(parameter.device) for parameter in model.hf.parameters()})
    vision = "not reachable (the family exposes no vision layers)"
    if adapter.vision_layers is not None:
        vision = f"{len(model.sites.vision_layers('check'))} layers (vision_residual, vision_attention, vision_mlp)"
    run = clean_pass(model, example)
    sharing = "every variant runs as a full forward (no prefix can be shared)"
    if run.shared and run.suffix_starts.any():
        start = latest_start(run, int(example.positions("question", 0)[0]), last_position(example))
        sharing = (f"suffix passes share a clean prefix: an edit of the question onward recomputes "
                   f"{example.seq_len - start} of {example.seq_len} positions" if start else
                   "every variant that reaches the question runs as a full forward")
    model.next_token_probs(example)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    model.next_token_probs(example)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        memory = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above the weights (CUDA peak)"
    else:
        memory = f"process peak resident {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
    seconds = time.perf_counter() - started
    return {
        "family": f"{adapter.family} ({type(model.hf).__name__}, adapter {type(adapter).__name__})",
        "attention": config._attn_implementation,
        "dtype": str(model.hf.dtype).removeprefix("torch."),
        "devices": ", ".join(devices),
        "decoder": f"{model.n_layers} layers × {model.n_heads} heads, width {config.hidden_size} (residual, "
                   "attention, mlp)",
        "vision tower": vision,
        "projector": adapter.projector or "not reachable",
        "experiments": "knockout, patch, truncate, lens, map, probe" + ("" if adapter.vision_layers else
                                                                          " (no vision-tower sites)"),
        "sweep engine": sharing,
        "one forward": f"{seconds * 1000:.0f} ms over {example.seq_len} positions; {memory}",
    }


def ranges(positions: Sequence[int]) -> str:
    """Positions as compact ranges, e.g. `5-580, 583`."""
    parts, start = [], None
    for index, position in enumerate(positions):
        if start is None:
            start = position
        if index + 1 == len(positions) or positions[index + 1] != position + 1:
            parts.append(str(start) if start == position else f"{start}-{position}")
            start = None
    return ", ".join(parts)


def token_layout(model: Model, example: Example) -> list[dict]:
    """Each group of the example: its positions and decoded text (the image group as its token × count)."""
    ids = example.inputs["input_ids"][0]
    rows = []
    for group in sorted(example.layout, key=lambda name: (min(example.layout[name], default=0), name)):
        positions = example.positions(group, 0).tolist()
        tokens = ids[positions].tolist()
        if len(set(tokens)) == 1 and len(tokens) > 3:
            text = f"{model.tokenizer.decode(tokens[:1])!r} × {len(tokens)}"
        else:
            text = repr(model.tokenizer.decode(tokens))
        rows.append({"group": group, "positions": ranges(positions), "text": text[:100]})
    return rows


def check_command(options: CheckOptions, echo: Callable[[str], None]) -> None:
    """`mmscope check`: print the report; write it as JSON with --json; exit 1 if a check failed."""
    model = mmscope.load(options.model, device=options.device, dtype=options.dtype)
    examples = None
    if options.data is not None:
        dataset = load_questions(options.data, options.split, limit=None)
        rows = dataset.select(range(min(len(dataset), options.examples)))
        examples = [model.prepare(row["image"].convert("RGB"), row["question"],
                                  boxes=[tuple(float(v) for v in box) for box in row.get("object_boxes") or []
                                         if len(box) == 4]) for row in rows]
    report = check(model, examples, n_examples=options.examples, half=None if options.half == "none" else options.half)
    for line in report.lines():
        echo(line)
    if options.json is not None:
        Path(options.json).write_text(json.dumps(report.to_dict(), indent=2))
        echo(f"report: {options.json}")
    if not report.passed:
        raise SystemExit(1)

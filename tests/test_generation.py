"""Greedy answers: without interventions a key/value-cached decode (prefill, then one token per step), which must
give what the uncached loop gives — one full forward over the whole sequence per token, the path interventions
take — for every supported family, the tiny LLaVA and the embedded model.

The tiny models are random, so their answers are arbitrary token strings; what is checked is that both paths
give the same ones. Step by step (every row fed the same tokens, no stopping) the two paths' next-token logits
must agree to float rounding, so a wrong position id, token type or mask in a decode step — which need not
change an argmax — still shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES, Loaded, family_params, load_family

import mmscope
from mmscope.experiments.workspace import load_questions
from mmscope.interventions import Intervention

STEPS = 5
TOLERANCE = 1e-5  # the decode step computes in other matrix shapes than the full forward


@dataclass(frozen=True)
class LeaveAlone(Intervention):
    """An intervention that changes nothing: it sends `generate_answer` down the uncached path."""

    def apply(self, ctx) -> None:
        pass


@pytest.fixture(scope="session", params=family_params(sorted(FAMILIES)))
def loaded(request, tmp_path_factory) -> Loaded:
    return load_family(request.param, tmp_path_factory)


def forbid_cached_steps(model, monkeypatch) -> None:
    def refuse():
        raise AssertionError("the cached decode ran")

    monkeypatch.setattr(model, "_cached_steps", refuse)


def step_logits(model, batch, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both paths' next-token logits `[B, V]` at each step, every row extended by the cached path's argmax."""
    cached, uncached = model._cached_steps(), model._uncached_steps(batch, ())
    current, ours, theirs = batch, [], []
    for step in range(steps):
        ours.append(cached(current, step).float().cpu())
        theirs.append(uncached(current, step).float().cpu())
        current = model.extend(current, ours[-1].argmax(-1)[:, None])
    return ours, theirs


def check_steps(model, batch) -> None:
    ours, theirs = step_logits(model, batch)
    for step, (got, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), f"step {step}: {(got - expected).abs().max()}"
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"step {step}"
    assert not torch.allclose(ours[0][0], ours[0][1], atol=1e-4), "the two prompts must get different logits"
    assert not torch.allclose(ours[0], ours[-1], atol=1e-4), "the decode steps must get other logits than the prefill"


def test_cached_decode_steps_give_the_uncached_logits_on_a_left_padded_batch(loaded):
    first, second, batch = loaded.examples
    assert first.seq_len != second.seq_len  # so the batch's first row is left-padded
    check_steps(loaded.model, batch)


def test_cached_answers_equal_the_uncached_loop(loaded):
    model, (first, second, batch) = loaded.model, loaded.examples
    answers = model.generate_answer(batch, max_new_tokens=6)
    assert answers == model._generate_uncached(batch, (), 6)
    assert answers == [model.generate_answer(first, max_new_tokens=6), model.generate_answer(second, max_new_tokens=6)]


def test_tiny_llava_cached_steps_and_answers_equal_the_uncached_ones(tiny, examples):
    first, second, batch = examples
    check_steps(tiny, batch)
    answers = tiny.generate_answer(batch, max_new_tokens=6)
    assert answers == tiny._generate_uncached(batch, (), 6)
    assert max(len(tiny.tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers) > 1


def test_with_an_intervention_generate_answer_runs_every_step_uncached(tiny, examples, monkeypatch):
    batch = examples[2]
    answers = tiny.generate_answer(batch, max_new_tokens=6)
    forbid_cached_steps(tiny, monkeypatch)
    assert tiny.generate_answer(batch, [LeaveAlone()], max_new_tokens=6) == answers


def test_an_adapter_that_cannot_tell_the_models_positions_answers_uncached(tiny_folder, examples, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmscope.models.generic import GenericAdapter

    hf = AutoModelForImageTextToText.from_pretrained(tiny_folder, attn_implementation="eager").eval()
    model = mmscope.Model(GenericAdapter(hf, AutoProcessor.from_pretrained(tiny_folder), model_positions=True))
    forbid_cached_steps(model, monkeypatch)
    assert model.generate_answer(examples[0], max_new_tokens=3) == model._generate_uncached(examples[0], (), 3)


def test_the_embedded_model_answers_its_questions_the_same_both_ways(embedded, world):
    questions = load_questions(world, "test", limit=1)  # one per category
    examples = [embedded.prepare(question["image"].convert("RGB"), question["question"]) for question in questions]
    batch = embedded.batch(examples)
    assert len({example.seq_len for example in examples}) > 1, "the batch must be left-padded"
    answers = embedded.generate_answer(batch, max_new_tokens=4)
    assert answers == embedded._generate_uncached(batch, (), 4)
    assert [embedded.generate_answer(example, max_new_tokens=4) for example in examples] == answers
    assert all(answers) and len(set(answers)) > 1
    ours, theirs = step_logits(embedded, batch, steps=3)
    assert all(torch.allclose(got, expected, atol=TOLERANCE, rtol=0) for got, expected in zip(ours, theirs))

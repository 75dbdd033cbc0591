"""`mmscope.model`: loading, the runner, the readouts and the inline trace, against plain transformers."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from conftest import scene
from oracle import LLAVA, plain_inputs, plain_model, scaled_logits

import mmscope
from mmscope.errors import ModelLoadError

TOLERANCE = 1e-6


def last_probs(logits):
    return logits[:, -1].softmax(-1)


def test_load_refuses_flash_attention_and_a_missing_folder_by_name(tiny_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="flash_attention_2.*not supported.*eager, sdpa"):
        mmscope.load(tiny_folder, attn_implementation="flash_attention_2")
    with pytest.raises(ModelLoadError, match="does not exist"):
        mmscope.load(tmp_path / "no-such-model")


def test_an_adapter_class_given_to_load_is_bound_to_the_model_and_its_processor(tiny_folder):
    from mmscope.models.llava import LlavaAdapter

    class Renamed(LlavaAdapter):
        family = "my-llava"

        @classmethod
        def load_processor(cls, source):
            processor = super().load_processor(source)
            processor.loaded_by = cls.family
            return processor

    model = mmscope.load(tiny_folder, adapter=Renamed)
    assert isinstance(model.adapter, Renamed) and model.adapter.model is model.hf
    assert model.adapter.processor is model.processor and repr(model).endswith("family=my-llava, layers=4, heads=4)")
    assert model.processor.loaded_by == "my-llava"
    partial = mmscope.load(tiny_folder, adapter=functools.partial(Renamed))  # a partial keeps its processor loader
    assert isinstance(partial.adapter, Renamed) and partial.processor.loaded_by == "my-llava"


def test_a_model_running_flash_attention_is_refused(tiny_folder):
    hf = plain_model(tiny_folder)
    processor = mmscope.load(tiny_folder).processor
    hf.config.text_config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ModelLoadError, match="flash_attention_2"):
            mmscope.Model(mmscope.models.adapter_for(hf)(hf, processor))
    finally:
        hf.config.text_config._attn_implementation_internal = "eager"


def test_hidden_states_and_lens_read_the_same_output(tiny, examples):
    first = examples[0]
    states = tiny.hidden_states(first)
    assert states.shape[:2] == (tiny.n_layers + 1, 1)
    logits = tiny.unembed(states[-1, 0, -1])
    assert torch.allclose(logits.softmax(-1), tiny.next_token_probs(first), atol=1e-6)


def test_empty_intervention_list_equals_plain_hf_forward(tiny, tiny_folder, examples):
    batch = examples[2]
    with torch.no_grad():
        expected = last_probs(plain_model(tiny_folder)(**plain_inputs(LLAVA, batch.inputs)).logits)
    assert torch.equal(tiny.next_token_probs(batch), expected)


def test_answer_scores_match_teacher_forcing_by_hand(tiny, tiny_folder, examples):
    first = examples[0]
    score = tiny.answer_prob(first, "red or blue")
    tokens = tiny.answer_tokens(first, "red or blue")[0]
    assert len(tokens) == 3
    inputs = dict(first.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logprobs = plain_model(tiny_folder)(**inputs).logits[0].log_softmax(-1)
    start = first.seq_len - 1
    expected = sum(logprobs[start + i, token] for i, token in enumerate(tokens))
    assert torch.allclose(score.logprob[0], expected, atol=1e-5)
    assert torch.allclose(score.first_token_prob[0], tiny.next_token_probs(first)[tokens[0]], atol=TOLERANCE)


def test_greedy_answer_equals_hf_generate(tiny, tiny_folder, examples):
    first = examples[0]
    with torch.no_grad():
        ids = plain_model(tiny_folder).generate(**first.inputs, max_new_tokens=3, do_sample=False)
    expected = tiny.tokenizer.decode(ids[0, first.seq_len :], skip_special_tokens=True).strip()
    assert tiny.generate_answer(first, max_new_tokens=3) == expected


def test_the_inline_trace_yields_the_context_and_matches_an_independent_hook(tiny, tiny_folder, examples):
    batch = examples[2]
    with tiny.trace(batch) as ctx:
        ctx.residual(1)[ctx.positions("image")] *= 0.5
        probs = ctx.logits()[:, -1].softmax(-1).save()
    images = [layout["image"] for layout in batch.layouts]
    expected = last_probs(scaled_logits(LLAVA, plain_model(tiny_folder), batch.inputs, 1, images, 0.5))
    assert torch.allclose(probs, expected, atol=TOLERANCE)
    assert not torch.allclose(probs, tiny.next_token_probs(batch), atol=1e-4)


# --- hub ids without a network --------------------------------------------------------------------------------------
@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A hub endpoint nothing listens on (the connection is refused at once) and an empty hub cache."""
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_id_out_of_reach_is_refused_at_once_naming_the_way_out(unreachable_hub):
    with pytest.raises(ModelLoadError) as error:
        mmscope.load("someone/llava-7b")
    message = str(error.value)
    assert "\n" not in message and "someone/llava-7b" in message
    assert "http://127.0.0.1:9" in message and "cannot be reached" in message
    assert "save_pretrained folder" in message and "HF_HUB_OFFLINE=1" in message


def test_a_hub_id_out_of_reach_loads_its_cached_copy(unreachable_hub, tiny_folder, tiny):
    snapshot = unreachable_hub / "models--someone--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    cached = mmscope.load("someone/tiny-llava")
    example = cached.prepare(scene(), "Is the cube red or blue?")
    assert torch.equal(cached.next_token_probs(example), tiny.next_token_probs(tiny.prepare(scene(), example.meta[0]["question"])))

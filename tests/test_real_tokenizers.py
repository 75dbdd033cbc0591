"""Where text meets tokens, on real tokenizers: SmolLM2's byte-level BPE and Mistral's SentencePiece model
(tests/data/tokenizers), in tiny random checkpoints of LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3 and Gemma 3, each
with its family's own prompt template.

Word-level tokenizers give the same id to `Red` and ` Red`; these do not. After a prompt that ends in `:` or
`\\n` a model may write its answer with or without a leading space, and only the id it writes may be scored.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import scene
from families import QUESTIONS, REAL_BUILDERS
from oracle import LLAVA, plain_model, study_knockout
from test_study_preprocessing import tokenizer_image_token
from typer.testing import CliRunner

import mmscope
from mmscope.cli import app
from mmscope.experiments.answers import clean_answer
from mmscope.experiments.knockout import KnockoutOptions
from mmscope.experiments.runner import example_of, questions
from mmscope.models.preprocessing import Preprocessing
from mmscope.prompts import LLAVA_15

SCENES = ((40, 30, 1), (30, 50, 2), (48, 48, 3), (36, 44, 4))
_built: dict = {}


def built(name: str, tmp_path_factory):
    if name not in _built:
        folder = REAL_BUILDERS[name](tmp_path_factory.mktemp(name))
        _built[name] = (folder, mmscope.load(folder))
    return _built[name]


@pytest.fixture(scope="module", params=sorted(REAL_BUILDERS))
def real(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def examples_of(model) -> list:
    """Every question on every scene: 8 prompts, enough that some greedy answers start without a space."""
    return [model.prepare(scene(width, height, seed=seed), question)
            for width, height, seed in SCENES for question in QUESTIONS]


def leading_space(tokenizer, token: int) -> bool:
    """Whether a token's own string starts with a space marker (BPE `Ġ`, SentencePiece `▁`) — read off the
    vocabulary, not through mmscope."""
    return tokenizer.convert_ids_to_tokens(token)[:1] in ("Ġ", "▁", " ")


def test_the_scored_token_is_the_first_token_the_model_writes(real):
    folder, model = real
    plain = plain_model(folder)
    scored, written = [], []
    for example in examples_of(model):
        with torch.no_grad():
            ids = plain.generate(**example.inputs, max_new_tokens=1, do_sample=False)
        written.append(int(ids[0, example.seq_len]))
        scored.append(clean_answer(model, example, "red").first_token)
    assert scored == written, model.tokenizer.convert_ids_to_tokens(written)


def test_the_question_group_decodes_to_exactly_the_question(real):
    _, model = real
    for example, question in zip(examples_of(model)[:2], QUESTIONS, strict=True):
        ids = example.inputs["input_ids"][0]
        assert model.tokenizer.decode(ids[example.layout["question"]]) == question


def test_the_object_word_group_decodes_to_the_object_names(real):
    _, model = real
    for question, names, spelt in (("Are there any cubes or cones that are red?", ["cube", "cone"], ["cubes", "cones"]),
                                   ("Is the cylinder to the left of the Sphere?", ["sphere", "cylinder"],
                                    ["cylinder", "Sphere"])):
        example = model.prepare(scene(40, 30, 1), question, words=names)
        ids = example.inputs["input_ids"][0]
        positions = example.layout["object_word"]
        assert model.tokenizer.decode(ids[positions]).split() == spelt
        assert set(positions) <= set(example.layout["question"])


def test_gold_answers_are_written_as_the_model_writes_its_first_token(real):
    """A label's token follows the model's own convention: with a leading space where its greedy first token has
    one, without where it has none — measured per prompt, never by a decode → re-tokenise round trip."""
    _, model = real
    tokenizer = model.tokenizer
    for example in examples_of(model)[:4]:
        first = int(model.next_token_probs(example).argmax())
        token = model.answer_tokens(example, "Red")[0][0]
        spelled = tokenizer.convert_ids_to_tokens(token)
        assert spelled.lstrip("Ġ▁") == "Red"
        assert leading_space(tokenizer, token) == leading_space(tokenizer, first), (spelled, first)
        for space in (True, False):
            token = model.answer_tokens(example, "Red", leading_space=space)[0][0]
            assert leading_space(tokenizer, token) == space


@pytest.mark.parametrize("name", ["llava-bpe", "llava-sentencepiece"])
def test_study_chunks_tokenise_as_llavas_tokenizer_image_token_on_a_real_tokenizer(name, tmp_path_factory):
    folder, _ = built(name, tmp_path_factory)
    model = mmscope.load(folder, preprocessing=Preprocessing(prompt_chunks=True))
    for question in QUESTIONS:
        example = model.prepare(scene(seed=7), question)
        prompt, _ = LLAVA_15.render(question, "<image>")
        image_id = model.adapter.image_token_id
        n_image = len(example.layout["image"])
        assert example.inputs["input_ids"][0].tolist() == tokenizer_image_token(prompt, model.tokenizer,
                                                                                [image_id] * n_image)
        assert model.tokenizer.decode(example.inputs["input_ids"][0, example.layout["question"]]) == question


def test_a_study_knockout_sweep_on_a_real_bpe_equals_the_studys_loop_scoring_the_first_greedy_token(
        tmp_path_factory, world, tmp_path):
    """`mmscope knockout --protocol study --include-all` on the real-BPE LLaVA against an independent loop: HF
    `generate` gives the scored token, plain forward pre-hooks block the flows."""
    folder, _ = built("llava-bpe", tmp_path_factory)
    result = CliRunner().invoke(app, ["knockout", "--model", str(folder), "--data", str(world), "--protocol", "study",
                                      "--include-all", "--window", "2", "--limit", "2", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "results.parquet")
    model = mmscope.load(folder, preprocessing=Preprocessing.study())
    options = KnockoutOptions(data=str(world), limit=2)
    data = questions(options)
    flows = sorted(table["flow"].unique())
    firsts = []
    for index, part in table.groupby("example"):
        example = example_of(model, data[int(index)], options.seed)
        groups = {group: example.positions(group, 0).tolist() for group in example.groups()}
        loop = study_knockout(LLAVA, plain_model(folder), model.model_inputs(example), groups, flows, 2)
        firsts.append(loop["token"])
        for _, row in part.iterrows():
            p_clean, delta = loop["values"][row["flow"], row["center"]]
            assert row["p_clean"] == pytest.approx(p_clean, rel=1e-4)
            assert row["delta_pct"] == pytest.approx(delta, abs=5e-3), (row["flow"], row["center"])
    assert {leading_space(model.tokenizer, token) for token in firsts} == {True, False}

"""The study protocol's knobs that live in the experiments: answers, confidence bands, the lens's tokens and axis,
the default window, the reference overlay — each against an independent computation.

The lens tests run on a tiny LLaVA with a case-sensitive tokenizer whose weights are set so that its greedy
answer is the capitalised "Red" (then end of sequence): the lens must track the lower-case gold answer as well.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import scene
from families import BUILDERS, word_tokenizer
from typer.testing import CliRunner

import mmscope
from mmscope.cli import app
from mmscope.experiments.answers import clean_answer, normalise
from mmscope.experiments.knockout import KnockoutOptions, default_window, knockout_findings
from mmscope.experiments.lens import LensOptions, lens_probs, tracked_tokens
from mmscope.experiments.options import OptionError
from mmscope.experiments.protocol import PROTOCOLS
from mmscope.experiments.references import REFERENCES, read_reference
from mmscope.experiments.runs import summarize
from mmscope import Preprocessing
from mmscope.errors import InputError, UnsupportedModelError
from mmscope.prompts import LLAVA_SYSTEM_PROMPT, LLAVA_TEMPLATE
from mmscope.zoo.build import TinyLlavaSpec, build_llava, save_llava

runner = CliRunner()
QUESTION = "Is the cube red or blue?"


@pytest.fixture(scope="module")
def capitalising_folder(tmp_path_factory):
    """A tiny LLaVA whose case-sensitive tokenizer knows "red" and "Red", and whose greedy answer to anything is
    "Red" then end of sequence: residual dimension 0 is held at 5 everywhere (embeddings, projector bias, no
    layer writes it) and votes for "Red"; dimension 1 is 50 only at a "Red" token and votes for "</s>"."""
    texts = [LLAVA_SYSTEM_PROMPT, LLAVA_TEMPLATE.replace("{question}", " "), QUESTION, "Red Blue red blue"]
    tokenizer = word_tokenizer(texts, ["<image>"], bos="<s>", add_bos=True, lowercase=False,
                               extra_special_tokens={"image_token": "<image>"})
    model, processor = build_llava(tokenizer, TinyLlavaSpec(), seed=0)
    red, eos = tokenizer.convert_tokens_to_ids("Red"), tokenizer.eos_token_id
    with torch.no_grad():
        language = model.model.language_model
        language.embed_tokens.weight[:, 0] = 5.0
        language.embed_tokens.weight[:, 1] = 0.0
        language.embed_tokens.weight[red, 1] = 50.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight[:2] = 0.0
        projector.bias[:2] = torch.tensor([5.0, 0.0])
        for layer in language.layers:
            layer.self_attn.o_proj.weight[:2] = 0.0
            layer.mlp.down_proj.weight[:2] = 0.0
        model.lm_head.weight[:, :2] = 0.0
        model.lm_head.weight[red, 0] = 1000.0
        model.lm_head.weight[red, 1] = -1000.0
        model.lm_head.weight[eos, 1] = 1000.0
    return save_llava(model, processor, tmp_path_factory.mktemp("capitalising-llava"))


@pytest.fixture(scope="module")
def capitalising(capitalising_folder):
    return mmscope.load(capitalising_folder)


# --- answers -----------------------------------------------------------------------------------------------------
def test_answer_match_lower_is_the_studys_strip_lower_and_lenient_also_drops_a_final_full_stop():
    assert normalise(" Red. ", "lenient") == "red" and normalise(" Red. ", "lower") == "red."
    assert normalise("Red", "lower") == "red" == normalise("red ", "lower")
    with pytest.raises(ValueError, match="unknown answer match 'exact'"):
        normalise("red", "exact")


def test_the_capitalised_greedy_answer_counts_as_correct_and_stops_at_eos(capitalising):
    example = capitalising.prepare(scene(), QUESTION)
    answer = clean_answer(capitalising, example, "red", max_new_tokens=128, match="lower")
    assert (answer.text, answer.correct) == ("Red", True)
    assert answer.first_token == capitalising.tokenizer.convert_tokens_to_ids("Red")


# --- confidence bands --------------------------------------------------------------------------------------------
def percentile_bootstrap(values: np.ndarray, generator: np.random.Generator, samples: int = 1000):
    """seaborn's default error band, written out: resample with replacement, mean, 2.5th/97.5th percentile."""
    means = []
    for _ in range(samples):
        means.append(values[generator.integers(0, len(values), size=len(values))].mean())
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_bootstrap_band_is_the_percentile_bootstrap_of_the_mean_and_is_seeded():
    rng = np.random.default_rng(7)
    table = pd.DataFrame({"group": ["a"] * 40 + ["b"] * 25, "value": rng.normal(size=65) * 10})
    summary = summarize(table, ["group"], "value", ci="bootstrap", seed=3)
    # The resamples are drawn group after group from one seeded generator, one [samples, n] draw per group.
    generator = np.random.default_rng(3)
    for group in ("a", "b"):
        values = table[table["group"] == group]["value"].to_numpy()
        draws = generator.integers(0, len(values), size=(1000, len(values)))
        expected = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
        row = summary[summary["group"] == group].iloc[0]
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(expected), abs=1e-12)
        assert row["mean"] == pytest.approx(values.mean())
    assert summarize(table, ["group"], "value", ci="bootstrap", seed=3).equals(summary)
    assert not summarize(table, ["group"], "value", ci="bootstrap", seed=4).equals(summary)


def test_bootstrap_band_agrees_with_the_normal_band_on_normal_data():
    values = np.random.default_rng(0).normal(size=400)
    table = pd.DataFrame({"group": ["a"] * 400, "value": values})
    bootstrap = summarize(table, ["group"], "value", ci="bootstrap").iloc[0]
    normal = summarize(table, ["group"], "value", ci="normal").iloc[0]
    loop = percentile_bootstrap(values, np.random.default_rng(1))  # another stream: the same band, up to noise
    width = normal["ci_high"] - normal["ci_low"]
    assert bootstrap["ci_high"] - bootstrap["ci_low"] == pytest.approx(width, rel=0.15)
    assert loop[1] - loop[0] == pytest.approx(width, rel=0.15)
    assert bootstrap["ci_low"] < values.mean() < bootstrap["ci_high"]


# --- the lens ----------------------------------------------------------------------------------------------------
def test_lens_tracks_both_cases_of_the_gold_answer_and_false_option_whatever_the_model_writes(capitalising):
    example = capitalising.prepare(scene(), QUESTION)
    tokens = tracked_tokens(capitalising, example, {"answer": "red", "false_option": "Blue"})
    ids = capitalising.tokenizer.convert_tokens_to_ids
    assert tokens == {"answer": ids("red"), "Answer": ids("Red"), "false_option": ids("blue"),
                      "False_option": ids("Blue")}
    assert len(set(tokens.values())) == 4  # a case-sensitive tokenizer: four curves
    assert set(tracked_tokens(capitalising, example, {"answer": "red"})) == {"answer", "Answer"}


def test_hidden_states_axis_is_transformers_hidden_states_raw_below_the_top_and_the_models_output_on_top(
        capitalising):
    example = capitalising.prepare(scene(), QUESTION)
    hf = capitalising.hf
    with torch.no_grad():
        output = hf(**{key: value for key, value in example.inputs.items()}, output_hidden_states=True)
    hidden = torch.stack(output.hidden_states)[:, 0, -1]  # [L + 1, D]: embeddings … final-normed
    assert len(hidden) == capitalising.n_layers + 1
    expected = torch.cat([hf.lm_head(hidden[:-1]), output.logits[0, -1:]]).float().softmax(-1)
    study = lens_probs(capitalising, example, "raw", "hidden-states")
    assert study.shape == (capitalising.n_layers + 1, hf.config.text_config.vocab_size)
    torch.testing.assert_close(study, expected, atol=1e-5, rtol=1e-4)
    # The default axis: after each decoder layer, un-normed (its top point is not the model's output).
    layers = lens_probs(capitalising, example, "raw", "layers")
    last_raw = hf.lm_head(_last_layer_output(hf, example))
    torch.testing.assert_close(layers[:-1], expected[1:-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layers[-1], last_raw.float().softmax(-1), atol=1e-5, rtol=1e-4)


def _last_layer_output(hf, example) -> torch.Tensor:
    """The last decoder layer's output at the last position, read by a forward hook (before the final norm)."""
    seen = {}
    handle = hf.model.language_model.layers[-1].register_forward_hook(
        lambda module, args, output: seen.setdefault("out", output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            hf(**example.inputs)
    finally:
        handle.remove()
    return seen["out"][0, -1]


def test_lens_command_under_the_study_protocol_keeps_a_capitalised_answer_and_shows_both_curves(
        capitalising, capitalising_folder, tmp_path):
    image = tmp_path / "scene.png"
    scene().save(image)
    pd.DataFrame({"image": [str(image)], "question": [QUESTION], "answer": ["red"], "category": ["ChooseAttr"]}
                 ).to_csv(tmp_path / "questions.csv", index=False)
    out = tmp_path / "lens"
    result = runner.invoke(app, ["lens", "--model", str(capitalising_folder), "--data", str(tmp_path / "questions.csv"),
                                 "--protocol", "study", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 examples used, 0 skipped" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())["options"]
    assert {key: config[key] for key in ("protocol", "answer_tokens", "answer_match", "ci", "lens", "lens_axis")} == {
        "protocol": "study", "answer_tokens": 128, "answer_match": "lower", "ci": "bootstrap", "lens": "raw",
        "lens_axis": "hidden-states"}
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["generated"]) == {"Red"}
    assert sorted(table["token"].unique()) == ["Answer", "answer"]
    assert sorted(table["layer"].unique()) == list(range(-1, capitalising.n_layers))  # the embeddings are -1
    top = table[table["layer"] == capitalising.n_layers - 1].set_index("token")["prob"]
    assert top["Answer"] > 0.99 and top["answer"] < 0.01  # the model's own output says "Red"


# --- the protocol switch -----------------------------------------------------------------------------------------
def test_protocol_fills_only_the_knobs_not_given_and_unknown_values_are_refused(tiny_folder):
    model = mmscope.load(tiny_folder)  # its own: configure sets how the model prepares inputs
    options, lines = KnockoutOptions(protocol="study", ci="normal").configure(model)
    assert model.preprocessing == Preprocessing.study()
    assert (options.object_patches, options.image_padding, options.tokenisation) == ("red-mask", "square", "chunks")
    study = PROTOCOLS["study"]
    assert (options.answer_tokens, options.answer_match, options.ci) == (study.answer_tokens, study.answer_match,
                                                                         "normal")
    assert lines[0].startswith("protocol study: ") and "ci normal" in lines[0]
    default, _ = LensOptions().configure(model)
    assert (default.lens, default.lens_axis, default.answer_tokens) == ("raw", "layers", 8)
    assert model.preprocessing == Preprocessing()
    KnockoutOptions(protocol="study", object_patches="overlap").configure(model)
    assert model.preprocessing == Preprocessing(square_pad=True, prompt_chunks=True, object_patches="overlap")
    with pytest.raises(OptionError, match=r"unknown protocol 'paper' \(--protocol\)"):
        KnockoutOptions(protocol="paper")
    with pytest.raises(OptionError, match=r"unknown ci 'wald' \(--ci\)"):
        KnockoutOptions(ci="wald")
    with pytest.raises(OptionError, match=r"unknown lens axis 'depth' \(--lens-axis\)"):
        LensOptions(lens_axis="depth")


def test_the_study_protocol_on_a_family_that_cannot_keeps_mmscopes_way_and_says_so(tmp_path):
    model = mmscope.load(BUILDERS["paligemma"](tmp_path / "paligemma"))
    options, lines = KnockoutOptions(protocol="study").configure(model)
    assert (options.object_patches, options.image_padding, options.tokenisation) == ("overlap", "processor", "joint")
    assert options.answer_tokens == 128 and model.preprocessing == Preprocessing()
    assert [line.split(" (")[0] for line in lines[1:4]] == ["image padding: processor", "tokenisation: joint",
                                                           "object patches: overlap"]
    assert "the paligemma family cannot do the protocol's square" in lines[1]
    with pytest.raises(UnsupportedModelError, match="paligemma"):
        KnockoutOptions(protocol="study", image_padding="square").configure(model)


def test_a_run_records_the_knobs_it_used_and_the_random_patch_control_runs_beside_the_object_flow(world, tmp_path):
    out = tmp_path / "knockout"
    result = runner.invoke(app, ["knockout", "--data", str(world), "--limit", "1", "--categories", "ChooseAttr",
                                 "--protocol", "study", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "protocol study: object patches red-mask, image padding square, tokenisation chunks" in result.stdout
    assert "object->question against its control" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())["options"]
    assert (config["object_patches"], config["window"], config["flows"][-1]) == ("red-mask", 2,
                                                                                "random_patches->question")
    table = pd.read_parquet(out / "results.parquet")
    assert {"object->question", "random_patches->question"} <= set(table["flow"])


# --- the window --------------------------------------------------------------------------------------------------
def test_default_window_is_the_studys_nine_on_deep_models_and_a_third_of_a_shallow_ones_depth(embedded):
    assert [default_window(n) for n in (1, 2, 8, 12, 16, 24, 32, 40)] == [1, 1, 2, 4, 5, 8, 9, 9]
    options, lines = KnockoutOptions().configure(embedded)
    assert options.window == default_window(embedded.n_layers) == 2
    assert any(line.startswith("window 2 (the default for 8 layers") for line in lines)
    assert dataclasses.replace(KnockoutOptions(window=5)).configure(embedded)[0].window == 5


# --- the reference overlay ---------------------------------------------------------------------------------------
def test_the_shipped_reference_is_the_studys_curve_and_is_drawn_at_relative_depth():
    (curve,) = read_reference("llava15-7b-chooseattr-question-last-w9")
    source = pd.read_csv(REFERENCES["llava15-7b-chooseattr-question-last-w9"], comment="#")
    assert (curve.category, curve.flow, curve.n_layers) == ("ChooseAttr", "question->last", 32)
    assert curve.center == tuple(range(32)) and curve.mean[10] == -46.45 == source["mean"][10]
    assert curve.centers_for(32) == list(range(32))
    assert curve.centers_for(8) == pytest.approx([c * 7 / 31 for c in range(32)])


def test_a_reference_csv_of_the_studys_own_columns_is_read_and_a_bad_one_is_refused_naming_it(tmp_path):
    plain = tmp_path / "curve.csv"
    plain.write_text("center_layer,mean_relative_change_pct\n0,0.5\n1,-3\n")
    (curve,) = read_reference(str(plain))
    assert (curve.center, curve.mean, curve.category, curve.flow) == ((0.0, 1.0), (0.5, -3.0), None, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n0,1\n")
    with pytest.raises(InputError, match=r"bad.csv \(--reference\) needs a centre column"):
        read_reference(str(bad))
    findings = knockout_findings(
        pd.DataFrame({"category": ["QueryAttr"], "flow": ["image->last"]}),
        pd.DataFrame({"category": ["QueryAttr"], "flow": ["image->last"], "center": [0], "mean": [-1.0]}),
        KnockoutOptions(reference="llava15-7b-chooseattr-question-last-w9", window=2))
    assert findings[-1] == ("reference llava15-7b-chooseattr-question-last-w9 not drawn: it is for ChooseAttr, "
                            "which this run has no panel of")
    with pytest.raises(InputError, match=r"'absent.csv' \(--reference\) is neither a CSV file nor a shipped"):
        KnockoutOptions(reference="absent.csv")

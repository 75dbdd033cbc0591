"""`mmscope check`: every check passes on the embedded model and on the tiny checkpoint of every family, and
fails, saying what it measured, on two setups broken on purpose — an adapter whose question span is off by one
token, and a knockout whose mask holds a cast boolean instead of the dtype's minimum."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from families import BUILDERS, QUESTIONS, family_params
from typer.testing import CliRunner

import mmscope
from mmscope.cli import app
from mmscope.experiments.check import FAIL, NOT_APPLICABLE, PASS
from mmscope.interventions import knockout as knockout_module
from mmscope.models.llava import LlavaAdapter
from mmscope.prompts import LLAVA_15, PromptTemplate

CHECKS = ["clean forward", "empty edit", "groups decode", "image tokens", "batched = per-row", "eager ≈ sdpa",
          "knockout blocks", "knockout moves p", "engine = naive", "cached greedy", "half precision"]


def test_check_passes_on_the_embedded_model_prints_a_line_per_check_and_writes_json(tmp_path):
    report = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["check", "--half", "float16", "--json", str(report)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in CHECKS:
        assert any(line.strip().startswith(f"pass  {name}") for line in lines), (name, result.output)
    assert "all 11 checks pass or do not apply" in result.output
    for heading in ("family", "attention", "dtype", "devices", "vision tower", "sweep engine", "one forward"):
        assert any(line.strip().startswith(heading) for line in lines), heading
    written = json.loads(report.read_text())
    assert written["passed"] and [check["name"] for check in written["checks"]] == CHECKS
    assert {row["group"] for row in written["layout"]} >= {"image", "question", "last", "object"}
    half = written["checks"][-1]
    assert half["measured"] < 1e-2 and "float16 engine vs float32 naive" in half["said"]


@pytest.fixture(scope="module", params=family_params(sorted(BUILDERS)))
def family_model(request, tmp_path_factory):
    return mmscope.load(BUILDERS[request.param](tmp_path_factory.mktemp(request.param)))


def test_check_passes_on_every_family(family_model):
    """Two prompts of different lengths over images of one size (`batched = per-row` pads the text; Emu3's image
    encoder reads padded pixels, which the next test shows the check telling)."""
    examples = [family_model.prepare(scene(40, 30, seed=1), QUESTIONS[0]),
                family_model.prepare(scene(40, 30, seed=2), QUESTIONS[1])]
    report = mmscope.check(family_model, examples)
    failed = [f"{o.name}: {o.said}" for o in report.outcomes if o.status == FAIL]
    assert report.passed and not failed, "\n".join(failed)
    statuses = {outcome.name: outcome.status for outcome in report.outcomes}
    for always in ("clean forward", "empty edit", "groups decode", "batched = per-row", "knockout moves p",
                   "engine = naive"):
        assert statuses[always] == PASS, (always, report.lines())


def test_check_tells_when_a_batch_pads_the_pixels_the_image_encoder_reads(tmp_path):
    model = mmscope.load(BUILDERS["emu3"](tmp_path / "emu3"))
    examples = [model.prepare(scene(40, 30, seed=1), QUESTIONS[0]), model.prepare(scene(30, 50, seed=2), QUESTIONS[1])]
    report = mmscope.check(model, examples, half=None)
    outcome = next(o for o in report.outcomes if o.name == "batched = per-row")
    assert outcome.status == FAIL and outcome.measured > 1e-5 and "pads pixel_values to (48, 40)" in outcome.said


class OffByOne(PromptTemplate):
    """LLaVA-1.5's template whose question span ends one character early: the question's last token (`?`) falls
    outside the question group."""

    def render(self, question, image_placeholder):
        text, spans = super().render(question, image_placeholder)
        spans["question"] = [(start, end - 1) for start, end in spans["question"]]
        return text, spans


class OffByOneLlava(LlavaAdapter):
    template = OffByOne(LLAVA_15.parts)


def test_check_fails_on_an_adapter_whose_question_span_is_off_by_one_token(tmp_path):
    model = mmscope.load("shapes-llava", adapter=OffByOneLlava)
    report = mmscope.check(model, half=None)
    outcome = next(o for o in report.outcomes if o.name == "groups decode")
    assert not report.passed and outcome.status == FAIL
    assert "the question group decodes to" in outcome.said and "purple'" in outcome.said  # the '?' left out
    print("\n".join(report.lines()))


def test_check_fails_on_a_knockout_whose_mask_is_a_cast_boolean(monkeypatch):
    real = knockout_module.block

    def cast_boolean(mask, blocked, heads, n_heads, may_empty_rows=True):  # blocked written as -1, not the minimum
        edited = real(mask, blocked, heads, n_heads, may_empty_rows)
        return torch.where(edited != mask, torch.tensor(-1.0, dtype=mask.dtype, device=mask.device), edited)

    monkeypatch.setattr(knockout_module, "block", cast_boolean)
    report = mmscope.check("shapes-llava", half=None)
    outcome = next(o for o in report.outcomes if o.name == "knockout blocks")
    assert not report.passed and outcome.status == FAIL and outcome.measured > 1e-3
    assert NOT_APPLICABLE not in {o.status for o in report.outcomes if o.name == "knockout blocks"}
    print("\n".join(report.lines()))


def test_check_refuses_what_it_cannot_check(embedded):
    example = embedded.prepare(scene(), "Is the cube red?")
    with pytest.raises(mmscope.errors.InputError if hasattr(mmscope, "errors") else Exception, match="two"):
        mmscope.check(embedded, [example])
    with pytest.raises(Exception, match="half must be"):
        mmscope.check(embedded, [example, example], half="float64")
    result = CliRunner().invoke(app, ["check", "--examples", "1"])
    assert result.exit_code == 2 and "examples" in result.output

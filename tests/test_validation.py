"""Every bad input gets one clear line: the CLI exits non-zero with `error: …` naming the input and no
traceback, and leaves an existing run folder exactly as it was; the API raises an mmscope exception naming it.

Each table row is one bad input and a piece of the message it must give. The CLI rows run against a finished
run folder (`finished`), whose every file is compared before and after.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mmscope
from data_fixtures import STUDY_FOLDER
from mmscope.cli import app
from mmscope.data.errors import DataError, MalformedFileError
from mmscope.data.program import central_objects
from mmscope.data.render import render
from mmscope.errors import InputError, InterventionError, MMScopeError, ModelLoadError
from mmscope.experiments.answers import normalise
from mmscope.experiments.options import OptionError
from mmscope.experiments.runs import RunDir, summarize
from mmscope.experiments.workspace import load_questions
from mmscope.data import synthesize
from mmscope.interventions import (
    ActivationPatch,
    CachedPatch,
    Intervention,
    Knockout,
    SkipLayers,
    Truncate,
    VisionCachedPatch,
    VisionKnockout,
    VisionScale,
    knockout_window,
)
from mmscope.probes import ProbeConfig, ProbeError, control_labels, layerwise

runner = CliRunner()
RUN = ["--limit", "1", "--categories", "ChooseAttr"]  # a sweep of one question


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished knockout run's folder: every refused command pointed at it must leave it as it was."""
    folder = tmp_path_factory.mktemp("runs") / "knockout"
    args = ["knockout", "--data", str(world), *RUN, "--flow", "image->last", "--window", "3", "--include-all",
            "--out", str(folder)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (folder / "results.parquet").exists()
    return folder


@pytest.fixture(scope="module")
def files(world, finished, tmp_path_factory):
    """Bad files of every kind a command reads, by name."""
    folder = tmp_path_factory.mktemp("bad-files")
    checkpoint = Path(mmscope.zoo.EMBEDDED_MODELS["shapes-llava"])
    made = {}

    def model_with(name: str, damage) -> Path:
        copy = folder / f"model-{name}"
        copy.mkdir()
        for file in checkpoint.iterdir():
            if file.is_file():
                (copy / file.name).write_bytes(file.read_bytes())
        damage(copy)
        return copy

    made["no-config"] = model_with("no-config", lambda f: (f / "config.json").unlink())
    made["truncated-weights"] = model_with(
        "truncated-weights", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]))
    made["truncated-tokenizer"] = model_with(
        "truncated-tokenizer", lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text()[:100]))
    for name, text in {"misspelt": "windw: 3\n", "malformed": "window: [3\n", "list": "- 3\n",
                       "bad-value": "window: wide\n"}.items():
        made[f"config-{name}"] = folder / f"{name}.yaml"
        made[f"config-{name}"].write_text(text)
    made["a-file"] = folder / "a-file"
    made["a-file"].write_text("not a folder")
    made["empty-folder"] = folder / "empty"
    made["empty-folder"].mkdir()
    made["no-boxes"] = Path(shutil.copytree(world, folder / "no-boxes", ignore=shutil.ignore_patterns("world.json")))
    shutil.rmtree(made["no-boxes"] / "sceneGraphs")  # a GQA folder without scene graphs: no question has a box
    for name in ("damaged-part", "damaged-config"):
        made[name] = Path(shutil.copytree(finished, folder / name))
    part = next((made["damaged-part"] / "parts").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:50])  # as a disk fault would leave it (writes themselves are atomic)
    (made["damaged-config"] / "config.yaml").write_text("experiment: {kind: knockout\n")
    return made


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`, with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


# (command line, a piece of the message). {world}, {run} and {name} (a bad file of `files`) are filled in; a
# command that takes --out gets the finished run folder's.
CLI_CASES = [
    (["knockout", "--flow", "image"], "flow 'image' (--flow) must read 'source->target'"),
    (["probe", "--flow", "image->question", "--center", "2", "--center", "2"],
     "centre 2 (--center) is given twice; give each centre once"),
    (["map", "--kind", "patch", "--kind", "patch"], "kind 'patch' (--kind) is given twice; give each kind once"),
    (["map", "--target", "last", "--target", "last"], "target 'last' (--target) is given twice"),
    (["map", "--center", "3", "--center", "3"], "centre 3 (--center) is given twice"),
    (["map", "--kind", "lens", "--layer", "2", "--layer", "2"], "layer 2 (--layer) is given twice"),
    (["probe", "--window", "2"], "--window applies to the knockouts of --flow; this run has none"),
    (["probe", "--truncate", "--window", "2"], "--window applies to the knockouts of --flow; this run has none"),
    (["probe", "--retrain"], "--retrain applies to the edits of --flow or --truncate; this run probes the clean "
                             "model only"),
    (["knockout", "--flow", "image-"], "flow 'image-' (--flow) must read 'source->target', e.g. --flow "
                                       "'image->last' — quote it: unquoted, the shell reads '>' as a redirection"),
    (["knockout", "--flow", "foo->last"], "unknown token group 'foo' (--flow)"),
    (["knockout", "--flow", "imgae->last"], "did you mean 'image'?"),
    (["patch", "--group", "foo"], "unknown token group 'foo' (--group)"),
    (["knockout", "--flow", "image->last", "--flow", "image->last"],
     "flow 'image->last' (--flow) is given twice; give each flow once"),
    (["knockout", "--flow", "image->last", "--flow", "image -> last"],
     "flow 'image -> last' (--flow) is given twice (as 'image->last')"),
    (["patch", "--group", "image", "--group", "image"], "token group 'image' (--group) is given twice"),
    (["knockout", "--window", "0"], "window 0 (--window): must be at least 1"),
    (["lens", "--device-map", "everywhere"], "device_map 'everywhere' (--device-map): use one of auto, balanced"),
    (["knockout", "--window", "15"], "window 15 (--window) blocks all 8 layers of shapes-llava at every centre"),
    (["knockout", "--limit", "0"], "limit 0 (--limit): must be at least 1, or omit it for all questions"),
    (["knockout", "--limit", "-3"], "limit -3 (--limit): must be at least 1"),
    (["evaluate", "--limit", "0"], "limit 0 (--limit): must be at least 1"),
    (["evaluate", "--batch-size", "0"], "batch_size 0 (--batch-size): must be at least 1"),
    (["knockout", "--engine", "turbo"], "unknown engine 'turbo' (--engine): known: prefix, naive"),
    (["truncate", "--engine", "prefx"], "unknown engine 'prefx' (--engine): known: prefix, naive; did you mean 'prefix'?"),
    (["lens", "--lens", "sideways"], "unknown lens 'sideways' (--lens): known: raw, normed"),
    (["patch", "--site", "embedding"], "unknown site 'embedding' (--site): known: residual, attention, mlp"),
    (["probe", "--probe", "svm"], "unknown probe 'svm' (--probe): known: linear, mlp"),
    (["probe", "--n-images", "0"], "n_images 0 (--n-images): must be at least 1"),
    (["knockout", "--categories", "colour"], "unknown category 'colour'"),
    (["knockout", "--model", "shapes_llava"], "did you mean 'shapes-llava'?"),
    (["knockout", "--model", "./no/such/folder"], "model folder './no/such/folder' does not exist"),
    (["knockout", "--model", "{no-config}"], "has no config.json"),
    (["knockout", "--model", "{truncated-weights}"], "model.safetensors in"),
    (["knockout", "--model", "{truncated-tokenizer}"], "tokenizer.json is not valid JSON"),
    (["knockout", "--model", "{empty-folder}"], "has no config.json"),
    (["knockout", "--data", "/no/such/data"], "data folder '/no/such/data' does not exist"),
    (["knockout", "--data", "{empty-folder}"], "is neither a synthetic world"),
    (["knockout", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    (["knockout", "--config", "{config-misspelt}"], "unknown option(s) 'windw'; did you mean 'window'?"),
    (["knockout", "--config", "{config-malformed}"], "is not valid YAML"),
    (["knockout", "--config", "{config-list}"], "must hold a mapping of option: value, not a list"),
    (["knockout", "--out", "{a-file}"], "is a file; choose another --out"),
    (["knockout", "--out", "/dev/null/run"], "not a directory (/dev/null/run"),
    (["knockout", "--flow", "image->last", "--include-all", "--window", "5", "--out", "{run}"],
     "holds results of a different run (window: 3 there, 5 now)"),
    (["knockout", "--flow", "last->last", "--include-all", "--window", "3", "--out", "{run}"],
     "(flows: ['image->last'] there, ['last->last'] now)"),
    (["knockout", "--flow", "image->last", "--window", "3", "--out", "{run}"],
     "(include_all: True there, False now)"),
    (["knockout", "--flow", "image->last", "--include-all", "--window", "3", "--out", "{damaged-part}"],
     "is damaged"),
    (["knockout", "--out", "{damaged-config}"], "config.yaml is not valid YAML"),
    (["knockout", "--data", "{study}"], "is the study's CSV folder"),
    (["knockout", "--split", "tset"], "unknown split 'tset' of the synthetic world"),
    (["knockout", "--categories", "ChooseAtr"], "did you mean 'ChooseAttr'?"),
    (["knockout", "--flow", "object->question", "--data", "{no-boxes}"], "token group 'object' (--flow) needs object boxes"),
    (["data", "show", "/no/such/folder"], "/no/such/folder"),
    (["train", "--steps", "-1"], "steps -1 (--steps): must be at least 1"),
    (["train", "--focus", "1.5"], "focus 1.5 (--focus): must lie in [0, 1]"),
    (["train", "--data", "{empty-folder}"], "(--data): is not a synthetic-world folder"),
    (["train", "--out", "{a-file}"], "(--out): is a file, not a folder"),
]
# Click's own usage errors: exit code 2, a message naming the option, no traceback (click frames them).
USAGE_CASES = [
    (["knockout", "--windw", "3"], "No such option: --windw"),
    (["knockout", "--window", "abc"], "Invalid value for '--window'"),
    (["knockout", "--config", "{config-bad-value}"], "Invalid value for '--window'"),
    (["frobnicate"], "No such command 'frobnicate'"),
]


def filled(args: list[str], world: Path, run: Path, files: dict) -> list[str]:
    filled = [arg.format(world=world, run=run, study=STUDY_FOLDER, **files) if "{" in arg else arg for arg in args]
    takes_data = filled[0] in ("knockout", "lens", "truncate", "patch", "probe", "evaluate")
    if takes_data and "--data" not in filled:
        filled += ["--data", str(world)]
    if filled[0] in ("knockout", "lens", "truncate", "patch") and "--limit" not in filled:
        filled += RUN
    if filled[0] in ("knockout", "lens", "truncate", "patch", "probe", "train") and "--out" not in filled:
        filled += ["--out", str(run)]
    return filled


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[" ".join(args) for args, _ in CLI_CASES])
def test_a_bad_command_line_says_what_is_wrong_in_one_line_and_leaves_the_run_folder_alone(
        args, message, world, finished, files):
    before = snapshot(finished)
    result = runner.invoke(app, filled(args, world, finished, files))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(finished) == before


@pytest.mark.parametrize(("args", "message"), USAGE_CASES, ids=[" ".join(args) for args, _ in USAGE_CASES])
def test_a_misspelt_or_mistyped_option_is_a_usage_error_naming_it(args, message, world, finished, files):
    before = snapshot(finished)
    result = runner.invoke(app, filled(args, world, finished, files))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output
    assert snapshot(finished) == before


def test_debug_shows_the_traceback_and_the_exception_itself():
    for args, env in ((["--debug", "knockout", "--window", "0"], {}), (["knockout", "--window", "0"],
                                                                       {"MMSCOPE_DEBUG": "1"})):
        result = runner.invoke(app, args, env=env)
        assert isinstance(result.exception, MMScopeError), result.output
        assert "window 0 (--window)" in str(result.exception)


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmscope.cli", "knockout", "--limit", "0"],
                            capture_output=True, text=True, env={**os.environ, "MMSCOPE_DEBUG": ""})
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: limit 0 (--limit): must be at least 1, or omit it for all "
                                     "questions")


def image(width=64, height=64) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 120, 200))


def truncated_image_file(suffix: str) -> Path:
    """A PNG or JPEG file cut off halfway, as an interrupted download leaves it."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, suffix.upper().replace("JPG", "JPEG"))
    path = Path(tempfile.mkdtemp()) / f"cut.{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def knockout(**fields) -> Knockout:
    return Knockout(**{"source": "image", "target": "last", "layers": (3,), **fields})


# (what to call with the embedded model and a prepared example, a piece of the message[, the error's class])
API_CASES = [
    (lambda m, e: knockout(layers="12"), "Knockout.layers"),
    (lambda m, e: knockout(layers=()), "Knockout.layers"),
    (lambda m, e: knockout(layers=[1.5]), "Knockout.layers"),
    (lambda m, e: knockout(heads=[]), "Knockout.heads"),
    (lambda m, e: knockout(keep_self="no"), "Knockout.keep_self must be True or False; got 'no'"),
    (lambda m, e: Intervention.from_dict({"type": "Knockout", "source": "image", "target": "last",
                                          "layers": "12"}), "Knockout.layers"),
    (lambda m, e: Intervention.from_dict({"type": "Knockot"}), "unknown intervention type 'Knockot'"),
    (lambda m, e: Intervention.from_dict({"type": "Truncate", "layer": 2, "depth": 3}), "Truncate has no field"),
    (lambda m, e: ActivationPatch("embedding", (1,), "image"), "embedding"),
    (lambda m, e: m.next_token_probs(e, [knockout(layers=(99,))]), "layer 99 out of range"),
    (lambda m, e: m.next_token_probs(e, [Knockout("imgae", "last", (3,))]),
     "unknown token group 'imgae'; known: image, instruction, last, question, roles, system; did you mean 'image'?"),
    (lambda m, e: m.next_token_probs(e, knockout()), "pass [it]"),
    (lambda m, e: m.next_token_probs(e, [knockout().to_dict()]), "got dict"),
    (lambda m, e: m.next_token_probs(e, "image->last"), "got str"),
    (lambda m, e: m.prepare(image(), ""), "question must be a non-empty string"),
    (lambda m, e: m.prepare(image(), "What color is the cube? " * 100),
     "more than the 512 positions of shapes-llava's"),
    (lambda m, e: m.prepare(image(), "What color is the cube?", boxes=[]), "boxes is empty"),
    (lambda m, e: m.prepare(image(), "What color is the cube?", boxes=[(math.nan, 1, 2, 2)]), "nan"),
    (lambda m, e: m.prepare("picture.png", "What color is the cube?"), "picture.png"),
    (lambda m, e: m.answer_prob(e, ""), "answer must be a non-empty string"),
    (lambda m, e: Truncate("3"), "Truncate.layer must be an int; got '3'"),
    (lambda m, e: Truncate(True), "Truncate.layer must be an int; got True"),
    (lambda m, e: m.next_token_probs(e, [Truncate(8)]), "layer 8 out of range"),
    (lambda m, e: mmscope.load("shapes_llava"), "did you mean 'shapes-llava'?"),
    (lambda m, e: mmscope.load(attn_implementation="flash_attention_2"), "flash_attention_2"),
    (lambda m, e: knockout_window(3, math.nan, 8), "window k nan must be a whole number", InterventionError),
    (lambda m, e: knockout_window(3, math.inf, 8), "window k inf must be a whole number", InterventionError),
    (lambda m, e: knockout_window(3, 2.5, 8), "window k 2.5 must be a whole number", InterventionError),
    (lambda m, e: knockout_window(2.5, 3, 8), "centre layer 2.5 must be a whole number", InterventionError),
    (lambda m, e: knockout_window(3, 99, 8),
     "window k=99 blocks all 8 layers at every centre; choose 1 to 14", InterventionError),
    (lambda m, e: knockout(layers=[math.nan]), "Knockout.layers must be ints; got [nan]", InterventionError),
    (lambda m, e: knockout(layers=math.inf), "Knockout.layers must be ints; got inf", InterventionError),
    (lambda m, e: knockout(layers=[3, 4, 3]), "Knockout.layers lists 3 twice; got [3, 4, 3]", InterventionError),
    (lambda m, e: knockout(heads=[1, 1]), "Knockout.heads lists 1 twice", InterventionError),
    (lambda m, e: ActivationPatch("residual", (2, 2), "image"),
     "ActivationPatch.layers lists 2 twice", InterventionError),
    (lambda m, e: CachedPatch("residual", [5, 5], "image"), "CachedPatch.layers lists 5 twice", InterventionError),
    (lambda m, e: CachedPatch("residual", 2.0, "image"),
     "CachedPatch.layers must be ints; got 2.0", InterventionError),
    (lambda m, e: SkipLayers([1, 1]), "SkipLayers.layers lists 1 twice", InterventionError),
    (lambda m, e: knockout(layers=[-1]), "Knockout.layers counts from 0 (layers, heads and rows have no negative "
                                         "numbers); got (-1,)", InterventionError),
    (lambda m, e: Truncate(-1), "Truncate.layer counts from 0", InterventionError),
    (lambda m, e: Truncate(math.nan), "Truncate.layer must be an int; got nan", InterventionError),
    (lambda m, e: VisionKnockout("patches", "cls", [0, 0]), "VisionKnockout.layers lists 0 twice", InterventionError),
    (lambda m, e: VisionScale("vision_residual", [0, 0]), "VisionScale.layers lists 0 twice", InterventionError),
    (lambda m, e: VisionScale("vision_residual", [0], factor=math.nan), "VisionScale.factor must be a finite "
                                                                        "number; got nan", InterventionError),
    (lambda m, e: VisionScale("vision_residual", [0], factor="half"),
     "VisionScale.factor must be a finite number", InterventionError),
    (lambda m, e: VisionCachedPatch("vision_residual", [1, 1]),
     "VisionCachedPatch.layers lists 1 twice", InterventionError),
    (lambda m, e: m.next_token_probs(e, [None]),
     "interventions[0] must be an Intervention object; got NoneType", InterventionError),
    (lambda m, e: m.next_token_probs(e, [knockout(), None]),
     "interventions[1] must be an Intervention object", InterventionError),
    (lambda m, e: m.generate_answer(e, max_new_tokens=0),
     "max_new_tokens must be a whole number of at least 1; got 0", InputError),
    (lambda m, e: m.generate_tokens(e, [knockout()], max_new_tokens=0),
     "max_new_tokens must be a whole number", InputError),
    (lambda m, e: mmscope.load("shapes-llava", dtype="float17"),
     "dtype 'float17' is not a torch dtype; use one of float32, float16, bfloat16, float64 or 'auto'; did you mean "
     "'float16'?", ModelLoadError),
    (lambda m, e: mmscope.load("shapes-llava", dtype=16),
     "dtype 16 must be a torch.dtype or its name", ModelLoadError),
    (lambda m, e: m.prepare(Image.new("RGB", (0, 0)), "What color is the cube?"),
     "image is 0x0 pixels; it must have at least one pixel each way", InputError),
    (lambda m, e: m.prepare(image(0, 64), "What color is the cube?"), "image is 0x64 pixels", InputError),
    (lambda m, e: m.prepare(truncated_image_file("png"), "What color is the cube?"),
     "cut.png' cannot be read", InputError),
    (lambda m, e: m.prepare(Image.open(truncated_image_file("jpg")), "What color is the cube?"),
     "cut.jpg' cannot be read (image file is truncated", InputError),
    (lambda m, e: m.prepare(image(), "What color is the cube?", meta=["red"]),
     "meta must be a dict (or None); got list ['red']", InputError),
    (lambda m, e: m.prepare(image(), "What color is the cube?", meta="red"),
     "meta must be a dict (or None); got str", InputError),
    (lambda m, e: m.prepare(image(), "What color is the <image> cube?"),
     "question 'What color is the <image> cube?' holds '<image>', the image placeholder token of shapes-llava", InputError),
    (lambda m, e: m.cache(e, layers=[1, 2, 1]), "layers lists 1 twice; got [1, 2, 1]", InputError),
    (lambda m, e: m.cache(e, layers=[1.5]), "layers must be whole layer numbers; got [1.5]", InputError),
    (lambda m, e: m.cache(e, sites=["vision_residual"], vision_layers=[0, 0]), "vision_layers lists 0 twice",
     InputError),
    (lambda m, e: m.run(e, readout=lambda ctx: ctx.residual(1.5)), "layer 1.5 is not a whole number; the model has "
                                                                   "layers 0..7", InterventionError),
    (lambda m, e: synthesize(tempfile.mkdtemp(), math.nan, progress=False),
     "n_scenes must be a whole number; got nan", DataError),
    (lambda m, e: synthesize(tempfile.mkdtemp(), 2.5, progress=False),
     "n_scenes must be a whole number; got 2.5", DataError),
    (lambda m, e: load_questions(None, limit=0), "limit 0 (--limit)"),
    (lambda m, e: load_questions(None, categories=[]), "an empty category selection"),
    (lambda m, e: ProbeConfig(kind="linaer"), "unknown probe kind 'linaer'; known: linear, mlp; did you mean "
                                              "'linear'?", ProbeError),
    (lambda m, e: control_labels(torch.zeros(3), ["a"]), "need one type per example: 1 types for 3 labels",
     ProbeError),
    (lambda m, e: layerwise(torch.zeros(4, 1, 2), torch.zeros(4), False, types=["a"] * 4),
     "pass controls=True with them", ProbeError),
    (lambda m, e: normalise("red", "exact"), "unknown answer match 'exact'; known: lenient, lower", OptionError),
    (lambda m, e: summarize(pd.DataFrame({"layer": [0], "value": [1.0]}), ["layer"], "value", ci="boot"),
     "unknown confidence-interval method 'boot'; known: normal, bootstrap; did you mean 'bootstrap'?", OptionError),
    (lambda m, e: render(8, [("pyramid", (0, 0, 0), False, (1, 1, 4))]), "unknown shape 'pyramid'", DataError),
    (lambda m, e: central_objects([{"operation": "select", "dependencies": [2]}]),
     "step 0 ('select') has dependencies [2]", MalformedFileError),
]


@pytest.mark.parametrize(("call", "message", "error"), [(*case, MMScopeError)[:3] for case in API_CASES],
                         ids=[case[1] for case in API_CASES])
def test_a_bad_api_input_raises_an_mmscope_error_naming_it(call, message, error, embedded):
    example = embedded.prepare(image(), "What color is the cube?")
    with pytest.raises(MMScopeError) as raised:
        call(embedded, example)
    assert isinstance(raised.value, error), repr(raised.value)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_words_warn_that_the_model_reads_them_as_the_unknown_token(embedded):
    example = embedded.prepare(image(), "What color is the cube?")
    with pytest.warns(UserWarning, match="answer 'zorbly' has words the tokenizer does not know"):
        embedded.answer_prob(example, "zorbly")
    with pytest.warns(UserWarning, match="a question has words the tokenizer of shapes-llava does not know"):
        embedded.prepare(image(), "What colour is the zorbly?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedded.prepare(image(), "What color is the cube?")


def test_a_start_that_failed_before_any_result_does_not_block_the_corrected_rerun(tmp_path):
    config = {"experiment": {"kind": "knockout", "window": 100}}
    with RunDir(tmp_path / "run", config):
        pass  # the run failed here, before its first result
    corrected = {"experiment": {"kind": "knockout", "window": 3}}
    with RunDir(tmp_path / "run", corrected) as run_dir:
        run_dir.write_part(0, [{"x": 1}])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["experiment"]["window"] == 3
    with pytest.raises(MMScopeError, match=r"holds results of a different run \(window: 3 there, 100 now\)"):
        RunDir(tmp_path / "run", config)


def test_where_and_how_a_run_is_kept_may_change_between_its_starts(tmp_path):
    first = {"experiment": {"kind": "knockout", "out": "a", "wandb": False}}
    with RunDir(tmp_path / "run", first) as run_dir:
        run_dir.write_part(0, [{"x": 1}])
    with RunDir(tmp_path / "run", {"experiment": {"kind": "knockout", "out": "b", "wandb": True}}) as run_dir:
        assert run_dir.counts() == {"used": 1, "skipped": 0}


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    folder, config = tmp_path / "run", {"experiment": {"kind": "knockout"}}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mmscope.experiments.runs import RunDir; "
         f"run = RunDir({str(folder)!r}, {config!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MMScopeError, match=rf"is being written by process {holder.pid} on "):
            RunDir(folder, config)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with RunDir(folder, config) as run_dir:  # the killed holder's lock died with it
            assert json.loads((folder / "run.lock.json").read_text())["pid"] == os.getpid()
            run_dir.write_part(0, [{"x": 1}])
    finally:
        holder.kill()
        holder.wait()

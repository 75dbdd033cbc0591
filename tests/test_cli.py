"""The generated command line: every command's options, defaults and flags, `--config`, and refused values.

No model is loaded here: where a command would run, `runner.run` is replaced by one that records the options.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from mmscope.cli import app
from mmscope.experiments import runner as runner_module
from mmscope.experiments.knockout import DEFAULT_FLOWS, KnockoutOptions
from mmscope.experiments.options import plain
from mmscope.experiments.patch import PATCH_GROUPS, PatchOptions
from mmscope.zoo.shapes_llava.config import TrainConfig

runner = CliRunner()
REPOSITORY = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "nnsight", "datasets", "pandas", "matplotlib")  # what --help must not import
QUESTIONS = ["--model", "--data", "--columns", "--images", "--split", "--categories", "--limit", "--protocol",
             "--object-patches", "--image-padding", "--tokenisation",
             "--answer-tokens", "--answer-match", "--ci"]
KEEPING = ["--include-all", "--out", "--wandb", "--seed", "--device-map", "--config"]


def options_of(command: str) -> dict[str, click.Parameter]:
    """The options of `mmscope COMMAND` by their first flag, in the order --help lists them."""
    group = typer.main.get_command(app)
    return {parameter.opts[0]: parameter for parameter in group.commands[command].params}


@pytest.fixture
def recorded(monkeypatch) -> list:
    """The options each experiment command was run with (instead of running it)."""
    seen = []
    monkeypatch.setattr(runner_module, "run", lambda experiment, options, echo: seen.append(options))
    return seen


def test_commands_are_listed_in_their_order():
    assert list(typer.main.get_command(app).commands) == ["knockout", "lens", "truncate", "patch", "map", "probe",
                                                          "train", "evaluate", "check", "data"]


@pytest.mark.parametrize(("command", "own", "defaults"), [
    ("knockout", ["--flow", "--window", "--reference", "--engine", "--card"], {"--limit": 20, "--flow": None,
                                                                               "--window": None,
                                                                     "--engine": "prefix", "--protocol": "default"}),
    ("lens", ["--lens", "--lens-axis"], {"--limit": 20, "--lens": None, "--lens-axis": None}),
    ("truncate", ["--engine"], {"--limit": 20, "--engine": "prefix"}),
    ("patch", ["--site", "--group", "--engine", "--estimate", "--verify", "--verify-random", "--metric"],
     {"--limit": 10, "--site": "residual", "--group": None, "--engine": "prefix", "--estimate": None,
      "--verify": None}),
])
def test_sweep_commands_take_the_shared_options_around_their_own(command, own, defaults):
    options = options_of(command)
    assert list(options) == [*QUESTIONS, *own, *KEEPING]
    assert {flag: options[flag].default for flag in defaults} == defaults
    shared = {"--model": "shapes-llava", "--split": "test", "--include-all": False, "--wandb": False, "--seed": 0}
    assert {flag: options[flag].default for flag in shared} == shared
    assert options["--include-all"].is_flag and not options["--include-all"].secondary_opts
    assert options["--categories"].multiple
    assert options["--config"].is_eager


def test_probe_evaluate_and_train_keep_their_options_and_defaults():
    probe = options_of("probe")
    assert list(probe) == ["--model", "--data", "--split", "--n-images", "--probe", "--controls", "--flow", "--window",
                           "--center", "--truncate", "--retrain", "--engine", "--card", "--out", "--wandb", "--seed",
                           "--config"]
    assert probe["--flow"].multiple and probe["--center"].multiple and probe["--retrain"].is_flag
    assert probe["--truncate"].is_flag and probe["--engine"].default == "prefix"
    assert (probe["--n-images"].default, probe["--probe"].default, probe["--probe"].name) == (300, "linear",
                                                                                              "probe_kind")
    assert probe["--controls"].secondary_opts == ["--no-controls"] and probe["--controls"].default is True
    evaluate = options_of("evaluate")
    assert list(evaluate) == ["--model", "--data", "--columns", "--split", "--limit", "--batch-size", "--blank",
                              "--statements", "--card"]
    assert evaluate["--blank"].secondary_opts == ["--no-blank"] and evaluate["--blank"].default is True
    assert evaluate["--card"].is_flag and not evaluate["--card"].secondary_opts
    assert (evaluate["--limit"].default, evaluate["--batch-size"].default) == (None, 32)
    train = options_of("train")
    assert train["--out"].required and not train["--data"].required
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    for flag, option in train.items():
        if flag not in ("--out", "--text-layers"):
            assert option.default == defaults[option.name], flag
    assert train["--text-layers"].default == TrainConfig(out="x").spec.text_layers
    assert train["--bf16"].secondary_opts == ["--no-bf16"] and not train["--wandb"].secondary_opts
    assert list(train) == ["--out", "--data", "--n-scenes", "--vision-steps", "--freeze-vision", "--steps",
                           "--batch-size", "--lr", "--seed", "--eval-every", "--patch-loss-weight",
                           "--grounding-loss-weight", "--attention-loss-weight", "--gather-loss-weight",
                           "--named-loss-weight", "--turns", "--caption-share", "--caption-positions",
                           "--caption-steps", "--statement-share", "--description-share",
                           "--first-statement-share", "--blank-share", "--focus", "--bf16", "--wandb",
                           "--text-layers"]


def test_help_shows_each_options_type_and_text():
    printed = runner.invoke(app, ["knockout", "--help"], env={"COLUMNS": "240"}).stdout
    for flag, kind, text in [
        ("--data", "path", "Synthetic-world folder, GQA folder, or the study's CSV folder"),
        ("--limit", "int", "At most N questions per category."),
        ("--flow", "list[str]", "source->target (repeatable; default: the study's six flows and the"),
        ("--window", "int", "Window k of layers blocked around each centre layer (default: about a third"),
        ("--engine", "str", "Sweep engine: prefix (shared prefix cache, batched) or naive."),
        ("--config", "path", "YAML file of option values."),
    ]:
        assert re.search(rf"{flag}\s+<{re.escape(kind)}>\s+{re.escape(text)}", printed), flag


def every_command(group=None, path=()) -> list[tuple[tuple[str, ...], typer.core.TyperCommand]]:
    """Every command under `group` (default: mmscope's) with its words on the command line, groups included."""
    group = group or typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        found.append(((*path, name), command))
        if isinstance(command, typer.core.TyperGroup):
            found += every_command(command, (*path, name))
    return found


def test_every_switch_is_a_flag_and_help_shows_it_as_one(recorded):
    printed = runner.invoke(app, ["knockout", "--help"], env={"COLUMNS": "240"}).stdout
    assert re.search(r"--include-all\s+Keep questions the model answers wrongly\.", printed)
    commands = [((), typer.main.get_command(app)), *every_command()]
    assert len(commands) == 13  # mmscope, its 10 commands, data's 2
    switches = 0
    for words, command in commands:
        for option in command.params:
            if isinstance(option, typer.core.TyperOption) and option.type_descriptor.annotation is bool:
                switches += 1
                assert option.is_bool_flag, (words, option.opts)
                if option.default is True:  # on by default: --x/--no-x
                    assert option.secondary_opts == [option.opts[0].replace("--", "--no-", 1)], (words, option.opts)
        shown = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "240"})
        assert shown.exit_code == 0 and "<bool>" not in shown.stdout and "BOOLEAN" not in shown.stdout, words
    assert switches >= 20
    probe = runner.invoke(app, ["probe", "--help"], env={"COLUMNS": "240"}).stdout
    assert re.search(r"--controls\s+--no-controls\s+Also train each probe", probe)
    result = runner.invoke(app, ["knockout", "--include-all", "--limit", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert recorded == [KnockoutOptions(include_all=True, limit=2)]
    assert runner.invoke(app, ["knockout", "--include-all", "true"]).exit_code == 2  # a flag takes no value


def importtime(*args: str) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """Run `python -X importtime -m mmscope ARGS`: the process, the top-level packages it imported, and the
    lines of its stderr that are not the import times."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmscope", *args], cwd=REPOSITORY,
                             capture_output=True, text=True, timeout=120)
    lines = process.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return process, imported, [line for line in lines if not line.startswith("import time:")]


def test_help_and_a_refused_option_are_answered_without_torch():
    shown, imported, _ = importtime("--help")
    assert shown.returncode == 0 and "knockout" in shown.stdout
    assert "mmscope.cli" in {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    refused, imported, said = importtime("knockout", "--window", "0")
    assert refused.returncode == 2 and refused.stdout == ""
    assert said == ["error: window 0 (--window): must be at least 1"]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_config_file_keys_become_defaults_and_the_command_line_wins(recorded, tmp_path):
    config = tmp_path / "knockout.yaml"
    config.write_text("window: 3\nflows: [image->last]\ninclude-all: true\nlimit: 2\n")
    for args in (["--config", str(config)], ["--config", str(config), "--window", "5", "--flow", "last->last"]):
        result = runner.invoke(app, ["knockout", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert recorded[0] == KnockoutOptions(window=3, flows=["image->last"], include_all=True, limit=2)
    assert recorded[1] == KnockoutOptions(window=5, flows=["last->last"], include_all=True, limit=2)
    missing = runner.invoke(app, ["knockout", "--config", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_defaults_are_recorded_as_run(recorded):
    runner.invoke(app, ["patch", "--site", "mlp"], catch_exceptions=False)
    assert recorded == [PatchOptions(site="mlp", groups=list(PATCH_GROUPS))]
    options = plain(KnockoutOptions(data=Path("world"), out=Path("runs/x")))
    assert options["flows"] == list(DEFAULT_FLOWS)
    assert (options["data"], options["out"]) == ("world", "runs/x")

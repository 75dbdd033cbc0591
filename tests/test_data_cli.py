"""`mmscope data …`: writing a synthetic world and counting what a folder of questions holds."""

from __future__ import annotations

import re

from data_fixtures import STUDY_FOLDER
from typer.testing import CliRunner


def test_cli_synth_prints_counts_balance_and_time_and_show_counts_folders(tmp_path):
    from mmscope.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "w"), "--n-scenes", "20", "--seed", "1",
                                 "--image-size", "64", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(r"category\s+train\s+val\s+test\s+commonest answer", result.output)
    assert re.search(r"LogicalObj\s+\d+\s+\d+\s+\d+\s+(yes|no) \d+\.\d%", result.output)
    assert re.search(r"questions about 20 images written to .* in \d+\.\d s", result.output)
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "w"), "--split", "val"])
    assert shown.exit_code == 0 and "val_balanced_questions.json" in shown.output
    study = runner.invoke(app, ["data", "show", str(STUDY_FOLDER)])
    assert re.search(r"ChooseRel\s+40\b", study.output) and re.search(r"total\s+240\b", study.output)
    assert runner.invoke(app, ["data", "synth", "--help"]).exit_code == 0


def test_data_commands_are_generated_from_their_declared_options():
    import dataclasses

    import typer

    from mmscope.cli import app
    from mmscope.data.cli import ShowOptions, SynthOptions

    group = typer.main.get_command(app).commands["data"]
    synth = {parameter.name: parameter for parameter in group.commands["synth"].params}
    fields = dataclasses.fields(SynthOptions)
    assert list(synth) == [field.name for field in fields]
    assert [parameter.help for parameter in synth.values()] == [field.metadata["help"] for field in fields]
    assert synth["out"].required and synth["n_scenes"].required and synth["image_size"].default == 96
    assert synth["overwrite"].secondary_opts == ["--no-overwrite"] and synth["overwrite"].default is False
    path, split = group.commands["show"].params
    assert [field.name for field in dataclasses.fields(ShowOptions)] == ["path", "split"]
    assert isinstance(path, typer.core.TyperArgument) and path.name == "path" and path.required
    assert split.opts == ["--split"] and split.default is None

"""A finished sweep grows in place: rerun with a larger --limit or more --categories, it keeps every question it
already computed and computes only the new ones, ending with the table a fresh run of the wider settings gives."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from mmscope.cli import app

runner = CliRunner()
FLOW = ["--flow", "image->last", "--flow", "question->last", "--window", "3"]


def knockout(world, out, *options: str) -> str:
    result = runner.invoke(app, ["knockout", "--data", str(world), "--split", "test", "--include-all", *FLOW,
                                 "--out", str(out), *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def computed(out) -> dict[str, float]:
    """When each question's part was written."""
    return {path.name: path.stat().st_mtime_ns for path in (out / "parts").iterdir()}


def test_a_larger_limit_reuses_the_questions_computed_and_equals_a_fresh_run(world, tmp_path):
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    knockout(world, grown, "--limit", "2", "--categories", "ChooseAttr", "--categories", "QueryAttr")
    before = computed(grown)
    printed = knockout(world, grown, "--limit", "5", "--categories", "ChooseAttr", "--categories", "QueryAttr")
    assert "grown from 4 to 10 questions: 4 kept from the earlier run, 6 to compute" in printed
    after = computed(grown)
    assert {name: after[name] for name in before} == before  # the first run's parts were not computed again
    assert len(after) == 10
    knockout(world, fresh, "--limit", "5", "--categories", "ChooseAttr", "--categories", "QueryAttr")
    pd.testing.assert_frame_equal(pd.read_parquet(grown / "results.parquet"), pd.read_parquet(fresh / "results.parquet"))
    assert (grown / "summary.csv").read_text() == (fresh / "summary.csv").read_text()


def test_more_categories_grow_the_run_and_other_changes_are_still_refused(world, tmp_path):
    out = tmp_path / "run"
    knockout(world, out, "--limit", "1", "--categories", "ChooseAttr")
    printed = knockout(world, out, "--limit", "1", "--categories", "ChooseAttr", "--categories", "ChooseRel")
    assert "grown from 1 to 2 questions: 1 kept from the earlier run, 1 to compute" in printed
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["category"]) == {"ChooseAttr", "ChooseRel"} and sorted(table["example"].unique()) == [0, 1]
    for change in (["--limit", "1", "--categories", "ChooseAttr"],  # narrower: not a growth
                   ["--limit", "2", "--categories", "ChooseAttr", "--categories", "ChooseRel", "--seed", "3"]):
        result = runner.invoke(app, ["knockout", "--data", str(world), "--split", "test", "--include-all", *FLOW,
                                     "--out", str(out), *change])
        assert result.exit_code == 2 and "holds results of a different run" in result.output
    with pytest.raises(AssertionError):
        assert "grown" in knockout(world, out, "--limit", "1", "--categories", "ChooseAttr", "--categories", "ChooseRel")

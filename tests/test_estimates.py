"""Estimate, then verify, in the commands: `mmscope patch --estimate atp` and `mmscope map --kind atp-knockout /
atp-patch`. Each row's estimate against an independent computation (plain autograd on the Hugging Face model, or
the single-layer knockout estimate over the full attention matrix), each verified row's exact value against one
plain forward with the edit, the choice of what is verified, and the agreement numbers against scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from test_attribution import hooked_activations
from typer.testing import CliRunner

from mmscope.cli import app
from mmscope.experiments.answers import clean_answer
from mmscope.experiments.attribution import agreement_table, knockout_attribution
from mmscope.experiments.maps import MapOptions, map_rows
from mmscope.experiments.runner import Question, Sweep, example_of
from mmscope.experiments.workspace import load_questions
from mmscope.interventions import ActivationPatch, Knockout, knockout_window

runner = CliRunner()


def first_question(model, world, index: int = 0) -> tuple:
    dataset = load_questions(world, "test", limit=2)
    row = dataset[index]
    example = example_of(model, row)
    return dataset, Question(index, row, example, clean_answer(model, example, row["answer"]))


def check_verified(rows: list[dict], top: int, sampled: int) -> list[dict]:
    """The top rows are the `top` largest |estimates|, `sampled` others drawn from the rest, the others unrun."""
    order = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["estimate"]))
    chosen = {i for i, row in enumerate(rows) if row["verified"] == "top"}
    drawn = {i for i, row in enumerate(rows) if row["verified"] == "random"}
    assert {abs(rows[i]["estimate"]) for i in chosen} == {abs(rows[i]["estimate"]) for i in order[:top]}
    assert len(chosen) == top and len(drawn) == sampled and not chosen & drawn
    assert all(math.isnan(row["exact"]) for row in rows if row["verified"] == "")
    return [row for row in rows if row["verified"]]


def test_the_knockout_map_estimate_is_the_sum_of_its_windows_single_layer_estimates(embedded, world):
    dataset, question = first_question(embedded, world)
    options = MapOptions(kinds=["atp-knockout"], targets=["last", "question"], centers=[2, 5], window=2, region=4,
                         verify=3, verify_random=2, model="unused")
    rows = map_rows(Sweep(embedded, dataset, options), question)
    assert len(rows) == 2 * 2 * 4 and {row["kind"] for row in rows} == {"atp-knockout"}
    example, token = question.example, question.answer.first_token
    p_clean = embedded.next_token_probs(example)[token].item()
    for row in rows[::3]:  # a third of the cells: each costs one forward and backward per layer
        layers = knockout_window(row["center"], 2, embedded.n_layers)
        single = knockout_attribution(embedded, example, tuple(row["positions"]), row["target"], layers, token)
        assert row["estimate"] == pytest.approx(float(single.sum()), abs=1e-6)
    for row in check_verified(rows, 3, 2):
        layers = knockout_window(row["center"], 2, embedded.n_layers)
        p_ko = embedded.next_token_probs(example, [Knockout(tuple(row["positions"]), row["target"], layers)])[token]
        assert row["exact"] == pytest.approx(p_ko.item() - p_clean, abs=1e-6)
    assert len({round(row["estimate"], 9) for row in rows}) > len(rows) // 2  # each cell its own estimate


def test_the_patch_map_estimate_equals_plain_autograd_on_the_hf_model(embedded, world):
    dataset, question = first_question(embedded, world)
    options = MapOptions(kinds=["atp-patch"], layers=[1, 4], site="residual", region=4, verify=2, verify_random=3,
                         model="unused")
    rows = map_rows(Sweep(embedded, dataset, options), question)
    assert len(rows) == 2 * 4 and {row["target"] for row in rows} == {"residual"}
    clean, row = question.example, question.row
    other = next(dataset[j] for j in range(1, len(dataset)) if dataset[j]["image_id"] != row["image_id"])
    corrupted = embedded.prepare(other["image"].convert("RGB").resize(row["image"].size), row["question"],
                                 boxes=clean.meta[0]["boxes"])
    token, last = question.answer.first_token, corrupted.layout["last"][0]
    hf = embedded.hf
    clean_values, _ = hooked_activations(hf, embedded.model_inputs(clean), token, clean.layout["last"][0], "prob")
    values, grads = hooked_activations(hf, embedded.model_inputs(corrupted), token, last, "prob")
    for entry in rows:
        key, positions = ("residual", entry["layer"]), list(entry["positions"])
        expected = ((clean_values[key] - values[key]) * grads[key])[positions].sum()
        assert entry["estimate"] == pytest.approx(expected.item(), abs=1e-5)
    pair = embedded.batch([clean, corrupted])
    p_corrupted = embedded.next_token_probs(corrupted)[token].item()
    for entry in check_verified(rows, 2, 3):
        patch = ActivationPatch("residual", (entry["layer"],), tuple(entry["positions"]), source_row=0)
        p_patched = embedded.next_token_probs(pair, [patch])[1, token].item()
        assert entry["p_patched"] == pytest.approx(p_patched, abs=1e-6)
        assert entry["exact"] == pytest.approx(p_patched - p_corrupted, abs=1e-6)


def test_patch_estimate_command_verifies_the_largest_estimates_and_reports_their_agreement(embedded, world,
                                                                                           tmp_path):
    out = tmp_path / "patch"
    result = runner.invoke(app, ["patch", "--data", str(world), "--split", "test", "--limit", "2", "--categories",
                                 "QueryAttr", "--categories", "ChooseRel", "--estimate", "atp", "--verify", "6",
                                 "--verify-random", "4", "--out", str(out), "--wandb"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "results.parquet")
    groups = table["group"].nunique()
    assert len(table) == table["example"].nunique() * groups * embedded.n_layers
    dataset = load_questions(world, "test", limit=2, categories=["QueryAttr", "ChooseRel"])
    for example, part in table.groupby("example"):
        rows = part.to_dict("records")
        verified = check_verified(rows, 6, 4)
        row = dataset[int(example)]
        clean = example_of(embedded, row)
        other = next(dataset[(int(example) + k) % len(dataset)] for k in range(1, len(dataset))
                     if dataset[(int(example) + k) % len(dataset)]["image_id"] != row["image_id"])
        corrupted = embedded.prepare(other["image"].convert("RGB").resize(row["image"].size), row["question"],
                                     boxes=clean.meta[0]["boxes"])
        token = int(embedded.next_token_probs(clean).argmax())
        p_corrupted = embedded.next_token_probs(corrupted)[token].item()
        pair = embedded.batch([clean, corrupted])
        for entry in verified[:3]:
            positions = tuple(corrupted.positions(entry["group"], 0).tolist())
            patch = ActivationPatch("residual", (entry["layer"],), positions, source_row=0)
            p_patched = embedded.next_token_probs(pair, [patch])[1, token].item()
            assert entry["exact"] == pytest.approx(p_patched - p_corrupted, abs=1e-6)
    summary = pd.read_csv(out / "summary.csv")  # the mean estimate per group × layer
    expected = table.groupby(["group", "layer"])["estimate"].mean()
    assert summary.set_index(["group", "layer"])["mean"].to_numpy() == pytest.approx(
        expected.loc[summary.set_index(["group", "layer"]).index].to_numpy(), abs=1e-9)
    printed = result.stdout
    assert "first-order estimate against the exact effect" in printed and "Spearman" in printed
    assert (out / "patch.png").exists() and (out / "patch_estimates.png").exists()
    [logged] = list(out.glob("wandb/offline-run-*/run-*.wandb"))  # the offline run's records
    recall = agreement_table(table, [])["recall_top"].iloc[0]
    record = logged.read_bytes()
    for key in ("agreement/spearman_top", "agreement/spearman_random", "agreement/recall_top"):
        assert key.encode() in record, key  # the run summary holds the agreement numbers
    assert json.dumps(recall).encode() in record


def test_the_agreement_numbers_match_scipy_and_a_hand_count():
    rng = np.random.default_rng(0)
    rows = []
    for example in range(3):
        estimates = rng.normal(size=12)
        exact = estimates + rng.normal(scale=0.8, size=12)
        order = np.argsort(-np.abs(estimates))
        verified = np.full(12, "", dtype=object)
        verified[order[:4]] = "top"
        verified[order[[6, 8, 10, 11]]] = "random"
        exact[verified == ""] = np.nan
        rows += [{"example": example, "estimate": e, "exact": x, "verified": v}
                 for e, x, v in zip(estimates, exact, verified, strict=True)]
    table = pd.DataFrame(rows)
    [found] = agreement_table(table, []).to_dict("records")
    for which in ("top", "random"):
        part = table[table["verified"] == which]
        assert found[f"spearman_{which}"] == pytest.approx(stats.spearmanr(part["estimate"], part["exact"]).statistic)
        per_question = [stats.spearmanr(q["estimate"], q["exact"]).statistic
                        for _, q in part.groupby("example")]
        assert found[f"median_spearman_{which}"] == pytest.approx(float(np.median(per_question)))
    recalls = []
    for _, question in table[table["verified"] != ""].groupby("example"):
        largest = set(question["exact"].abs().nlargest(4).index)
        recalls.append(len(largest & set(question[question["verified"] == "top"].index)) / 4)
    assert found["recall_top"] == pytest.approx(float(np.mean(recalls)))
    assert (found["questions"], found["top"], found["random"]) == (3, 12, 12)


@pytest.mark.parametrize(("command", "flag"), [
    (["patch", "--verify", "5"], "--verify"),
    (["patch", "--estimate", "atp", "--metric", "odds"], "--metric"),
    (["patch", "--estimate", "gradient"], "--estimate"),
    (["map", "--kind", "knockout", "--verify-random", "3"], "--verify-random"),
    (["map", "--kind", "atp-patch", "--verify", "-1"], "--verify"),
])
def test_estimate_options_are_refused_in_one_line_naming_them(world, tmp_path, command, flag):
    result = runner.invoke(app, [*command, "--data", str(world), "--split", "test", "--limit", "1", "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert flag in line
    assert not (tmp_path / "run").exists()


def test_the_map_draws_the_verified_exact_map_beside_the_estimate_and_a_scatter(world, tmp_path):
    out = tmp_path / "map"
    result = runner.invoke(app, ["map", "--data", str(world), "--split", "test", "--limit", "2", "--categories",
                                 "QueryAttr", "--kind", "atp-knockout", "--kind", "atp-patch", "--target", "last",
                                 "--center", "3", "--layer", "2", "--region", "4", "--verify", "3",
                                 "--verify-random", "3", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["kind"]) == {"atp-knockout", "atp-patch"}
    for kind, part in table.groupby("kind"):
        assert (part["verified"] == "top").sum() == 3 * part["example"].nunique(), kind
    assert (out / "map_estimates.png").exists()
    assert "Estimates (Δ prob" in result.stdout and "atp-knockout:" in result.stdout
    from mmscope.experiments.maps.figures import panel_rows, with_verified
    first = table[table["example"] == table["example"].min()]
    assert [kind for kind, _, _ in panel_rows(with_verified(first))] == [
        "atp-knockout", "atp-knockout verified", "atp-patch", "atp-patch verified"]
    assert torch.isfinite(torch.tensor(table["estimate"].to_numpy())).all()

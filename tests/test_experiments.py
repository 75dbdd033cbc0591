"""Every experiment command end to end on the embedded model, with small limits, and checks of its numbers
against the core API (`Model.next_token_probs`, `hidden_states`, `generate_answer` …) computed independently."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mmscope
from mmscope.cli import app
from mmscope.experiments.knockout import Flow
from mmscope.experiments.runner import example_of
from mmscope.experiments.workspace import load_questions, probe_datasets
from mmscope.interventions import ActivationPatch, CachedPatch, Intervention, Knockout, Truncate, knockout_window

runner = CliRunner()


def invoke(*args: str) -> str:
    """Run `mmscope ARGS`; what it printed to stdout (progress bars and warnings go to stderr)."""
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def common(world, out, limit="2") -> list[str]:
    return ["--data", str(world), "--split", "test", "--limit", limit, "--out", str(out)]


def first_token(model, example, label: str) -> int:
    """The first token the model writes: the argmax of its clean next-token distribution (`label` unused)."""
    return int(model.next_token_probs(example).argmax())


def recorded_example(config: dict, kind: str) -> tuple[list, Intervention]:
    """The variant key and the rebuilt intervention config.yaml records for one kind of intervention."""
    [example] = [e for e in config["interventions"]["examples"] if e["intervention"]["type"] == kind]
    return example["variant"], Intervention.from_dict(example["intervention"])


def test_knockout_command_writes_table_figure_config_and_its_dp_matches_the_core_api(embedded, world, tmp_path):
    out = tmp_path / "ko"
    printed = invoke("knockout", *common(world, out), "--flow", "image->last", "--flow", "question->last",
                     "--window", "3", "--include-all")
    assert "Largest mean drop" in printed
    for name in ("results.parquet", "summary.csv", "knockout.png", "config.yaml"):
        assert (out / name).exists(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiment"]["window"] == 3 and "torch" in config["versions"]
    recorded = config["interventions"]
    assert recorded["parameters"] == {"flows": ["image->last", "question->last"], "window": 3,
                                      "centers": list(range(embedded.n_layers))}
    assert recorded["variants"] == 2 * embedded.n_layers
    variant, intervention = recorded_example(config, "Knockout")
    assert variant == ["image->last", 0]
    assert intervention == Knockout("image", "last", knockout_window(0, 3, embedded.n_layers), keep_self=True)
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == table["example"].nunique() * 2 * embedded.n_layers
    row = table.iloc[5]
    dataset = load_questions(world, "test", limit=2)
    example = example_of(embedded, dataset[int(row["example"])])
    token = int(embedded.next_token_probs(example).argmax())  # the first token the model writes
    layers = knockout_window(int(row["center"]), 3, embedded.n_layers)
    p_ko = embedded.next_token_probs(example, [Flow.parse(row["flow"]).knockout(layers)])[token].item()
    p_clean = embedded.next_token_probs(example)[token].item()
    assert row["p_clean"] == pytest.approx(p_clean, abs=1e-6)
    assert row["delta_pct"] == pytest.approx((p_ko - p_clean) / p_clean * 100, abs=1e-3)
    summary = pd.read_csv(out / "summary.csv")
    means = table.groupby(["category", "flow", "center"])["delta_pct"].mean().reset_index()
    assert summary["mean"].to_numpy() == pytest.approx(means["delta_pct"].to_numpy())
    # The run's own config.yaml, given as --config, is the same run: it resumes (nothing left to do) and prints
    # the same report from the same table.
    assert invoke("knockout", "--config", str(out / "config.yaml")) == printed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table)


def test_wandb_offline_run_holds_the_summary_values(embedded, world, tmp_path):
    out = tmp_path / "lens"
    printed = invoke("lens", *common(world, out), "--wandb", "--include-all", "--lens-axis", "hidden-states")
    local = next(out.glob("wandb/offline-run-*"))
    # every layer's record kept, the embeddings' (layer −1) too: W&B drops a record at a negative step
    assert (pd.read_csv(out / "summary.csv")["layer"] == -1).any()
    assert "ignoring partial history record" not in (local / "logs" / "debug-internal.log").read_text()
    assert f"W&B: logged offline to {local}; upload it with: wandb sync {local}" in printed.splitlines()
    summary = pd.read_csv(out / "summary.csv")
    tables = list(out.glob("wandb/offline-run-*/files/media/table/summary_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    frame = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert frame[["category", "token", "layer"]].astype(str).values.tolist() == \
        summary[["category", "token", "layer"]].astype(str).values.tolist()
    assert frame["mean"].to_numpy() == pytest.approx(summary["mean"].to_numpy())
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))


def test_lens_command_reports_the_normed_lens_and_its_probabilities_match_the_core_api(embedded, world, tmp_path):
    printed = invoke("lens", *common(world, tmp_path / "lens"), "--lens", "normed", "--include-all")
    assert "normed lens" in printed
    assert yaml.safe_load((tmp_path / "lens" / "config.yaml").read_text())["interventions"] == {}
    table = pd.read_parquet(tmp_path / "lens" / "results.parquet")
    dataset = load_questions(world, "test", limit=2)
    for token in ("answer", "false_option"):
        row = table[(table["token"] == token) & (table["layer"] == embedded.n_layers // 2)].iloc[0]
        question = dataset[int(row["example"])]
        assert str(question["question_id"]) == row["question_id"]
        example = example_of(embedded, question)
        expected = (first_token(embedded, example, question["answer"]) if token == "answer"
                    else embedded.answer_tokens(example, question["false_option"])[0][0])
        assert row["token_id"] == expected
        last = example.layout["last"][0]
        states = embedded.hidden_states(example)[1:, 0, last]  # after each decoder layer
        probs = embedded.unembed(states, normed=True).softmax(-1)
        assert row["prob"] == pytest.approx(probs[int(row["layer"]), expected].item(), abs=1e-6)


def test_truncate_command_exits_after_each_layer_and_the_last_layer_is_the_clean_run(embedded, world, tmp_path):
    invoke("truncate", *common(world, tmp_path / "truncate"), "--include-all")
    truncated = pd.read_parquet(tmp_path / "truncate" / "results.parquet")
    last = truncated[truncated["layer"] == embedded.n_layers - 1]
    assert last["p_answer"].to_numpy() == pytest.approx(last["p_clean"].to_numpy(), abs=1e-6)
    # below the last layer, against transformers' own hidden state after that layer, read through the final norm
    # and lm_head by hand (where exiting early changes the answer's probability)
    dataset = load_questions(world, "test", limit=2)
    changed = 0
    for _, row in truncated[truncated["layer"] < embedded.n_layers - 1].iterrows():
        example = example_of(embedded, dataset[int(row["example"])])
        with torch.no_grad():
            hidden = embedded.hf(**embedded.model_inputs(example), output_hidden_states=True).hidden_states
            logits = embedded.hf.lm_head(embedded.hf.model.language_model.norm(hidden[row["layer"] + 1][0, -1]))
        probs = logits.float().softmax(-1)
        token = first_token(embedded, example, "")
        assert row["p_answer"] == pytest.approx(probs[token].item(), abs=1e-5), row.to_dict()
        assert row["top1"] == float(int(probs.argmax()) == token)
        changed += abs(row["p_answer"] - row["p_clean"]) > 1e-3
    assert changed, "exiting early must change p(answer) somewhere"
    config = yaml.safe_load((tmp_path / "truncate" / "config.yaml").read_text())
    assert config["interventions"]["parameters"] == {"layers": list(range(embedded.n_layers))}
    assert recorded_example(config, "Truncate") == ([0], Truncate(0))


def test_patch_command_writes_its_heatmap_and_its_probabilities_match_the_core_api(embedded, world, tmp_path):
    invoke("patch", *common(world, tmp_path / "patch", limit="2"), "--include-all")
    assert (tmp_path / "patch" / "patch.png").exists()
    config = yaml.safe_load((tmp_path / "patch" / "config.yaml").read_text())
    assert config["interventions"]["parameters"] == {
        "site": "residual", "groups": ["image", "object", "question", "last"], "layers": list(range(embedded.n_layers))}
    assert recorded_example(config, "CachedPatch") == (["image", 0], CachedPatch("residual", (0,), "image"))
    table = pd.read_parquet(tmp_path / "patch" / "results.parquet")
    row = table[(table["group"] == "image") & (table["layer"] == 1)].iloc[0]
    dataset = load_questions(world, "test", limit=2)
    question = dataset[int(row["example"])]
    assert str(question["question_id"]) == row["question_id"]
    # The pair as the experiment builds it: the clean example, and the same question about the corrupting image;
    # its probabilities computed independently of the engine and of any cache, as a [clean, corrupted] batch.
    clean = example_of(embedded, question)
    assert row["corrupting_image_id"] != row["image_id"]
    corrupting = next(other["image"] for other in dataset if str(other["image_id"]) == row["corrupting_image_id"])
    corrupted = embedded.prepare(corrupting.convert("RGB"), question["question"], boxes=clean.meta[0]["boxes"])
    pair = embedded.batch([clean, corrupted])
    token = first_token(embedded, clean, question["answer"])
    p_clean, p_corrupted = embedded.next_token_probs(pair)[:, token].tolist()
    p_patched = embedded.next_token_probs(pair, [ActivationPatch("residual", (1,), "image")])[1, token].item()
    assert row["p_clean"] == pytest.approx(p_clean, abs=1e-6)
    assert row["p_corrupted"] == pytest.approx(p_corrupted, abs=1e-6)
    assert row["p_patched"] == pytest.approx(p_patched, abs=1e-6)
    if abs(p_clean - p_corrupted) >= 0.05:
        assert row["restored"] == pytest.approx((p_patched - p_corrupted) / (p_clean - p_corrupted), abs=1e-4)
    else:
        assert pd.isna(row["restored"])


def test_probe_command_trains_a_probe_per_layer_for_both_tasks(embedded, world, tmp_path):
    # Without its controls (tests/test_probe_controls.py runs them): the columns it always had, and no others.
    printed = invoke("probe", "--data", str(world), "--split", "test", "--n-images", "12", "--no-controls",
                     "--out", str(tmp_path / "probe"))
    assert "best layer" in printed and "selectivity" not in printed
    probes = pd.read_parquet(tmp_path / "probe" / "results.parquet")
    assert set(probes["task"]) == {"entailment", "objects"}
    assert probes["layer"].nunique() == embedded.n_layers + 1
    assert set(probes.columns) == {"task", "pooling", "probe", "n", "layer", "accuracy", "f1", "accuracy_low",
                                   "accuracy_high"}
    assert (probes["accuracy_low"] <= probes["accuracy"]).all() and (probes["accuracy"] <= probes["accuracy_high"]).all()


def test_evaluate_prints_the_accuracy_an_answer_by_answer_count_gives(embedded, world):
    printed = invoke("evaluate", "--data", str(world), "--limit", "3")
    assert "image acc %" in printed and "blank image acc %" in printed and "chance acc %" in printed
    # One question at a time, with the image and with a black one of the same size, as evaluate's 4 new tokens.
    correct = {"image": Counter(), "blank image": Counter()}
    total, guess = Counter(), Counter()  # guess: a uniform guess's expected hits, over the options or answers seen
    questions = load_questions(world, "test", limit=3)
    seen = {c: {q["answer"] for q in questions if q["category"] == c} for c in set(questions["category"])}
    for question in questions:
        guess[question["category"]] += 0.5 if question["true_option"] else 1 / len(seen[question["category"]])
        image = question["image"].convert("RGB")
        label = question["answer"].strip().lower().rstrip(".")
        total[question["category"]] += 1
        for condition, picture in (("image", image), ("blank image", Image.new("RGB", image.size, (0, 0, 0)))):
            answer = embedded.generate_answer(embedded.prepare(picture, question["question"]), max_new_tokens=4)
            correct[condition][question["category"]] += answer.strip().lower().rstrip(".") == label
    expected = {}
    for category in [*total, "overall"]:
        n = total[category] if category != "overall" else total.total()
        hits = [counts[category] if category != "overall" else counts.total() for counts in (*correct.values(), guess)]
        expected[category] = (*(f"{100 * hit / n:.1f}" for hit in hits), str(n))
    printed_rows = re.finditer(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", printed, flags=re.MULTILINE)
    assert {match[1]: match.groups()[1:] for match in printed_rows} == expected


def test_evaluate_asks_held_out_statements_and_scores_them_one_by_one(embedded, world):
    printed = invoke("evaluate", "--data", str(world), "--limit", "1", "--statements", "4", "--no-blank")
    statements = printed[printed.index("Statements"):]
    pairs = probe_datasets(world, "test", 4)["entailment"]
    correct, total = Counter(), Counter()
    for pair in pairs:
        question = f"True or false: {pair['statement']}"
        answer = embedded.generate_answer(embedded.prepare(pair["image"].convert("RGB"), question), max_new_tokens=4)
        category = "true" if pair["label"] else f"false: {pair['negative_kind']} swapped"
        total[category] += 1
        correct[category] += answer.strip().lower() == ("true" if pair["label"] else "false")
    rows = re.finditer(r"^(true|false: \w+ swapped|overall)\s+([\d.]+)\s+(\d+)$", statements, flags=re.MULTILINE)
    expected = {category: (f"{100 * correct[category] / n:.1f}", str(n)) for category, n in total.items()}
    expected["overall"] = (f"{100 * correct.total() / total.total():.1f}", str(total.total()))
    assert {match[1]: match.groups()[1:] for match in rows} == expected
    assert f"about {len(set(pairs['image_id']))} images" in statements


def test_a_sweep_killed_midway_resumes_to_the_uninterrupted_table(embedded, world, tmp_path):
    args = ["knockout", *common(world, tmp_path / "whole", limit="2"), "--flow", "image->last", "--window", "3",
            "--include-all"]
    invoke(*args)
    whole = pd.read_parquet(tmp_path / "whole" / "results.parquet")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "mmscope.cli", "knockout", *common(world, killed, limit="2"),
               "--flow", "image->last", "--window", "3", "--include-all"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while len(list((killed / "parts").glob("*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list((killed / "parts").glob("*")))
    assert 0 < done_before < len(whole["example"].unique()) + 1
    invoke("knockout", *common(world, killed, limit="2"), "--flow", "image->last", "--window", "3", "--include-all")
    resumed = pd.read_parquet(killed / "results.parquet")
    pd.testing.assert_frame_equal(resumed, whole)


def test_embedded_model_answers_held_out_questions(embedded, world):
    from mmscope.experiments.answers import accuracy, greedy_answers

    dataset = load_questions(world, "test", limit=10)
    result = accuracy(dataset, greedy_answers(embedded, dataset, progress=False))
    # The shipped checkpoint measured 97.0% on 3600 held-out questions (model card; 42/42 on this sample) and
    # 37% with blank images; a broken one answers ~0%.
    assert result.overall >= 0.9, result
    assert all(result.correct[c] >= result.total[c] - 2 for c in result.total), result
    blank = accuracy(dataset, greedy_answers(embedded, dataset, blank=True, progress=False))
    assert blank.overall < result.overall - 0.4, blank


def test_training_command_runs_a_few_steps_and_saves_a_loadable_model(world, tmp_path):
    out = tmp_path / "trained"
    invoke("train", "--out", str(out), "--data", str(world), "--vision-steps", "2", "--steps", "3",
           "--batch-size", "4", "--eval-every", "3")
    log = json.loads((out / "training.json").read_text())
    assert [record["vision_step"] for record in log["history"] if "vision_step" in record] == [1, 2]
    assert [record["step"] for record in log["history"] if "step" in record] == [1, 2, 3]
    model = mmscope.load(out)
    assert torch.isfinite(model.next_token_probs(example_of(model, load_questions(world, "test", limit=1)[0]))).all()
    # The same seed gives the same weights (the recipe is reproducible), another seed different ones.
    from safetensors.torch import load_file

    for seed, same in (("0", True), ("1", False)):
        again = tmp_path / f"seed-{seed}"
        invoke("train", "--out", str(again), "--data", str(world), "--vision-steps", "2", "--steps", "3",
               "--batch-size", "4", "--eval-every", "3", "--seed", seed)
        first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
        assert all(torch.equal(first[name], second[name]) for name in first) == same


def test_a_training_run_killed_midway_resumes_to_the_uninterrupted_weights(world, tmp_path):
    from safetensors.torch import load_file

    settings = ["--data", str(world), "--vision-steps", "2", "--steps", "10", "--batch-size", "4",
                "--eval-every", "2"]
    invoke("train", "--out", str(tmp_path / "whole"), *settings)
    assert not (tmp_path / "whole" / "resume.pt").exists()  # removed once the run is complete
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mmscope.cli", "train", "--out", str(killed), *settings],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "resume.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "resume.pt").exists() and not (killed / "model.safetensors").exists()
    other = runner.invoke(app, ["train", "--out", str(killed), *settings, "--lr", "0.01"])
    assert other.exit_code == 2
    assert "other settings (lr: 0.0015 there, 0.01 now); rerun with those" in other.stderr
    printed = invoke("train", "--out", str(killed), *settings)
    assert "resuming" in printed
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    steps = [r["step"] for r in json.loads((killed / "training.json").read_text())["history"] if "step" in r]
    assert steps == list(range(1, 11))


def test_probe_split_holds_out_whole_images():
    from mmscope.probes import layerwise

    # Two statements per image with opposite labels and identical features: a probe that memorises an image's
    # pair would score 0 on a per-statement split; held-out images leave it at chance on every layer.
    features = torch.randn(40, 1, 8).repeat_interleave(2, dim=0)
    labels = torch.tensor([1, 0] * 40)
    groups = [str(i // 2) for i in range(80)]
    scores = layerwise(features, labels, multilabel=False, groups=groups)
    assert len(scores) == 1 and 0.3 <= scores[0]["accuracy"] <= 0.7


def test_patch_says_how_many_examples_its_means_average_and_why_the_others_are_left_out():
    from mmscope.experiments.patch import MIN_EFFECT, patch_findings

    nan = float("nan")
    table = pd.DataFrame({"example": [0, 0, 1, 1, 2, 2], "group": ["image"] * 6, "layer": [0, 1] * 3,
                          "restored": [0.5, 0.25, nan, nan, 1.0, nan]})
    summary = table.groupby(["group", "layer"])["restored"].agg(mean="mean").reset_index()
    lines = patch_findings(table, summary, None)
    assert lines[0] == (f"the means average 2 of 3 examples: 1 left out because the corrupted image moved "
                        f"p(answer) by less than {MIN_EFFECT:g} (nothing to restore)")
    assert patch_findings(table[table["example"] != 1], summary, None)[0] == "the means average all 2 examples"

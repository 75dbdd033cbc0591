"""`mmscope map`: region knockout maps, checked against one naive knockout per region, the regions' grid
geometry on a fixed patch grid, and the command end to end on the embedded model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from families import build_kosmos2, build_llava_next
from PIL import Image
from typer.testing import CliRunner

import mmscope
from mmscope.cli import app
from mmscope.experiments.answers import clean_answer
from mmscope.experiments.knockout import default_window
from mmscope.experiments.maps import (
    MapOptions,
    draw_example_map,
    example_regions,
    grid_regions,
    map_rows,
    map_variants,
    object_centred,
    panel_rows,
)
from mmscope.experiments.options import OptionError
from mmscope.experiments.runner import Question, Sweep, example_of
from mmscope.experiments.workspace import load_questions
from mmscope.interventions import ActivationPatch, Knockout, knockout_window

runner = CliRunner()


def square(seed: int = 0, side: int = 32) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8).numpy())


ONE_QUESTION = {"image": square(), "question": "Is the cube red or blue?"}  # the data a map's variants are built on


def test_regions_of_a_2x2_block_setting_follow_the_fixed_grid(tiny):
    # The tiny LLaVA: 32x32 images, 8-px patches, a 4x4 grid; image token k sits at row k // 4, column k % 4 of
    # a square image (its center crop crops nothing).
    image = square()
    example = tiny.prepare(image, "Is the cube red or blue?")
    image_positions = example.layout["image"]
    assert len(image_positions) == 16
    regions = example_regions(tiny, image, example, 2)
    assert [(r.row, r.col) for r in regions] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.rectangle for r in regions] == [(0, 0, 16, 16), (16, 0, 32, 16), (0, 16, 16, 32), (16, 16, 32, 32)]
    for region in regions:
        tokens = [k for k in range(16) if (k // 4) // 2 == region.row and (k % 4) // 2 == region.col]
        assert region.positions == tuple(image_positions[k] for k in tokens)
    # Side 1: one region per patch, the patch's own rectangle, in token order.
    singles = example_regions(tiny, image, example, 1)
    assert [r.positions for r in singles] == [(p,) for p in image_positions]
    assert singles[5].rectangle == (8, 8, 16, 16)


def test_grid_regions_leave_out_tokens_without_a_patch():
    rectangles = torch.tensor([[0, 0, 8, 8], [8, 0, 16, 8], [float("nan")] * 4, [0, 8, 8, 16], [8, 8, 16, 16]])
    regions = grid_regions(rectangles, [10, 11, 12, 13, 14], 2)
    assert len(regions) == 1 and regions[0].positions == (10, 11, 13, 14)
    assert regions[0].rectangle == (0, 0, 16, 16)
    assert grid_regions(torch.full((3, 4), float("nan")), [1, 2, 3], 1) == []


@pytest.mark.parametrize("engine", ["prefix", "naive"])
def test_a_region_map_equals_one_naive_knockout_per_region(tiny, engine):
    image = square(seed=3)
    example = tiny.prepare(image, "Is the cube red or blue?", boxes=[(2, 2, 12, 12)])
    answer = clean_answer(tiny, example, "red")
    options = MapOptions(region=2, window=2, centers=[1], model="unused", engine=engine)
    sweep = Sweep(tiny, None, options)
    row = {"image": image}
    rows = map_rows(sweep, Question(0, row, example, answer))
    assert len(rows) == 2 * 4  # targets last, question × 4 regions
    layers = knockout_window(1, 2, tiny.n_layers)
    token = answer.first_token
    p_clean = tiny.next_token_probs(example)[token].item()
    for entry in rows:
        p_ko = tiny.next_token_probs(example, [Knockout(tuple(entry["positions"]), entry["target"], layers)])
        p_ko = p_ko[token].item()
        assert entry["p_clean"] == pytest.approx(p_clean, abs=1e-6)
        assert entry["p_ko"] == pytest.approx(p_ko, abs=1e-6)
        assert entry["delta_pct"] == pytest.approx((p_ko - p_clean) / p_clean * 100, abs=1e-3)
    # The box (2, 2, 12, 12) overlaps the top-left block only… and the patches of (8..16) too: blocks 0 only.
    on = {entry["region"] for entry in rows if entry["on_object"]}
    assert on == {0}


def test_options_refuse_unknown_targets():
    with pytest.raises(OptionError, match="--target"):
        MapOptions(targets=["image"], model="unused")


def test_map_command_writes_rows_and_maps(embedded, world, tmp_path):
    out = tmp_path / "map"
    result = runner.invoke(app, ["map", "--data", str(world), "--split", "test", "--limit", "1", "--out", str(out),
                                 "--region", "2", "--include-all"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = result.stdout
    assert "object regions" in printed or "no object box" in printed
    table = pd.read_parquet(out / "results.parquet")
    examples = sorted(table["example"].unique())  # --limit 1 takes one question per category
    for name in ("results.parquet", "summary.csv", "map.png", "config.yaml", *(f"map_{e}.png" for e in examples[:6])):
        assert (out / name).exists(), name
    assert set(table["target"]) == {"last", "question"}
    n_regions = table["region"].nunique()
    assert len(table) == 2 * n_regions * len(examples)
    # The regions tile the image: their rectangles' areas sum to the image's.
    dataset = load_questions(world, "test", limit=1)
    first = int(examples[0])
    image = dataset[first]["image"]
    last = table[(table["target"] == "last") & (table["example"] == first)]
    area = ((last["x1"] - last["x0"]) * (last["y1"] - last["y0"])).sum()
    assert area == pytest.approx(image.width * image.height, rel=1e-6)
    # The first example's rows checked against the core API, one knockout each.
    example = example_of(embedded, dataset[first])
    layers = knockout_window(embedded.n_layers // 2, default_window(embedded.n_layers), embedded.n_layers)
    token = int(embedded.next_token_probs(example).argmax())  # the first token the model writes
    p_clean = embedded.next_token_probs(example)[token].item()
    for _, row in last.iterrows():
        assert (int(row["first_layer"]), int(row["last_layer"])) == (layers[0], layers[-1])
        p_ko = embedded.next_token_probs(example, [Knockout(tuple(row["positions"]), "last", layers)])[token].item()
        assert row["p_ko"] == pytest.approx(p_ko, abs=1e-6)
        assert row["delta_pct"] == pytest.approx((p_ko - p_clean) / p_clean * 100, abs=1e-3)
    assert "maps over the images" in printed
    # config.yaml records what ran: the first question's own regions (its first variant blocks region 0's positions)
    config = yaml.safe_load((out / "config.yaml").read_text())
    [recorded] = [e for e in config["interventions"]["examples"] if e["intervention"]["type"] == "Knockout"]
    region_zero = table[(table["example"] == 0) & (table["region"] == 0)].iloc[0]["positions"]
    assert list(recorded["intervention"]["source"]) == list(region_zero)
    # The run's own config.yaml is the same run: it resumes (nothing left to do) and prints the same report.
    again = runner.invoke(app, ["map", "--config", str(out / "config.yaml")], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    defaults = [line for line in printed.splitlines() if line.startswith(("  window", "  center"))]
    assert len(defaults) == 2  # the defaults chosen are printed; the config names them, so the rerun does not
    assert again.stdout.splitlines() == [line for line in printed.splitlines() if line not in defaults]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table)


def test_a_family_without_patch_rectangles_is_refused_naming_it(world, tmp_path):
    folder = build_kosmos2(tmp_path / "kosmos2")
    kosmos = mmscope.load(folder)
    with pytest.raises(OptionError, match="kosmos2 family") as error:
        map_variants(MapOptions(model="unused", window=1, centers=[0]), kosmos, [ONE_QUESTION])
    assert "\n" not in str(error.value)
    result = runner.invoke(app, ["map", "--model", str(folder), "--data", str(world), "--split", "test", "--limit",
                                 "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "kosmos2 family" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder opens


def test_an_image_shown_at_two_scales_holds_two_grids_finest_first():
    coarse = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]])
    fine = torch.tensor([[x, y, x + 8, y + 8] for y in range(0, 32, 8) for x in range(0, 32, 8)])
    regions = grid_regions(torch.cat([coarse, fine]).float(), list(range(100, 120)), 2)
    assert [r.grid for r in regions] == [0] * 4 + [1]  # 2x2 blocks of the 4x4 fine grid, then the 2x2 coarse one
    assert [r.rectangle for r in regions[:4]] == [(0, 0, 16, 16), (16, 0, 32, 16), (0, 16, 16, 32), (16, 16, 32, 32)]
    assert regions[0].positions == (104, 105, 108, 109)
    assert regions[4].positions == (100, 101, 102, 103) and regions[4].rectangle == (0, 0, 32, 32)


# --- the other kinds of map: patch, lens, attention -------------------------------------------------------------

def question_of(model, image, text="Is the cube red or blue?", **row):
    example = model.prepare(image, text, boxes=[(2, 2, 12, 12)])
    row = {"image": image, "question": text, "image_id": "a", "question_id": "q0", **row}
    return Question(0, row, example, clean_answer(model, example, "red"))


def test_the_lens_map_equals_unembedding_the_image_tokens_hidden_states(tiny):
    question = question_of(tiny, square(seed=4), object_names=["cube"])
    layers = list(range(tiny.n_layers))
    image = question.example.layout["image"]
    out = tiny.hf(**tiny.model_inputs(question.example), output_hidden_states=True)
    norm, head = tiny.hf.model.language_model.norm, tiny.hf.lm_head
    for which in ("answer", "object"):
        options = MapOptions(kinds=["lens"], layers=layers, lens_token=which, model="unused")
        rows = map_rows(Sweep(tiny, None, options), question)  # --region 1: one region per image token
        assert {row["kind"] for row in rows} == {"lens"} and len(rows) == len(layers) * len(image)
        token = question.answer.first_token if which == "answer" else \
            tiny.tokenizer("cube", add_special_tokens=False)["input_ids"][0]
        for row in rows:
            [position] = row["positions"]
            layer = row["layer"]
            with torch.no_grad():  # HF's last hidden state is already normed: its own logits
                logits = out.logits[0, position] if layer == tiny.n_layers - 1 else \
                    head(norm(out.hidden_states[layer + 1][0, position]))
            assert row["target"] == which and row["token_id"] == token
            assert row["prob"] == pytest.approx(logits.softmax(-1)[token].item(), abs=1e-6)


@pytest.mark.parametrize("site", ["residual", "mlp"])
def test_region_patching_equals_a_naive_patch_per_region(embedded, world, site):
    dataset = load_questions(world, "test", limit=2)
    options = MapOptions(kinds=["patch"], layers=[2, 5], site=site, region=4, model="unused")
    for index in range(len(dataset)):  # the first question whose corruption moves p(answer) enough for a share
        row = dataset[index]
        clean = example_of(embedded, row)
        question = Question(index, row, clean, clean_answer(embedded, clean, row["answer"]))
        rows = map_rows(Sweep(embedded, dataset, options), question)
        if not math.isnan(rows[0]["restored"]):
            break
    other = next(dataset[j] for j in range(index + 1, len(dataset)) if dataset[j]["image_id"] != row["image_id"])
    assert {entry["corrupting_image_id"] for entry in rows} == {str(other["image_id"])}
    n_regions = len({entry["region"] for entry in rows})
    assert len(rows) == 2 * n_regions and {entry["target"] for entry in rows} == {site}
    corrupted = embedded.prepare(other["image"].convert("RGB").resize(row["image"].size), row["question"],
                                 boxes=clean.meta[0]["boxes"])
    token = question.answer.first_token
    p_clean = embedded.next_token_probs(clean)[token].item()
    p_corrupted = embedded.next_token_probs(corrupted)[token].item()
    assert abs(p_clean - p_corrupted) >= 0.05
    pair = embedded.batch([clean, corrupted])
    for entry in rows:
        patch = ActivationPatch(site, (entry["layer"],), tuple(entry["positions"]), source_row=0)
        p_patched = embedded.next_token_probs(pair, [patch])[1, token].item()
        assert entry["p_clean"] == pytest.approx(p_clean, abs=1e-6)
        assert entry["p_corrupted"] == pytest.approx(p_corrupted, abs=1e-6)
        assert entry["p_patched"] == pytest.approx(p_patched, abs=1e-6)
        assert entry["restored"] == pytest.approx((p_patched - p_corrupted) / (p_clean - p_corrupted), abs=1e-4)
    assert len({round(entry["p_patched"], 6) for entry in rows}) > 1  # each region's patch is its own


def test_the_attention_map_equals_hf_attention_weights_under_eager_attention(tiny):
    question = question_of(tiny, square(seed=7))
    options = MapOptions(kinds=["attention"], layers=list(range(tiny.n_layers)), region=2, model="unused")
    rows = map_rows(Sweep(tiny, None, options), question)
    assert {row["target"] for row in rows} == {"last", "question"} and len(rows) == 2 * tiny.n_layers * 4
    layout = question.example.layout
    out = tiny.hf(**tiny.model_inputs(question.example), output_attentions=True)
    for row in rows:
        weights = out.attentions[row["layer"]][0].mean(0)  # [T, T], the mean over heads
        queries = layout["last"] if row["target"] == "last" else layout["question"]
        expected = weights[queries][:, row["positions"]].mean(0).sum().item()
        assert row["attention"] == pytest.approx(expected, abs=1e-6)


def test_one_heads_attention_map_from_the_object_word_equals_hf_attention_weights(tiny):
    image = square(seed=7)
    example = tiny.prepare(image, "Is the cube red or blue?", boxes=[(2, 2, 12, 12)], words=["cube"])
    row = {"image": image, "question": "Is the cube red or blue?", "image_id": "a", "question_id": "q0"}
    question = Question(0, row, example, clean_answer(tiny, example, "red"))
    layout = example.layout
    assert tiny.tokenizer.decode(example.inputs["input_ids"][0][layout["object_word"]]).strip() == "cube"
    out = tiny.hf(**tiny.model_inputs(example), output_attentions=True)
    for head in range(tiny.n_heads):
        options = MapOptions(kinds=["attention"], targets=["object_word", "last"], layers=[0, 1], region=2,
                             head=head, model="unused")
        rows = map_rows(Sweep(tiny, None, options), question)
        assert {r["target"] for r in rows} == {"object_word", "last"} and {r["head"] for r in rows} == {head}
        for entry in rows:
            weights = out.attentions[entry["layer"]][0, head]  # [T, T], that head alone
            expected = weights[layout[entry["target"]]][:, entry["positions"]].mean(0).sum().item()
            assert entry["attention"] == pytest.approx(expected, abs=1e-6)
    # A question that names no object has no object_word: its rows are the other targets'.
    bare = Question(0, row, tiny.prepare(image, "Is the cube red or blue?"), question.answer)
    options = MapOptions(kinds=["attention"], targets=["object_word", "last"], layers=[0], model="unused")
    assert {r["target"] for r in map_rows(Sweep(tiny, None, options), bare)} == {"last"}
    with pytest.raises(OptionError, match=r"head 9 \(--head\): .* heads 0\.\.") as error:
        MapOptions(kinds=["attention"], head=9, model="unused").configure(tiny)
    assert "\n" not in str(error.value)


def test_attention_maps_are_refused_without_attention_weights(tiny_sdpa):
    with pytest.raises(OptionError, match="--kind attention") as error:
        map_variants(MapOptions(kinds=["attention"], model="unused"), tiny_sdpa, [ONE_QUESTION])
    assert "eager" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("options", "flag"), [
    ({"kinds": ["lens"], "site": "mlp"}, "--site"),
    ({"kinds": ["patch"], "targets": ["last"]}, "--target"),
    ({"kinds": ["knockout"], "layers": [1]}, "--layer"),
    ({"kinds": ["lens"], "centers": [1]}, "--center"),
    ({"kinds": ["attention"], "window": 2}, "--window"),
    ({"kinds": ["patch"], "lens_token": "object"}, "--lens-token"),
    ({"kinds": ["heatmap"]}, "--kind"),
    ({"kinds": ["lens"], "lens_token": "name"}, "--lens-token"),
    ({"kinds": ["knockout"], "head": 0}, "--head"),
    ({"kinds": ["attention"], "head": -1}, "--head"),
    ({"kinds": ["attention"], "targets": ["word"]}, "--target"),
])
def test_options_a_kind_does_not_use_are_refused_naming_them(options, flag):
    with pytest.raises(OptionError, match=flag) as error:
        MapOptions(model="unused", **options)
    assert "\n" not in str(error.value)


def test_the_object_centred_map_puts_the_box_in_the_middle_third():
    # A 2x2 map of a 32x32 image; the box is the bottom-right region: the middle third holds its value.
    part = pd.DataFrame({"grid": [0] * 4, "x0": [0, 16, 0, 16], "y0": [0, 0, 16, 16], "x1": [16, 32, 16, 32],
                         "y1": [16, 16, 32, 32], "value": [1.0, 2.0, 3.0, 4.0]})
    centred = object_centred(part, (16, 16, 16, 16), cells=6)
    assert (centred[2:4, 2:4] == 4.0).all()
    assert (centred[0:2, 0:2] == 1.0).all() and (centred[0:2, 2:4] == 2.0).all() and (centred[2:4, 0:2] == 3.0).all()
    assert np.isnan(centred[4:, :]).all() and np.isnan(centred[:, 4:]).all()  # past the image


def test_map_command_writes_every_kind_and_logs_the_maps_to_wandb(embedded, world, tmp_path):
    out = tmp_path / "map"
    kinds = ["--kind", "knockout", "--kind", "patch", "--kind", "lens", "--kind", "attention"]
    result = runner.invoke(app, ["map", "--data", str(world), "--split", "test", "--limit", "2", "--categories",
                                 "QueryAttr", "--out", str(out), "--region", "4", *kinds, "--target", "last", "--center", "2", "--center", "5",
                                 "--layer", "3", "--layer", "6", "--include-all", "--wandb"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "results.parquet")
    examples = sorted(table["example"].unique())
    n_regions = table["region"].nunique()
    assert n_regions == 4
    for kind, column, target in [("knockout", "delta_pct", "last"), ("patch", "restored", "residual"),
                                 ("lens", "prob", "answer"), ("attention", "attention", "last")]:
        part = table[table["kind"] == kind]
        assert set(part["target"]) == {target}, kind
        assert len(part) == 2 * n_regions * len(examples), kind  # 2 panels each
        assert sorted(part["layer"].unique()) == ([2, 5] if kind == "knockout" else [3, 6])
        assert part[column].notna().any(), kind
    assert (table[table["kind"] == "lens"]["prob"].between(0, 1)).all()
    summary = pd.read_csv(out / "summary.csv")  # each kind's own column, averaged per kind × target × layer × region
    for kind, column in [("knockout", "delta_pct"), ("attention", "attention")]:
        expected = table[table["kind"] == kind].groupby(["target", "layer", "region"])[column].mean()
        own = summary[summary["kind"] == kind].set_index(["target", "layer", "region"])["mean"]
        assert own.to_numpy() == pytest.approx(expected.loc[own.index].to_numpy())
    printed = result.stdout
    for heading in ("Region knockout", "Region patching", "Logit lens on the image tokens", "Attention to each"):
        assert heading in printed
    pngs = ["map.png", *(f"map_{int(e)}.png" for e in examples[:6])]
    for name in pngs:
        assert (out / name).exists(), name
    images = list(out.glob("wandb/offline-run-*/files/media/images/figures/*.png"))
    assert sorted(path.name.rsplit("_", 2)[0] for path in images) == sorted(name[:-4] for name in pngs)


def test_map_command_refuses_a_bad_combination_in_one_line(world, tmp_path):
    result = runner.invoke(app, ["map", "--data", str(world), "--split", "test", "--limit", "1", "--kind", "lens",
                                 "--window", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "--window" in line and "knockout" in line
    result = runner.invoke(app, ["map", "--data", str(world), "--split", "test", "--limit", "1", "--kind", "lens",
                                 "--layer", "99", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "--layer" in line
    assert not (tmp_path / "run").exists()


def test_an_image_shown_at_two_scales_is_drawn_at_both(tmp_path):
    # LLaVA-NeXT: the base image (a coarse grid) and its tiles (the fine one); a row of panels per grid.
    model = mmscope.load(build_llava_next(tmp_path / "llava-next"))
    image = square(seed=8, side=24)
    example = model.prepare(image, "Is the cube red or blue?", boxes=[(2, 2, 8, 8)])
    question = Question(0, {"image": image}, example, clean_answer(model, example, "red"))
    rows = map_rows(Sweep(model, None, MapOptions(kinds=["lens"], layers=[0, 1], model="unused")), question)
    table = pd.DataFrame(rows).assign(example=0)
    assert set(table["grid"]) == {0, 1}
    assert panel_rows(table) == [("lens", "answer", 0), ("lens", "answer", 1)]
    for grid, part in table[table["layer"] == 0].groupby("grid"):  # each grid tiles the whole image
        area = ((part["x1"] - part["x0"]) * (part["y1"] - part["y0"])).sum()
        assert area == pytest.approx(image.width * image.height, rel=1e-6), grid
    path = draw_example_map(image, table, [(2, 2, 8, 8)], tmp_path / "map_0.png", "two scales")
    assert path.exists()

"""The experiments' figures, checked from the drawn matplotlib objects (never pixels): one colour per curve name
in every panel, confidence bands inside their quantity's range, n in each panel's title, truncate drawing the
top-1 share, map figures without dead margins that say when a panel shows nothing."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from PIL import Image

from mmscope.experiments.figures import curves, n_text
from mmscope.experiments.knockout import knockout_figure
from mmscope.experiments.lens import lens_figure
from mmscope.experiments.maps import NO_EFFECT, draw_centred, draw_example_map
from mmscope.experiments.patch import patch_figure
from mmscope.experiments.probe import probe_figure
from mmscope.experiments.references import REFERENCES
from mmscope.experiments.runner import Finished
from mmscope.experiments.truncate import truncate_figure


@pytest.fixture
def drawn(monkeypatch):
    """The figures the code under test draws, kept open instead of closed after saving."""
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def panels(figure):
    """The axes that hold data (not colour bars, not switched off)."""
    return [axis for axis in figure.axes if axis.get_visible() and axis.axison and axis.get_label() != "<colorbar>"]


def lines_by_label(axis):
    return {line.get_label(): line for line in axis.get_lines() if not line.get_label().startswith("_")}


def band_ys(axis) -> np.ndarray:
    ys = [collection.get_paths()[0].vertices[:, 1] for collection in axis.collections
          if isinstance(collection, PolyCollection) and collection.get_paths()]
    return np.concatenate(ys)


def layered(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def lens_summary() -> pd.DataFrame:
    # ChooseAttr tracks four tokens; QueryAttr (no false option) only the answer's two. Bands leave [0, 1].
    rows = []
    for category, tokens, n in (("ChooseAttr", ["answer", "Answer", "false_option", "False_option"], 5),
                                ("QueryAttr", ["answer", "Answer"], 4)):
        for number, token in enumerate(tokens):
            for layer in range(4):
                mean = 0.1 + 0.2 * number
                rows.append({"category": category, "token": token, "layer": layer, "mean": mean, "n": n,
                             "ci_low": mean - 0.6, "ci_high": mean + 0.7})
    return layered(rows)


def test_every_curve_name_has_one_colour_in_every_panel_and_in_the_legend(tmp_path, drawn):
    lens_figure(Finished(None, lens_summary(), SimpleNamespace(lens="raw", lens_axis="layers")),
                tmp_path / "lens.png")
    [figure] = drawn
    choose, query = panels(figure)
    assert set(lines_by_label(query)) == {"answer", "Answer"}  # a panel without the false option
    for label, line in lines_by_label(query).items():
        assert to_rgba(line.get_color()) == to_rgba(lines_by_label(choose)[label].get_color()), label
    colours = {label: to_rgba(line.get_color()) for label, line in lines_by_label(choose).items()}
    assert len(set(colours.values())) == 4  # four names, four colours
    legend = {text.get_text(): to_rgba(handle.get_color())
              for text, handle in zip(figure.legends[0].get_texts(), figure.legends[0].legend_handles, strict=True)}
    assert legend == colours
    # Each band is its line's colour.
    for axis in (choose, query):
        bands = [c for c in axis.collections if isinstance(c, PolyCollection)]
        for band, line in zip(bands, lines_by_label(axis).values(), strict=True):
            assert to_rgba(band.get_facecolor()[0])[:3] == to_rgba(line.get_color())[:3]
    # A panel that lacks the first curve of another (the object flow: no question with a box) keeps the colours.
    summary = knockout_summary()
    summary = summary[(summary["category"] == "ChooseAttr") | (summary["flow"] != "object->question")]
    knockout_figure(Finished(None, summary, SimpleNamespace(reference=None, ci="normal", window=2)),
                    tmp_path / "knockout.png")
    both, fewer = panels(drawn[1])
    assert set(lines_by_label(fewer)) == {"question->last"}
    assert to_rgba(lines_by_label(fewer)["question->last"].get_color()) == \
        to_rgba(lines_by_label(both)["question->last"].get_color())


def test_a_curve_equal_to_another_adds_no_band_and_stays_visible_dashed(tmp_path, drawn):
    # A case-insensitive tokenizer: `answer` and `Answer` are one token, so one curve under two names.
    summary = lens_summary()
    query = summary["category"] == "QueryAttr"
    summary.loc[query & (summary["token"] == "Answer"), ["mean", "ci_low", "ci_high"]] = \
        summary.loc[query & (summary["token"] == "answer"), ["mean", "ci_low", "ci_high"]].to_numpy()
    lens_figure(Finished(None, summary, SimpleNamespace(lens="raw", lens_axis="layers")), tmp_path / "lens.png")
    choose, query_axis = panels(drawn[0])
    assert len([c for c in query_axis.collections if isinstance(c, PolyCollection)]) == 1
    assert len([c for c in choose.collections if isinstance(c, PolyCollection)]) == 4
    lines = lines_by_label(query_axis)
    assert lines["answer"].get_linestyle() == "-" and lines["Answer"].get_linestyle() == "--"


def test_probability_bands_are_clipped_to_0_1(tmp_path, drawn):
    lens_figure(Finished(None, lens_summary(), SimpleNamespace(lens="raw", lens_axis="layers")),
                tmp_path / "lens.png")
    for axis in panels(drawn[0]):
        ys = band_ys(axis)
        assert ys.min() >= 0.0 and ys.max() <= 1.0
        assert np.isclose(ys.min(), 0.0) and np.isclose(ys.max(), 1.0)  # clipped, not dropped


def knockout_summary(n_object: int = 3) -> pd.DataFrame:
    rows = []
    for category in ("ChooseAttr", "ChooseCat"):
        for flow, n in (("question->last", 5), ("object->question", n_object)):
            for center in range(8):
                mean = -90.0 if center in (2, 3) else -5.0
                rows.append({"category": category, "flow": flow, "center": center, "mean": mean, "n": n,
                             "ci_low": mean - 40.0, "ci_high": mean + 30.0})
    return layered(rows)


@pytest.mark.parametrize("reference", [None, next(iter(REFERENCES))])
def test_knockout_bands_stay_above_minus_100_percent_with_or_without_a_reference(tmp_path, drawn, reference):
    options = SimpleNamespace(reference=reference, ci="normal", window=2)
    knockout_figure(Finished(None, knockout_summary(), options), tmp_path / "knockout.png")
    axes = panels(drawn[0])
    for axis in axes:
        ys = band_ys(axis)
        assert ys.min() == pytest.approx(-100.0)
        assert ys.max() == pytest.approx(25.0)  # no upper bound: Δp% may exceed 0
    if reference is not None:  # the published curve is still drawn, dashed, over its panel
        assert any(line.get_linestyle() == "--" for line in axes[0].get_lines())


def test_each_panel_title_says_how_many_questions_it_averages(tmp_path, drawn):
    knockout_figure(Finished(None, knockout_summary(), SimpleNamespace(reference=None, ci="normal", window=2)),
                    tmp_path / "knockout.png")
    assert [axis.get_title() for axis in panels(drawn[0])] == ["ChooseAttr (n=3–5)", "ChooseCat (n=3–5)"]
    lens_figure(Finished(None, lens_summary(), SimpleNamespace(lens="raw", lens_axis="layers")),
                tmp_path / "lens.png")
    assert [axis.get_title() for axis in panels(drawn[1])] == ["ChooseAttr (n=5)", "QueryAttr (n=4)"]
    assert n_text([7, 7]) == "n=7" and n_text(pd.Series([2, 9])) == "n=2–9"


def test_truncate_draws_the_share_whose_answer_is_still_top1_not_p_answer(tmp_path, drawn):
    # Two categories × 3 layers; p(answer) and top-1 differ, so the drawn line tells which one is plotted.
    rows = []
    for category, top1s in (("ChooseAttr", [[0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]]),
                            ("QueryAttr", [[0, 1, 1], [1, 1, 1]])):
        for example, flags in enumerate(top1s):
            for layer, top1 in enumerate(flags):
                rows.append({"example": example, "category": category, "layer": layer, "p_clean": 0.9,
                             "p_answer": 0.3 + 0.1 * layer, "top1": float(top1)})
    table = pd.DataFrame(rows)
    p_summary = table.groupby(["category", "layer"])["p_answer"].agg(mean="mean", n="count").reset_index()
    truncate_figure(Finished(table, p_summary.assign(ci_low=0.0, ci_high=1.0), SimpleNamespace(ci="normal", seed=0)),
                    tmp_path / "truncate.png")
    choose, query = panels(drawn[0])
    [line] = choose.get_lines()
    assert list(line.get_ydata()) == pytest.approx([0.25, 0.75, 1.0])  # the top-1 share per layer
    assert "top-1" in line.get_label() and "top-1" in choose.get_ylabel()
    assert choose.get_title() == "ChooseAttr (n=4)" and query.get_title() == "QueryAttr (n=2)"
    for axis in (choose, query):
        ys = band_ys(axis)
        assert ys.min() >= 0.0 and ys.max() <= 1.0


def test_patch_heatmap_and_probe_curves_say_their_n(tmp_path, drawn):
    summary = pd.DataFrame({"group": ["image", "image", "object", "object"], "layer": [0, 1, 0, 1],
                            "mean": [0.9, 0.1, 0.8, 0.0], "n": [5, 5, 3, 3]})
    patch_figure(Finished(None, summary, SimpleNamespace(site="residual")), tmp_path / "patch.png")
    [axis] = [axis for axis in drawn[0].axes if axis.get_label() != "<colorbar>"]
    assert "(n=3–5)" in axis.get_title()
    assert [label.get_text() for label in axis.get_yticklabels()] == ["image (n=5)", "object (n=3)"]
    probes = pd.DataFrame({"curve": ["entailment / last"] * 2 + ["objects / image"] * 2, "layer": [0, 1] * 2,
                           "mean": [0.5, 0.7, 0.3, 0.6], "n": [240, 240, 60, 60],
                           "control_accuracy": [0.5] * 4, "shuffled_accuracy": [0.5] * 4, "selectivity": [0.0] * 4})
    probe_figure(Finished(None, probes, SimpleNamespace()), tmp_path / "probe.png")
    titles = [axis.get_title() for axis in drawn[1].axes]
    assert all("n=60–240" in title for title in titles), titles
    labels = [text.get_text() for text in drawn[1].legends[0].get_texts()]
    assert "entailment / last (n=240)" in labels and "objects / image (n=60)" in labels


def map_rows(kind: str, column: str, layers: dict[int, list[float]], side: int = 32, cells: int = 2) -> pd.DataFrame:
    """The rows of one example's map: `layers` → the values of its `cells` x `cells` regions."""
    rows = []
    step = side // cells
    for layer, values in layers.items():
        for region, value in enumerate(values):
            row, col = divmod(region, cells)
            rows.append({"example": 0, "kind": kind, "target": "last", "layer": layer, "region": region,
                         "grid": 0, column: value, "x0": col * step, "y0": row * step, "x1": (col + 1) * step,
                         "y1": (row + 1) * step, "has_object": True, "on_object": region == 0,
                         "center": layer, "first_layer": layer, "last_layer": layer})
    return pd.DataFrame(rows)


def notes(axis) -> str:
    return " ".join(text.get_text() for text in axis.texts)


def test_a_map_panel_without_a_measurable_effect_says_so(tmp_path, drawn):
    nan = float("nan")
    part = map_rows("patch", "restored", {0: [0.5, -0.2, 0.0, 0.1], 1: [0.0, 1e-7, -1e-7, 0.0], 2: [nan] * 4,
                                          3: [0.01, 0.0, -0.005, 0.0]})
    image = Image.new("RGB", (32, 32), "white")
    draw_example_map(image, part, [(0, 0, 16, 16)], tmp_path / "map_0.png", "a question")
    effect, flat, undefined, faint = panels(drawn[0])
    assert notes(effect) == ""
    assert "no measurable effect" in notes(flat) and f"< {NO_EFFECT['patch']:g}" in notes(flat)
    assert "no value" in notes(undefined) and "moved" in notes(undefined)
    assert "faint" in notes(faint) and "0.01" in notes(faint)  # 2 % of the scale's 0.5: too pale to see


def test_map_figures_wrap_long_rows_and_leave_no_dead_margin(tmp_path, drawn):
    image = Image.new("RGB", (32, 32), "white")
    eight = map_rows("lens", "prob", {layer: [0.1 * layer, 0.0, 0.02, 0.05] for layer in range(8)})
    draw_example_map(image, eight, [], tmp_path / "map_0.png", "eight layers")
    one = map_rows("knockout", "delta_pct", {3: [-40.0, 2.0, 0.0, 1.0]})
    draw_example_map(image, one, [], tmp_path / "map_1.png", "one window")
    for figure, expected in zip(drawn, (8, 1), strict=True):
        axes = panels(figure)
        assert len(axes) == expected
        assert len({round(axis.get_position().y0, 3) for axis in axes}) == -(-expected // 4)  # ≤ 4 a row
        width, height = figure.get_size_inches()
        for axis in axes:  # readable panels: about 2 inches or more
            assert axis.get_position().height * height >= 1.8
        everything = [axis for axis in figure.axes if axis.get_visible()]  # the colour bar included
        left = min(axis.get_position().x0 for axis in everything)
        right = max(axis.get_position().x1 for axis in everything)
        assert left < 0.1 and right > 0.8, (left, right)  # no empty band beside the panels
    # The object-centred mean: each panel's title names the examples it averages.
    means = {("lens", "last", layer): np.full((6, 6), 0.1 * layer) for layer in range(2)}
    draw_centred(means, 3, tmp_path / "map.png", 1, {}, {("lens", "last", 0): 3, ("lens", "last", 1): 2})
    titles = [axis.get_title() for axis in panels(drawn[2])]
    assert titles[0].endswith("(n=3)") and titles[1].endswith("(n=2)")
    assert "p < 0.001 everywhere" in notes(panels(drawn[2])[0]) and notes(panels(drawn[2])[1]) == ""


def test_a_layer_axis_with_the_embeddings_names_them_and_one_without_keeps_plain_numbers(drawn, tmp_path):
    rows = [{"layer": layer, "curve": "answer", "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 3}
            for layer in range(-1, 4)]
    curves(pd.DataFrame(rows), tmp_path / "a.png", x="layer", hue="curve", panel=None, ylabel="p", title="t")
    (axis,) = panels(drawn[-1])
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["embeddings", "0", "1", "2", "3"]
    curves(pd.DataFrame(rows[1:]), tmp_path / "b.png", x="layer", hue="curve", panel=None, ylabel="p", title="t")
    (axis,) = panels(drawn[-1])
    assert "embeddings" not in [tick.get_text() for tick in axis.get_xticklabels()]


def test_the_knockout_legend_keeps_the_order_the_flows_were_asked_for(drawn, tmp_path):
    summary = knockout_summary()
    flows = sorted(set(summary["flow"]), reverse=True)  # not alphabetical
    knockout_figure(Finished(None, summary, SimpleNamespace(reference=None, ci="normal", window=2, flows=flows)),
                    tmp_path / "knockout.png")
    legend = drawn[-1].legends[0]
    assert [text.get_text() for text in legend.get_texts()] == flows

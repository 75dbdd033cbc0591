"""The model card's planted-route table and statement paragraph, read off a training config."""

from __future__ import annotations

import json
from pathlib import Path

import mmscope.zoo.shapes_llava as shapes_llava
from mmscope.zoo.shapes_llava.card import blank_paragraph, planted_route, statement_paragraph

SHIPPED = json.loads((Path(shapes_llava.__file__).parent / "checkpoint" / "training.json").read_text())
CONFIG = SHIPPED["summary"]["config"]


def rows(text: str) -> dict[str, list[str]]:
    table = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in table[1:]}


def test_the_route_table_names_each_planted_step_in_mmscopes_layer_numbering():
    found = rows(planted_route({**CONFIG, "attention_layer": 3, "attention_head": 1, "grounding_layer": 5,
                                "gather_layer": 7}))
    assert list(found) == ["patch", "attention", "grounding", "gather", "named"]
    assert found["attention"][1:3] == ["layer 3", "head 1"]
    # hidden_states[k] is what layer k - 1 writes: the losses read hidden_states[grounding_layer]
    assert found["grounding"][1] == "after layer 4" and found["gather"][1] == "after layer 6"
    assert found["named"][0] == str(CONFIG["named_loss_weight"])


def test_a_loss_turned_off_leaves_its_row_out_and_no_loss_says_so():
    assert "attention" not in rows(planted_route({**CONFIG, "attention_loss_weight": 0.0}))
    off = {f"{loss}_loss_weight": 0.0 for loss in ("patch", "attention", "grounding", "gather", "named")}
    assert "nothing inside the decoder" in planted_route({**CONFIG, **off})


def test_statements_are_described_only_where_the_mix_holds_them():
    shipped = {**CONFIG, "blank_share": 0.0}  # the shipped config, without empty images
    assert statement_paragraph({**shipped, "turns": 1, "statement_share": 0.0, "first_statement_share": 0.0}) == ""
    text = statement_paragraph({**shipped, "turns": 3, "statement_share": 0.5, "first_statement_share": 0.0})
    assert "About 1.00 statements per sequence, 33% of the turns" in text and "True or false:" in text
    text = statement_paragraph({**shipped, "turns": 2, "statement_share": 0.5, "first_statement_share": 0.2})
    assert "About 0.70 statements per sequence, 35% of the turns" in text and "opens with a statement" in text
    assert "opens with" in statement_paragraph({**shipped, "turns": 1, "statement_share": 0.0,
                                                "first_statement_share": 0.3})
    # A sequence showing an empty image holds only its question: 0.9 * 0.8 = 0.72 statements over 1.9 turns.
    text = statement_paragraph({**shipped, "turns": 2, "statement_share": 0.5, "first_statement_share": 0.3,
                                "blank_share": 0.1})
    assert "About 0.72 statements per sequence, 38% of the turns" in text


def test_empty_images_are_described_only_where_the_mix_holds_them():
    assert blank_paragraph({**CONFIG, "blank_share": 0.0}) == ""
    text = blank_paragraph({**CONFIG, "blank_share": 0.05})
    assert "A share 0.05 of the sequences whose question offers options (every category but the extra" in text
    assert "shows an empty image" in text and "one of 15 other flat colours" in text and "black" in text


def test_each_command_writes_its_own_section_and_keeps_the_others(tmp_path, world):
    import shutil

    from typer.testing import CliRunner

    from mmscope.cli import app

    folder = tmp_path / "model"
    shutil.copytree(Path(shapes_llava.__file__).parent / "checkpoint", folder, ignore=shutil.ignore_patterns("card"))
    runner = CliRunner()
    common = ["--model", str(folder), "--data", str(world), "--limit", "1"]
    result = runner.invoke(app, ["evaluate", *common, "--no-blank", "--card"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["knockout", *common, "--flow", "image->last", "--window", "2", "--out",
                                 str(tmp_path / "run"), "--card"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = (folder / "README.md").read_text()
    evaluation, knockout = card.index("## Evaluation on held-out data"), card.index("## Attention knockout")
    assert evaluation < knockout
    assert f"`mmscope evaluate --model {folder} --data {world} --limit 1 --no-blank`" in card
    assert f"`mmscope knockout --model {folder} --data {world} --limit 1 --flow image->last --window 2 --out" in card
    assert "image->last" in card[knockout:] and (folder / "card" / "knockout.png").is_file()
    assert "![Attention knockout](card/knockout.png)" in card
    # Rerunning one command replaces its own section and keeps the other.
    result = runner.invoke(app, ["evaluate", *common[:-1], "2", "--no-blank", "--card"], catch_exceptions=False)
    again = (folder / "README.md").read_text()
    assert "--limit 2 --no-blank`" in again and "--limit 1 --no-blank`" not in again
    assert again[again.index("## Attention knockout"):] == card[knockout:]

"""Evaluation: greedy accuracy per GQA category, with the image and with a blank one (beside chance: a uniform
guess over the options each question allows, `mmscope.experiments.answers.chance`).

Not run by the experiment runner: it measures the model rather than sweeping interventions over it. It answers
the questions in batches of `--batch-size` (a per-question resumable loop would give up the batching), writes
no run folder, and prints one table — which `--card` also writes into the model folder's model card. So it is
declared as a plain `Command` (`mmscope.experiments.declarations.EVALUATE`: its options, and `evaluate` here as
what runs it); the CLI generates its command the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import mmscope
from mmscope.data import CATEGORIES
from mmscope.data.probing import STATEMENT_REQUEST
from mmscope.declare import command_line
from mmscope.experiments.answers import Accuracy, accuracy, chance, greedy_answers
from mmscope.experiments.declarations import EvaluateOptions  # declared without torch; kept importable from here
from mmscope.experiments.options import column_mapping
from mmscope.experiments.workspace import load_questions, probe_datasets
from mmscope.model import resolve
from mmscope.zoo.shapes_llava.card import write_card_section


def accuracy_table(results: dict[str, Accuracy]) -> str:
    """Accuracy (%) and counts per category, one column per condition (e.g. "image", "blank image")."""
    first = next(iter(results.values()))
    categories = [c for c in CATEGORIES if c in first.total] + sorted(set(first.total) - set(CATEGORIES))
    table = pd.DataFrame(
        {
            **{f"{name} acc %": [100 * acc.of(c) for c in categories] + [100 * acc.overall]
               for name, acc in results.items()},
            "n": [first.total[c] for c in categories] + [sum(first.total.values())],
        },
        index=[*categories, "overall"],
    )
    return table.to_string(float_format=lambda v: f"{v:.1f}")


STATEMENT_KINDS = {"attribute": "false: attribute swapped", "object": "false: object swapped",
                   "relation": "false: relation swapped"}  # a false statement's category: what its swap changed


def statement_questions(data, split: str, n_images: int):
    """The probing study's entailment pairs over the first `n_images` images of the split, as questions
    (`STATEMENT_REQUEST`, answered "true" or "false"), categorised as true or by what the false one swapped."""
    pairs = probe_datasets(data, split, n_images)["entailment"]

    def asked(row: dict) -> dict:
        return {"question": STATEMENT_REQUEST.format(statement=row["statement"]),
                "answer": "true" if row["label"] else "false", "true_option": "true", "false_option": "false",
                "category": "true" if row["label"] else STATEMENT_KINDS[row["negative_kind"]]}

    return pairs.map(asked)


def accuracies(model, dataset, options: EvaluateOptions, what: str) -> dict[str, Accuracy]:
    """Greedy accuracy on `dataset`, with the image and (with `--blank`) with a blank one."""
    results = {"image": accuracy(dataset, greedy_answers(model, dataset, batch_size=options.batch_size,
                                                         desc=what))}
    if options.blank:
        answers = greedy_answers(model, dataset, batch_size=options.batch_size, blank=True, desc=f"{what}, blank")
        results["blank image"] = accuracy(dataset, answers)
        results["chance"] = chance(dataset)  # what a blank image should give: no evidence, a uniform guess
    return results


def evaluate(options: EvaluateOptions, echo: Callable[[str], None]) -> None:
    """Print the accuracy table (and with `--statements` the statements' own); with `card`, write it into the
    model card too."""
    # A bad --data fails before the model loads.
    dataset = load_questions(options.data, options.split, limit=options.limit, columns=column_mapping(options.columns))
    statements = statement_questions(options.data, options.split, options.statements) if options.statements else None
    model = mmscope.load(options.model)
    table = accuracy_table(accuracies(model, dataset, options, "questions"))
    if statements is not None:
        images = len(set(statements["image_id"]))
        table += (f"\n\nStatements (\"{STATEMENT_REQUEST}\", answered true or false) about {images} images:\n"
                  + accuracy_table(accuracies(model, statements, options, "statements")))
    world = world_line(options.data)
    if world:
        table = f"{world}\n\n{table}"
    echo(table)
    if options.card:
        command = command_line("evaluate", dataclasses.replace(options, card=False))
        name = "evaluate" if options.data is None else f"evaluate on {Path(options.data).name}"
        echo(f"model card: {write_card_section(resolve(options.model), name, command, table)}")


def world_line(data) -> str | None:
    """For a synthetic world, how to make it again (from its world.json); None for other data."""
    recorded = Path(data) / "world.json" if data is not None else None
    if recorded is None or not recorded.is_file():
        return None
    world = json.loads(recorded.read_text())
    return (f"a synthetic world: seed {world['seed']}, {world['n_scenes']} scenes of {world['image_size']} px — "
            f"mmscope data synth --out {Path(data).name} --n-scenes {world['n_scenes']} --seed {world['seed']} "
            f"--image-size {world['image_size']}")


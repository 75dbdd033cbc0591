"""The runner: what every experiment shares, done once, so that an experiment declares only what is its own.

An experiment is a declaration (`Experiment`): its options class, the work its resumable loop walks over and
the rows each unit of work yields, the column its summary averages and the columns it groups by, its figure,
and its findings (what the command prints). `run(experiment, options)` executes it:

  1. reads and checks the experiment's data (`data(options)`) — before a model loads, so that a bad `--data`
     fails at once; then seeds torch, loads the model, and asks the declaration for its `Work`: the units
     (questions, or probe units), the rows function, and the interventions they apply (checked against the
     model: layers in range, token groups its examples hold);
  2. opens the run folder (`RunDir`, locked for this process) with config.yaml — the experiment and its options
     (a rerun with other options is refused, naming them), the interventions as dicts, the library versions.
     Nothing is written before this step, so a refused start leaves no trace;
  3. walks the units not yet done, storing each one's rows atomically, so a run killed at any point (SIGKILL
     included) continues where it stopped when started again and ends with the same table;
  4. writes results.parquet and summary.csv, draws the figure, logs to W&B when asked, and prints the report:
     the work's status lines, the findings, and where the figure is.

Per-question sweeps (knockout, lens, truncate, patch) declare `data=questions, work=PerQuestion(rows,
variants)`: the runner prepares each question as an `Example`, takes the clean greedy answer, skips a question
answered wrongly unless `--include-all`, and starts each row with the question's ids (`row_ids`); the
experiment's rows function sees one `Question` of its `Sweep`, with the variants that question can run (a
variant naming `object` needs a question with an object box; the report counts the questions that lacked one).
An experiment over other units declares its own data and `Work` (probe: one unit per task × pooling).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm

import mmscope
from mmscope.declare import command_line
from mmscope.experiments.answers import CleanAnswer, clean_answer
from mmscope.experiments.distributed import World
from mmscope.experiments.engine import Variant
from mmscope.errors import known, suggest
from mmscope.experiments.options import Command, OptionError, QuestionOptions, column_mapping, device_map_of, plain
from mmscope.experiments.runs import RunDir, summarize
from mmscope.experiments.tracking import log_run
from mmscope.experiments.workspace import load_questions
from mmscope.layout import BOX_GROUPS, WORD_GROUPS, Example
from mmscope.model import Model, resolve
from mmscope.zoo.shapes_llava.card import write_card_section

O = TypeVar("O")
Q = TypeVar("Q", bound=QuestionOptions)


@dataclass(frozen=True)
class Work:
    """What a run's resumable loop walks over: `size` units, each turned into rows by `rows(index)` (None marks
    it skipped, which the run folder remembers too)."""

    size: int
    rows: Callable[[int], list[dict] | None]
    described: str  # what the header line counts, e.g. "12 questions"
    interventions: dict[str, Any] = field(default_factory=dict)  # config.yaml's record; {}: none applied
    status: Callable[[RunDir], list[str]] = lambda run_dir: []  # the report's first lines, from the run folder
    keys: Sequence[str] | None = None  # each unit's identity (a question id): a widened rerun keeps what it computed


@dataclass(frozen=True)
class Variants:
    """The interventions a sweep runs: the parameters that generate them, and the variants themselves (each
    question runs the ones its token groups allow)."""

    parameters: dict[str, Any]
    variants: tuple[Variant, ...]
    named_by: str = ""  # the command-line option naming the variants' token groups (e.g. "--flow"), for messages

    @property
    def groups(self) -> frozenset[str]:
        """Every token group a variant names."""
        return frozenset().union(*(variant.groups for variant in self.variants))

    def check(self, model: Model, dataset) -> None:
        """Refuse variants naming a token group the model's examples cannot hold, or one that needs object boxes
        when no question of the data has one (every variant on it would be left out, in silence)."""
        unknown = sorted(self.groups - set(model.groups))
        if unknown:
            raise OptionError(f"unknown token group {unknown[0]!r} ({self.named_by or 'variants'}): the examples of "
                              f"{model.name} hold {known(model.groups)}{suggest(unknown[0], model.groups)}")
        named = sorted(self.groups & WORD_GROUPS)
        if named and not any(names_of(row) for row in dataset.select_columns(["object_names"])):
            raise OptionError(f"token group {named[0]!r} ({self.named_by or 'variants'}) needs the questions' object "
                              "names, and no question of the data has one (they come from GQA's annotations, or a "
                              "table's object names column)")
        boxed = sorted(self.groups & BOX_GROUPS)
        if boxed and not any(boxes_of(row) for row in dataset.select_columns(["object_boxes"])):
            raise OptionError(f"token group {boxed[0]!r} ({self.named_by or 'variants'}) needs object boxes, and no "
                              "question of the data has one (boxes come from the scene graphs, or a table's boxes "
                              "column: give --data a folder with them, or map one with --columns boxes=COLUMN)")

    def record(self) -> dict[str, Any]:
        """config.yaml's record: the parameters, how many variants, and the first variant using each kind of
        intervention, with that intervention's `to_dict()` (which `Intervention.from_dict` rebuilds)."""
        examples: dict[str, dict] = {}
        for variant in self.variants:
            for intervention in variant.interventions:
                examples.setdefault(type(intervention).__name__,
                                    {"variant": list(variant.key), "intervention": intervention.to_dict()})
        return {"parameters": self.parameters, "variants": len(self.variants), "examples": list(examples.values())}


@dataclass(frozen=True)
class Sweep(Generic[Q]):
    """A per-question sweep as its rows function sees it: the model, the questions, the options, the variants."""

    model: Model
    dataset: Any  # a datasets.Dataset of GQA-format rows
    options: Q
    variants: tuple[Variant, ...] = ()


@dataclass(frozen=True)
class Question:
    """One question of a sweep: its index and row, its prepared `Example`, and the model's clean answer."""

    index: int
    row: dict
    example: Example
    answer: CleanAnswer
    variants: tuple[Variant, ...] = ()  # the sweep's variants whose token groups this question's example holds


def questions(options: QuestionOptions):
    """The questions of a per-question sweep (`--data`, `--columns`, `--split`, `--images`, `--categories`,
    `--limit`)."""
    return load_questions(options.data, options.split, images=options.images, categories=options.categories,
                          limit=options.limit, columns=column_mapping(options.columns))


def boxes_of(row: dict) -> list[tuple[float, ...]]:
    """The central objects' boxes of a GQA-format row (`[]` in its list marks an object the image lacks)."""
    return [tuple(box) for box in row.get("object_boxes") or [] if len(box) == 4]


def example_of(model: Model, row: dict, seed: int = 0) -> Example:
    """The Example of one GQA-format row: its image, question and (when known) the central objects' boxes and
    names (`object_word`); `seed` draws its `random_patches` control."""
    boxes = boxes_of(row)
    meta = {key: row.get(key) for key in ("question_id", "image_id", "category", "answer")}
    return model.prepare(row["image"].convert("RGB"), row["question"], boxes=boxes or None, meta=meta,
                         control_seed=seed, words=names_of(row) or None)


def names_of(row: dict) -> list[str]:
    """The central objects' names of a GQA-format row (those the question names by a word)."""
    return [name for name in row.get("object_names") or [] if isinstance(name, str) and name.strip()]


def row_ids(index: int, row: dict) -> dict:
    """The identifying columns every results row of a per-question sweep starts with."""
    return {
        "example": index,
        "question_id": str(row["question_id"]),
        "image_id": str(row["image_id"]),
        "category": row["category"],
        "answer": row["answer"],
    }


def counts_line(counts: dict[str, int]) -> str:
    """A per-question sweep's status line: how many questions gave rows and how many were skipped."""
    return f"{counts['used']} examples used, {counts['skipped']} skipped (answered wrongly)"


@dataclass(frozen=True)
class PerQuestion(Generic[Q]):
    """The work of a per-question sweep: every question of `--data`, through `rows` when the model answers it
    correctly (all of them with `--include-all`); `variants`, when given, generates the interventions swept."""

    rows: Callable[[Sweep[Q], Question], list[dict]]
    variants: Callable[[Q, Model, Any], Variants] | None = None  # (options, model, the questions)

    def __call__(self, model: Model, options: Q, dataset) -> Work:
        generated = self.variants(options, model, dataset) if self.variants is not None else Variants({}, ())
        generated.check(model, dataset)
        sweep = Sweep(model, dataset, options, generated.variants)

        def question_rows(index: int) -> list[dict] | None:
            row = dataset[index]
            example = example_of(model, row, options.seed)
            answer = clean_answer(model, example, row["answer"], max_new_tokens=options.answer_tokens,
                                  match=options.answer_match)
            if not answer.correct and not options.include_all:
                return None
            held = set(example.groups())
            runnable = tuple(variant for variant in generated.variants if variant.groups <= held)
            ids = row_ids(index, row)
            question = Question(index, row, example, answer, runnable)
            return [{**ids, **values} for values in self.rows(sweep, question)]

        def status(run_dir: RunDir) -> list[str]:
            lines = [counts_line(run_dir.counts())]
            boxed = sorted(generated.groups & BOX_GROUPS)
            if boxed:
                used = run_dir.used()
                boxes = dataset.select_columns(["object_boxes"]).select(used)
                lacking = sum(not boxes_of(row) for row in boxes)
                if lacking:
                    lines.append(f"{lacking} of {len(used)} examples used have no object box: their variants on "
                                 f"{known(boxed)} ({generated.named_by}) were left out")
            return lines

        record = generated.record() if self.variants is not None else {}
        keys = [str(key) for key in dataset["question_id"]]
        return Work(len(dataset), question_rows, f"{len(dataset)} questions", record, status, keys)


@dataclass(frozen=True)
class Finished(Generic[O]):
    """What a finished run's figure draws from: its rows (results.parquet's table), their summary, the options it
    ran with, and the data it walked over (`Experiment.data`'s: the questions of a per-question sweep)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    options: O
    data: Any = None


@dataclass(frozen=True, kw_only=True)
class Experiment(Generic[O]):
    """One experiment, declared: `mmscope <name>` builds `options` from its command line and `run` executes it.

    `command` is what the command line knows of it without importing this module: its name, help and options
    class (`mmscope.experiments.declarations`).

    `data(options)` reads and checks what the run walks over, before the model loads; `work(model, options,
    data)` makes its `Work`. `by` are the summary's group-by columns, the last one the layer axis (the figure's
    x, the W&B step); `summarize` replaces the default summary (mean, 95% CI and n of `value` per group) where rows already are
    one per group; `values(table)` computes `value` where rows of several kinds keep it in columns of their own.
    `figure` draws the finished run (`Finished`: table, summary, options, data) into the given path (and may
    return a list of the figures it drew, that path first: W&B logs them all); `findings` are the report's lines between the status and the figure;
    `scalars(table)` are numbers for the W&B run's summary (e.g. how far an estimate agrees with the exact
    effects); `prints_table` adds where results.parquet is.
    """

    command: Command[O]
    data: Callable[[O], Any]
    work: Callable[[Model, O, Any], Work]
    value: str
    by: tuple[str, ...]
    figure: Callable[[Finished[O], Path], Path | list[Path]]  # a list: the main figure first, all logged
    findings: Callable[[pd.DataFrame, pd.DataFrame, O], list[str]]
    desc: str  # the progress bar's label
    summarize: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    values: Callable[[pd.DataFrame], pd.Series] | None = None  # computes `value` from the rows, where no column holds it
    scalars: Callable[[pd.DataFrame], dict[str, float]] | None = None  # the W&B run summary's numbers, if any
    prints_table: bool = False

    @property
    def name(self) -> str:
        """The command's name: the default run folder `runs/<name>`, the figure `<name>.png`."""
        return self.command.name

    @property
    def options(self) -> type[O]:
        """The command's options class."""
        return self.command.options

    def summary(self, table: pd.DataFrame, options: O) -> pd.DataFrame:
        """The summary table of a finished run's results (its confidence bands as `--ci` asks, seeded)."""
        if self.summarize is not None:
            return self.summarize(table)
        if self.values is not None:
            table = table.assign(**{self.value: self.values(table)})
        return summarize(table, list(self.by), self.value, ci=getattr(options, "ci", None) or "normal",
                         seed=getattr(options, "seed", 0))

    def main(self, options: O, echo: Callable[[str], None]) -> None:
        """The command: run with `options`, reporting through `echo`."""
        run(self, options, echo)


def run(experiment: Experiment[O], options: O, echo: Callable[[str], None] = print) -> RunDir:
    """Execute `experiment` with `options` (steps in the module docstring); returns its run folder. Under a
    launcher (torchrun, accelerate launch, srun) each rank runs its share (`mmscope.experiments.distributed`)."""
    world = World.from_environment()
    world.start()
    try:
        return _run(experiment, options, echo, world)
    finally:
        world.finish()


def _run(experiment: Experiment[O], options: O, echo: Callable[[str], None], world: World) -> RunDir:
    data = experiment.data(options)
    torch.manual_seed(options.seed)
    device_map = device_map_of(getattr(options, "device_map", None))
    if device_map is not None and world.sharded:
        raise OptionError("--device-map spreads one model over this machine's devices; it does not combine with "
                          f"{world.size} ranks — launch one process per model")
    placement = {"device_map": device_map} if device_map is not None else {"device": world.device()}
    model = mmscope.load(options.model, **placement)
    configure = getattr(options, "configure", None)  # knobs left to the protocol or the model (QuestionOptions)
    given = command_line(experiment.name, dataclasses.replace(options, card=False)) \
        if getattr(options, "card", False) else None  # the command as given, for the model card
    options, chosen = configure(model) if configure is not None else (options, [])
    work = experiment.work(model, options, data)
    folder = options.out if options.out is not None else Path("runs") / experiment.name
    config = {"experiment": {"kind": experiment.name, **plain(options)}, "options": plain(options),
              "interventions": work.interventions}
    run_dir = world.first_on_main(lambda: RunDir(folder, config, keys=work.keys),
                                  lambda: RunDir(folder, config, hold=False, keys=work.keys))
    with run_dir:
        shared = f" (rank 0 of {world.size}, each rank a share)" if world.sharded else ""
        if world.main:
            echo(f"{experiment.name}: {model}, {work.described} → {run_dir.folder}{shared}")
            for line in chosen:
                echo(f"  {line}")
        pending = [index for index in range(work.size) if not run_dir.done(index)]
        if world.main and run_dir.grown is not None:
            echo(f"  grown from {run_dir.grown[0]} to {run_dir.grown[1]} questions: {work.size - len(pending)} kept "
                 f"from the earlier run, {len(pending)} to compute")
        before = work.size - len(pending)
        # One bar, on rank 0, over every rank's units: it counts the parts in the folder.
        with tqdm(total=len(pending), desc=experiment.desc, unit="example", disable=not world.main) as bar:
            for index in world.share(pending):
                rows = work.rows(index)
                run_dir.write_part(index, rows if rows is not None else [], skipped=rows is None)
                bar.update(sum(run_dir.counts().values()) - before - bar.n if world.sharded else 1)
            world.barrier()
            bar.update(len(pending) - bar.n)
        if world.main:
            echo("\n".join(report(experiment, options, run_dir, work.status(run_dir), data, card=given)))
    return run_dir


def report(experiment: Experiment[O], options: O, run_dir: RunDir, status: Sequence[str], data: Any = None,
           card: str | None = None) -> list[str]:
    """Collect results.parquet, write summary.csv, draw the figure (from the table, the summary and the run's
    `data`), log to W&B when asked, and (given the `card` command that ran, with `--card`) write the findings and
    figure into the model folder's model card; the report's lines."""
    table = run_dir.write_results()
    if table.empty:
        warnings.warn(f"{run_dir.folder}: no rows (every example was skipped)", stacklevel=2)
        return list(status)
    summary = experiment.summary(table, options)
    summary.to_csv(run_dir.folder / "summary.csv", index=False)
    drawn = experiment.figure(Finished(table, summary, options, data), run_dir.folder / f"{experiment.name}.png")
    figures = drawn if isinstance(drawn, list) else [drawn]
    results = run_dir.folder / "results.parquet"
    logged = []
    if options.wandb:
        scalars = experiment.scalars(table) if experiment.scalars is not None else {}
        logged = [log_run(run_dir.folder, experiment.name, run_dir.config, summary, x=experiment.by[-1],
                          keys=list(experiment.by[:-1]), figures=figures, results=results, scalars=scalars)]
    findings = experiment.findings(table, summary, options)
    if card is not None:
        written = write_card_section(resolve(options.model), experiment.name, card, "\n".join(findings).strip("\n"),
                                     figures[0])
        logged.append(f"model card: {written}")
    lines = [*status, *findings, "", f"figure: {figures[0]}", *logged]
    return [*lines, f"table:  {results}"] if experiment.prints_table else lines

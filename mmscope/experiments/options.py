"""Experiment options: frozen dataclasses whose fields carry each option's type, default and help.

A field declared with `option(default, help)` is also a command-line option: `mmscope.cli` builds every
command's typed `typer` signature from its options class, so type, default and help text live in one place.
`option`, `flag_of`, `fields_in_order` and `Command` are declared in `mmscope.declare`, below every room (the
training recipe's `TrainConfig` and the data commands declare their options with them too), and re-exported here.
The options every per-question sweep takes are `QuestionOptions`; an experiment subclasses it and adds its own,
which its command lists before the ones marked `listed_last` (`--include-all`, `--out`, `--wandb`, `--seed`).
An experiment over other data (probe) lists the shared options it takes through the `*_option()` factories,
which define each of them once. Each command's own options class, and its `Command`, are declared in
`mmscope.experiments.declarations`.

This module, like the declarations, imports no heavy library (torch, transformers, nnsight, datasets, pandas,
matplotlib): the command line builds every command from them, and answers `--help` or a refused option without
those.

`plain(options)` is the YAML-ready record of a run's options (config.yaml's `options`, which `--config` reads
back as defaults).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmscope.data.columns import TABLE_COLUMNS
from mmscope.declare import Command, fields_in_order, flag_of, option  # re-exported: the experiments' names
from mmscope.errors import MMScopeError, known, suggest
from mmscope.experiments import protocol as protocols
from mmscope.zoo import DEFAULT_MODEL

if TYPE_CHECKING:
    from mmscope.model import Model


class OptionError(MMScopeError, ValueError):
    """An experiment option outside its valid values."""


def check_choice(name: str, value: str, choices, *, flag: str | None = None) -> None:
    """Refuse `value` for option `name` (given by `flag`, `--name` by default) unless it is one of `choices`."""
    if value not in choices:
        raise OptionError(f"unknown {name} {value!r} ({flag or flag_of(name)}): known: {known(choices)}"
                          f"{suggest(value, choices)}")


def check_once(what: str, values, flag: str) -> None:
    """Refuse a repeatable option whose `values` name one thing twice, e.g. `center 2 (--center) is given twice;
    give each center once` (a repeat would otherwise be run, drawn or counted twice, or silently dropped)."""
    for index, value in enumerate(values or ()):
        if value in values[:index]:
            shown = repr(value) if isinstance(value, str) else value
            raise OptionError(f"{what} {shown} ({flag}) is given twice; give each {what} once")


def check_at_least(name: str, value: int | None, minimum: int, *, omitted: str | None = None,
                   error: type[MMScopeError] = OptionError) -> None:
    """Refuse a number below `minimum` for option `name` with `error` (None passes: the option was omitted,
    which means `omitted`, e.g. "all questions")."""
    if value is not None and value < minimum:
        hint = f", or omit it for {omitted}" if omitted else ""
        raise error(f"{name} {value} ({flag_of(name)}): must be at least {minimum}{hint}")


def model_option() -> Any:
    """`--model`: which model to load."""
    return option(DEFAULT_MODEL, "Embedded model name, save_pretrained folder, or hub id.")


def data_option() -> Any:
    """`--data`: where the questions or scene graphs come from."""
    return option(None, "Synthetic-world folder, GQA folder, or the study's CSV folder, or a table of questions: "
                        "a JSONL/CSV/Parquet file or folder, a saved dataset, an image folder with metadata.jsonl "
                        "(default: the embedded model's held-out test split).")


def columns_option() -> Any:
    """`--columns`: which columns of a table of questions fill which role."""
    return option(None, f"For a table --data: role=column pairs where its names differ, e.g. "
                        f"question=q,answer=label (roles: {', '.join(TABLE_COLUMNS)}).")


def column_mapping(text: str | None) -> dict[str, str]:
    """`--columns question=q,answer=label` as {role: column}; a part that is not role=column, an unknown role or
    a role named twice is refused, naming the flag."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, equals, column = (piece.strip() for piece in part.partition("="))
        if not equals or not role or not column:
            raise OptionError(f"columns part {part.strip()!r} (--columns) must read role=column, e.g. question=q")
        check_choice("column role", role, TABLE_COLUMNS, flag="--columns")
        if role in mapping:
            raise OptionError(f"column role {role!r} is mapped twice (--columns)")
        mapping[role] = column
    return mapping


def split_option() -> Any:
    """`--split`: which split of `--data`."""
    return option("test", "Split of --data to use.")


def limit_option(default: int | None) -> Any:
    """`--limit`: at most this many questions per category (None: all)."""
    return option(default, "At most N questions per category.")


def out_option() -> Any:
    """`--out`: the run folder."""
    return option(None, "Run folder (default runs/<experiment>); reruns resume.", listed_last=True)


def wandb_option() -> Any:
    """`--wandb`: also log the run to Weights & Biases."""
    return option(False, "Log to Weights & Biases (offline without an API key).", flag="--wandb", listed_last=True)


def seed_option() -> Any:
    """`--seed`: torch's random seed (and the probes')."""
    return option(0, "Random seed.", listed_last=True)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_option() -> Any:
    """`--device-map`: one model over several devices (accelerate)."""
    return option(None, f"Spread the model over devices: {', '.join(DEVICE_MAPS)}, or a JSON file of module "
                        "name -> device (a GPU index, cpu or disk).", listed_last=True)


def check_device_map(value: str | None) -> None:
    """A strategy accelerate knows, or a JSON file that exists."""
    if value is not None and value not in DEVICE_MAPS and not (value.endswith(".json") and Path(value).is_file()):
        raise OptionError(f"device_map {value!r} (--device-map): use one of {', '.join(DEVICE_MAPS)} or the path "
                          "of a JSON file mapping module names to devices")


def device_map_of(value: str | None) -> str | dict | None:
    """What `mmscope.load(device_map=...)` takes for `--device-map`."""
    if value is None or value in DEVICE_MAPS:
        return value
    return json.loads(Path(value).read_text())


def protocol_option() -> Any:
    """`--protocol`: whose choices the knobs take when not given (`mmscope.experiments.protocol`)."""
    return option("default", "default, or study: every knob not given as the cross-modal information-flow "
                             "study's code does it (see the README's table of knobs).")


def check_knobs(options) -> None:
    """Each protocol knob the options hold is unset (None: its protocol's) or one of its choices."""
    check_choice("protocol", options.protocol, protocols.PROTOCOLS)
    for knob, choices in protocols.CHOICES.items():
        value = getattr(options, knob, None)
        if value is not None:
            check_choice(knob.replace("_", " "), value, choices, flag=flag_of(knob))


ENGINES = ("prefix", "naive")  # how a sweep runs an example's variants (`mmscope.experiments.engine`)


def engine_option() -> Any:
    """`--engine`: how a sweep runs an example's variants (`mmscope.experiments.engine`)."""
    return option("prefix", "Sweep engine: prefix (shared prefix cache, batched) or naive.")


@dataclass(frozen=True)
class QuestionOptions:
    """What every per-question sweep takes: the model, which questions, and how the run is kept."""

    model: str = model_option()
    data: Path | None = data_option()
    columns: str | None = columns_option()
    images: Path | None = option(None, "GQA images folder, for the study's CSVs.")
    split: str = split_option()
    categories: list[str] | None = option(None, "Categories to run (repeatable; default all: GQA's six, or a "
                                                "table's own).")
    limit: int | None = limit_option(20)
    include_all: bool = option(False, "Keep questions the model answers wrongly.", flag="--include-all",
                               listed_last=True)
    out: Path | None = out_option()
    wandb: bool = wandb_option()
    protocol: str = protocol_option()
    object_patches: str | None = option(None, "Which image tokens are an object's: overlap (a patch its box "
                                              "overlaps; the default protocol's) or red-mask (the study's: the "
                                              "box drawn red on a mask through the image processor).")
    image_padding: str | None = option(None, "processor (as saved; the default protocol's) or square (pad to a "
                                             "square of the mean colour first, LLaVA-1.5's expand2square; the "
                                             "study's).")
    tokenisation: str | None = option(None, "joint (the processor tokenises the whole prompt; the default "
                                            "protocol's) or chunks (the text around <image> chunk by chunk, "
                                            "LLaVA's tokenizer_image_token; the study's).")
    answer_tokens: int | None = option(None, "Greedy answer length in tokens (default: the protocol's: 8; the "
                                             "study's 128).")
    answer_match: str | None = option(None, "When an answer is correct: lenient (stripped, lower case, no final "
                                            "full stop; the default protocol's) or lower (the study's "
                                            "strip().lower()).")
    ci: str | None = option(None, "Confidence band of the means: normal (the default protocol's) or bootstrap "
                                  "(seaborn's 95% percentile bootstrap, the study's).")
    seed: int = seed_option()
    device_map: str | None = device_map_option()

    def __post_init__(self) -> None:
        """Checks what needs no data or model; an experiment's own options extend it (calling this first).
        `--categories` depends on the data (GQA's six, or a table's own): `load_questions` checks it."""
        check_at_least("limit", self.limit, 1, omitted="all questions")
        check_at_least("answer_tokens", self.answer_tokens, 1)
        check_knobs(self)
        check_device_map(self.device_map)
        column_mapping(self.columns)

    def configure(self, model: Model):
        """These options with what was left to the protocol or the model decided, and the run header's lines
        saying what was chosen (an experiment's options extend it, calling this first)."""
        return protocols.configure(self, model)


def plain(options) -> dict[str, Any]:
    """The options as fresh YAML-ready data, in their command's order: paths as strings, tuples as lists."""

    def value(item):
        if isinstance(item, Path):
            return str(item)
        if isinstance(item, tuple | list):  # a new list each call: YAML would alias a list stored twice
            return [value(part) for part in item]
        return item

    return {field.name: value(getattr(options, field.name)) for field in fields_in_order(options)}

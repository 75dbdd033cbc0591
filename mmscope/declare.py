"""Declared options and commands: how any room says what its command line takes, without importing the command
line (or any heavy library).

A dataclass field declared with `option(default, help)` is a command-line option: `mmscope.cli` builds each
command's typed `typer` signature from the options class (`fields_in_order`), so type, default and help text
live in one place, beside the field. A field declared plainly is a setting the command line does not take.
`Command` names a command, its options class and where the code that runs it lives, imported when it runs.

This is the lowest layer: the experiments (`mmscope.experiments.options` re-exports what is here), the
training recipe's `TrainConfig` (`mmscope.zoo.shapes_llava.config`) and the data commands (`mmscope.data.cli`)
all declare their options with it. It imports nothing of mmscope's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

O = TypeVar("O")


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
           listed_last: bool = False, argument: bool = False) -> Any:
    """A dataclass field that is a command-line option: its default (none: required), help text, its flag
    when that is not `--field-name` (a bool with a flag is a switch without a `--no-` form), whether the
    command lists it after the experiment's own options, and whether it is a positional argument instead."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "listed_last": listed_last,
                                                        "argument": argument})


def flag_of(name: str) -> str:
    """The command-line flag of option `name` (`n_images` → `--n-images`)."""
    return "--" + name.replace("_", "-")


def is_option(field: dataclasses.Field) -> bool:
    """Was `field` declared with `option()` (and so is a command-line option)?"""
    return "listed_last" in field.metadata


def fields_in_order(options) -> list[dataclasses.Field]:
    """The option fields of an options class (or object) in the order its command lists them: the experiment's
    own before those `listed_last`; fields not declared with `option()` are no options and left out."""
    return sorted((field for field in dataclasses.fields(options) if is_option(field)),
                  key=lambda field: field.metadata["listed_last"])


@dataclass(frozen=True, kw_only=True)
class Command(Generic[O]):
    """A command declared by its options: `mmscope <name>` builds `options` from the command line and calls
    `main(options, echo)`, which reports through `echo`. Only commands with `config_file` take `--config`.

    What runs it is named, not imported: `runs` is the `module:attribute` of a function `(options, echo)`
    (an experiment's: `mmscope.experiments.knockout:KNOCKOUT.main`), imported when the command runs, so that
    the command line knows every command without importing torch."""

    name: str
    help: str
    options: type[O]
    runs: str
    config_file: bool = False

    def main(self, options: O, echo: Callable[[str], None]) -> None:
        """Run the command with `options`: import what runs it (and so torch), then call it."""
        module, _, attribute = self.runs.partition(":")
        run = functools.reduce(getattr, attribute.split("."), importlib.import_module(module))
        run(options, echo)


def command_line(name: str, options: Any) -> str:
    """The `mmscope <name> ...` command that gives `options`: each option that differs from its default, as its
    flag (a list repeats it; a bool is its switch, or `--no-` switch)."""
    words = ["mmscope", name]
    for field in fields_in_order(options):
        value = getattr(options, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        flag = field.metadata.get("flag") or flag_of(field.name)
        if isinstance(value, bool):
            words.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, (list, tuple)):
            words += [part for item in value for part in (flag, str(item))]
        elif value is not None:
            words += [flag, str(value)]
    return " ".join(words)

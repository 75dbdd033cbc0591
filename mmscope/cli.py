"""The `mmscope` command line: one sub-command per job, each with `--help`.

No command is written out by hand: each is generated from a declaration — an experiment's or `evaluate`'s
`Command` and options class (`mmscope.experiments.declarations`), `data synth`'s and `data show`'s
(`mmscope.data.cli`), and for `train` the `TrainConfig` fields declared with `option()`
(`mmscope.zoo.shapes_llava.config`). Every option's type, default and help come from there (`mmscope.declare`),
and typer reads them from a typed signature built with `inspect.Signature`; the command builds the options
object from what typer parsed and hands it over.
A switch (a bool option) is a flag: `--include-all`, or `--controls/--no-controls` where it is on by default.

The declarations import no heavy library: `mmscope --help`, a command's `--help` and an option refused before
any data or model is read are answered without torch, transformers, nnsight, datasets, pandas or matplotlib,
which a command imports when it runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from safetensors import SafetensorError

from mmscope.data.cli import DATA_COMMANDS, DATA_HELP
from mmscope.declare import Command, fields_in_order
from mmscope.errors import MMScopeError, known, suggest, yaml_problem
from mmscope.experiments.declarations import CHECK, EVALUATE, EXPERIMENTS
from mmscope.zoo.shapes_llava.config import TrainConfig, embedded_spec

DEBUG_VARIABLE = "MMSCOPE_DEBUG"
# Library errors a user's input causes (a missing or unreadable file, a file of the wrong format, the hub out of
# reach): the CLI reports them in one line, like mmscope's own. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (MMScopeError, OSError, yaml.YAMLError, json.JSONDecodeError, SafetensorError)


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError's names its file (`[Errno 2] No such file…: 'x'` reads badly)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.strerror.lower()} ({error.filename})"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


def show_switches_as_flags(command: typer.core.TyperCommand | typer.core.TyperGroup, ctx: typer.Context) -> None:
    """typer's `--help` writes a type beside every option, a switch's too (`--include-all <bool>`), which reads as
    if it took a value (`--include-all true`, refused): show each switch as its flag(s) alone, in `command` and
    in every command under it."""
    for parameter in command.get_params(ctx):  # --help included
        if isinstance(parameter, typer.core.TyperOption) and parameter.is_bool_flag and parameter.metavar is None:
            parameter.metavar = ""  # what --help writes in the type column
    for subcommand in getattr(command, "commands", {}).values():
        show_switches_as_flags(subcommand, ctx)


class Commands(typer.core.TyperGroup):
    """mmscope's command group: an mmscope error or a known library error (`INPUT_ERRORS`) ends the command with
    one line on stderr, `error: <message>`, and exit code 2 (as a usage error); `--debug` (or MMSCOPE_DEBUG=1)
    lets it raise with its traceback. Warnings print as one `warning: …` line each. Every command's `--help`
    shows a switch as a flag (`show_switches_as_flags`)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        show_switches_as_flags(self, ctx)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        debug = ctx.params.get("debug") or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _warning_line
            try:
                return super().invoke(ctx)
            except INPUT_ERRORS as error:
                if debug:
                    raise
                typer.echo(f"error: {one_line(error)}", err=True)
                raise typer.Exit(2) from None


app = typer.Typer(
    cls=Commands,
    name="mmscope",
    help="Mechanistic interventions for vision-language models, built on nnsight.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help=f"Show an error's full traceback (also: "
                                        f"{DEBUG_VARIABLE}=1).")) -> None:
    """Mechanistic interventions for vision-language models, built on nnsight."""


# TrainConfig keeps its folders as strings (it is saved as JSON); the command reads them as paths.
TRAIN_FOLDERS = {"out": Path, "data": Path | None}
# The one option of `mmscope train` that is no TrainConfig field: the spec's decoder layers.
TEXT_LAYERS_HELP = "Decoder layers (the rest of the geometry is the shipped model's)."


class ConfigFileError(MMScopeError, ValueError):
    """A `--config` file that cannot be read, or whose keys are not the command's options."""


def _config_file(ctx: typer.Context, value: Path | None) -> Path | None:
    """`--config file.yaml`: its keys become the defaults of the command's options (the command line wins).

    Every key must be one of the command's options: a misspelt one would otherwise leave its option at the
    default without a word."""
    if value is None:
        return value
    if not value.is_file():
        raise ConfigFileError(f"config file {str(value)!r} does not exist")
    try:
        loaded = yaml.safe_load(value.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"config file {str(value)!r} is not valid YAML ({yaml_problem(error)})") from None
    loaded = {} if loaded is None else loaded
    if isinstance(loaded, dict) and isinstance(loaded.get("options"), dict):
        loaded = loaded["options"]  # a run's config.yaml works as well
    if not isinstance(loaded, dict):
        raise ConfigFileError(f"config file {str(value)!r} must hold a mapping of option: value, "
                              f"not a {type(loaded).__name__}")
    names = [parameter.name for parameter in ctx.command.params if parameter.name != "config"]
    values = {str(key).replace("-", "_"): option_value for key, option_value in loaded.items()}
    unknown = [key for key in values if key not in names]
    if unknown:
        hints = "".join(suggest(key, names) for key in unknown[:1])
        raise ConfigFileError(f"config file {str(value)!r}: unknown option(s) {known(map(repr, unknown))}{hints}; "
                              f"{ctx.command.name} takes: {known(names)}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


CONFIG = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Path | None, typer.Option(help="YAML file of option values.", callback=_config_file,
                                                   is_eager=True)],
)


@dataclass(frozen=True)
class Parameter:
    """One command-line option: its Python name, type, default (`...`: required), help, and its flag when that
    is not `--python-name` (a bool with a flag is a switch without a `--no-` form); or, with `argument`, a
    positional argument."""

    name: str
    annotation: Any
    default: Any
    help: str | None = None
    flag: str | None = None
    argument: bool = False

    def signature(self) -> inspect.Parameter:
        """The typed keyword parameter typer reads this option from."""
        if self.argument:
            declared = typer.Argument(help=self.help)
        else:
            declared = typer.Option(*([self.flag] if self.flag else []), help=self.help)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=Annotated[self.annotation, declared])


def _default(field: dataclasses.Field) -> Any:
    """A field's default as typer takes it: `...` (required) where it has none."""
    return ... if field.default is dataclasses.MISSING else field.default


def parameters_of(options: type, types: dict[str, Any] | None = None) -> list[Parameter]:
    """The options of a declared options class (its `option()` fields); the experiment's own come before those
    `listed_last`. `types` gives the command-line type of a field that the class holds as another."""
    hints = {**typing.get_type_hints(options), **(types or {})}
    return [Parameter(field.name, hints[field.name], _default(field), field.metadata["help"], field.metadata["flag"],
                      field.metadata["argument"])
            for field in fields_in_order(options)]


def train_parameters() -> list[Parameter]:
    """The options of `mmscope train`: `TrainConfig`'s `option()` fields, and the spec's `--text-layers`."""
    return parameters_of(TrainConfig, TRAIN_FOLDERS) + [
        Parameter("text_layers", int, embedded_spec().text_layers, TEXT_LAYERS_HELP)]


def add_command(name: str, help: str, parameters: Sequence[Parameter], call: Callable[..., None],
                config_file: bool = False, group: typer.Typer | None = None) -> None:
    """Register `mmscope <name>` (or, in `group`, `mmscope <group> <name>`): typer parses `parameters` (and
    `--config`) and `call` gets their values."""

    def command(**values: Any) -> None:
        values.pop("config", None)  # already applied, as the options' defaults
        call(**values)

    command.__signature__ = inspect.Signature([parameter.signature() for parameter in parameters]
                                              + ([CONFIG] if config_file else []))
    (group or app).command(name, help=help)(command)


def add_declared(declaration: Command, group: typer.Typer | None = None) -> None:
    """Register a declared command (in `group`, if given): its options object, built from the command line, goes
    to its `main` (which imports what runs it)."""
    add_command(declaration.name, declaration.help, parameters_of(declaration.options),
                lambda **values: declaration.main(declaration.options(**values), typer.echo),
                declaration.config_file, group)


def train(**values: Any) -> None:
    """Train the embedded model with these TrainConfig values, and say where it was saved."""
    folders = {name: str(values[name]) if values[name] is not None else None for name in TRAIN_FOLDERS}
    spec = dataclasses.replace(embedded_spec(), text_layers=values.pop("text_layers"))
    config = TrainConfig(**{**values, **folders}, spec=spec)
    config.check()  # as training does first: a refused value is answered before torch is imported
    from mmscope.zoo.shapes_llava.train import train as run_training

    typer.echo(f"saved {run_training(config)}")


def _register_commands() -> None:
    for experiment in EXPERIMENTS:
        add_declared(experiment)
    add_command("train", "Train the embedded LLaVA from scratch on the synthetic GQA-format world (defaults: the "
                         "shipped recipe).", train_parameters(), train)
    add_declared(EVALUATE)
    add_declared(CHECK)
    data = typer.Typer(help=DATA_HELP, no_args_is_help=True)
    for command in DATA_COMMANDS:
        add_declared(command, data)
    app.add_typer(data, name="data", help=DATA_HELP)


_register_commands()

if __name__ == "__main__":
    app()

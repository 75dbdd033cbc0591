"""The `mmscope` command line: one sub-command per job, each with `--help`."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mmscope",
    help="Mechanistic interventions for vision-language models, built on nnsight.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_subcommands() -> None:
    from mmscope.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Synthesize, load and inspect GQA-format data.")


_register_subcommands()

if __name__ == "__main__":
    app()

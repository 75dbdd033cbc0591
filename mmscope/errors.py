"""Exceptions raised by mmscope. Each names the bad input and, where it can, what would be valid.

Every error mmscope raises on purpose is an `MMScopeError`, and also the builtin a caller would catch for it
(`ValueError`, `KeyError`, `FileNotFoundError` or `RuntimeError`). The errors shared across rooms are here; a
room's own live in that room and subclass `MMScopeError`: `mmscope.data.errors` (`DataError` and its kinds),
`mmscope.probes.ProbeError`, `OptionError` (`mmscope.experiments.options`), `RunFolderError` and
`RunLockedError` (`mmscope.experiments.runs`), `RankError` (`mmscope.experiments.distributed`),
`TrainConfigError`, `TrainingStateError` and `BatchError` (`mmscope.zoo.shapes_llava`), `ConfigFileError`
(`mmscope.cli`).
"""

from __future__ import annotations

import difflib


class MMScopeError(Exception):
    """Base class of every error mmscope raises on purpose."""


class ModelLoadError(MMScopeError, ValueError):
    """A model could not be loaded, or loaded in a form mmscope cannot intervene on."""


class UnsupportedModelError(ModelLoadError):
    """No adapter knows this architecture family."""


class InputError(MMScopeError, ValueError):
    """A question, image, box or prompt that cannot be turned into model inputs."""


class LayoutError(MMScopeError, KeyError):
    """An unknown token-group name or a position outside the sequence."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class InterventionError(MMScopeError, ValueError):
    """An intervention that does not fit the model (layer out of range, unknown site, bad dict)."""


def known(options) -> str:
    """`a, b, c` — the valid choices, for error messages."""
    return ", ".join(str(option) for option in options)


def suggest(name: str, options) -> str:
    """`; did you mean 'x'?` when `name` is close to one of `options` (case aside), else "" — for error messages."""
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def yaml_problem(error: Exception) -> str:
    """A YAML parser error as one short line: `line 2, column 1: expected ',' or ']'` (PyYAML's own message spans
    several lines and quotes the stream)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"

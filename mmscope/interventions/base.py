"""The `Intervention` base class: a saved, named edit of the forward pass, applied through a `Context`.

An intervention is a small frozen dataclass with one method, `apply(ctx)`, which runs inside an nnsight trace
and reads or writes the model's real intermediate values through `ctx` — e.g. `ctx.residual(layer)`,
`ctx.attention_mask(layer)`, `ctx.positions("image")`. Because it is a dataclass of plain values it round-trips
through a dict (`to_dict` / `Intervention.from_dict`), so an experiment's interventions can be saved in its
config and re-run.

Composition: `Model.run` gives each intervention its own nnsight invoke over the whole batch, in list order.
nnsight then interleaves them with the forward pass, so every intervention may touch layers in its own forward
order and edits to the same site chain (the second sees what the first wrote).

A sweep engine may run several variants as rows of one forward over only the positions after a cached prefix
and only the layers from some layer on (see `mmscope.experiments.rows`). An intervention may declare, through
`affected_from`, the first position it reads or changes and, through `first_layer`, the first layer; the engine
only runs it on a suffix that starts at or before that position and that layer. `whole_batch` marks one whose
edits reach every row of a forward (a layer skip): the engine gives it a forward of its own.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import types
import typing
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from mmscope.context import SITES, Context, Group
from mmscope.errors import InterventionError, known

if TYPE_CHECKING:
    from mmscope.layout import Example

__all__ = ["SITES", "Context", "Group", "Intervention", "check_interventions", "earliest"]


@dataclass(frozen=True)
class Intervention:
    """Base class: a frozen dataclass of plain values with one method, `apply(ctx)`.

    Subclasses are registered by class name for `from_dict`. Fields are normalised once, from their annotations,
    before `check` runs: a `tuple[int, ...]` field takes an int, a list, a range or any non-empty sequence of
    ints and stores a tuple (so the dataclass stays hashable); a token-group field (`Group`) takes a name or
    positions; a `bool` field must be a bool, an `int` field an int, a `float` field a finite real number. A
    `tuple[int, ...]` field lists each int once (a layer given twice is a slip, not a stronger edit). Anything else
    there is refused with the field's name and value.
    """

    registry: ClassVar[dict[str, type[Intervention]]] = {}
    whole_batch: ClassVar[bool] = False  # its edits reach every row of a forward (e.g. a layer skip)
    counted: ClassVar[tuple[str, ...]] = ()  # fields of numbers counted from 0 (layers, heads, rows): none negative

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `from_dict` finds a class by name: a second class of that name elsewhere would silently take its place
        # (the same class defined again, as a re-run notebook cell does, replaces it).
        previous = Intervention.registry.get(cls.__name__)
        if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
            raise InterventionError(
                f"intervention {cls.__name__!r} ({cls.__module__}) has the name of {previous.__module__}."
                f"{previous.__qualname__}; saved configs find interventions by class name — choose another name"
            )
        Intervention.registry[cls.__name__] = cls

    def __post_init__(self) -> None:
        for name, annotation in _field_types(type(self)).items():
            value = getattr(self, name)
            normalised = _normalise(annotation, value, f"{type(self).__name__}.{name}")
            if normalised is not value:
                object.__setattr__(self, name, normalised)
        for name in self.counted:
            value = getattr(self, name)
            if value is not None and min((value,) if isinstance(value, int) else value) < 0:
                raise InterventionError(f"{type(self).__name__}.{name} counts from 0 (layers, heads and rows have no "
                                        f"negative numbers); got {value!r}")
        self.check()

    def check(self) -> None:
        """Refuse field values that can never apply (override to add checks; fields are already normalised)."""

    def apply(self, ctx: Context) -> None:
        """Edit the running forward pass through `ctx`."""
        raise NotImplementedError

    def groups(self) -> frozenset[str]:
        """The token groups this intervention names (its group fields given by name): an example must hold each."""
        return frozenset(getattr(self, name) for name, annotation in _field_types(type(self)).items()
                         if _is_group(annotation) and isinstance(getattr(self, name), str))

    def affected_from(self, example: Example) -> int:
        """The first position of `example` (over all rows) whose activations this intervention reads or changes.

        Every earlier position computes exactly as in the clean run at every layer (attention from there on being
        causal), so a sweep engine may take its keys and values from a cache and run only the positions from
        here on. The default, 0, claims nothing and makes the engine run the full forward; override it only
        where the claim always holds.
        """
        return 0

    def first_layer(self) -> int:
        """The first decoder layer whose sites this intervention reads or changes.

        Every earlier layer computes exactly as in the run without it, so a sweep engine may take the stream
        entering this layer from a cache and start the forward there. The default, 0, claims nothing.
        """
        return 0

    def source_sites(self) -> frozenset[tuple[str, int]]:
        """The `(site, layer)` activations it reads from a source run (`ctx.source`); none by default."""
        return frozenset()

    def source_prefix(self, example: Example, source: Example, agree_before: int) -> tuple[int, int] | None:
        """`(m, layer)` where, in `example` run with this intervention, every position before m carries exactly
        the `source` run's residual stream after `layer` and in every later layer, and nothing at or after m is
        edited — given that the two runs' inputs agree before position `agree_before`. An engine may then run the
        positions from m on from the layer after `layer`, with the source's keys and values before m and without
        applying this intervention. None (the default): no such claim."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """`{"type": ClassName, field: value, ...}` with tuples as lists — JSON/YAML ready."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Intervention:
        """Rebuild an intervention from `to_dict` output."""
        data = dict(data)
        name = data.pop("type", None)
        if name not in Intervention.registry:
            raise InterventionError(f"unknown intervention type {name!r}; known: {known(sorted(Intervention.registry))}")
        cls = Intervention.registry[name]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InterventionError(f"{name} has no field(s) {unknown}; fields: {known(sorted(names))}")
        return cls(**{key: _frozen(value) for key, value in data.items()})


def earliest(example: Example, group: Group, rows: Iterable[int] | None = None) -> int:
    """The first position of `group` over `rows` of `example` (default: every row); the sequence length where
    none holds it — what an `affected_from` claims for an edit of that group."""
    rows = range(len(example)) if rows is None else rows
    found = [example.positions(group, row) for row in rows]
    return min((int(positions.min()) for positions in found if len(positions)), default=example.seq_len)


def check_interventions(interventions) -> None:
    """Refuse `interventions` unless it is a sequence of `Intervention` objects (a bare one, or a dict, would
    otherwise fail deep inside the trace, or iterate into its fields)."""
    if isinstance(interventions, Intervention):
        raise InterventionError(f"interventions must be a sequence of Intervention objects; got one "
                                f"{type(interventions).__name__}: pass [it]")
    if not isinstance(interventions, Sequence) or isinstance(interventions, str):
        raise InterventionError(f"interventions must be a sequence of Intervention objects; got "
                                f"{type(interventions).__name__} {interventions!r:.60}")
    for index, item in enumerate(interventions):
        if not isinstance(item, Intervention):
            hint = " (rebuild a dict with Intervention.from_dict)" if isinstance(item, dict) else ""
            raise InterventionError(f"interventions[{index}] must be an Intervention object; got "
                                    f"{type(item).__name__} {item!r:.60}{hint}")


_FIELD_TYPES: dict[type, dict[str, Any]] = {}
_INTS = tuple[int, ...]


def _field_types(cls: type) -> dict[str, Any]:
    """Each dataclass field's resolved annotation (cached per class)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _normalise(annotation, value, where: str):
    """`value` in the form `annotation` promises: int sequences as tuples of ints, groups as names or tuples."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None and type(None) in options:
        return None
    if _INTS in options:
        if str in options and isinstance(value, str):
            return value
        return _ints(value, where, "a token-group name or positions" if str in options else "ints")
    if annotation is bool and not isinstance(value, bool):
        raise InterventionError(f"{where} must be True or False; got {value!r}")
    if float in options and int not in options:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InterventionError(f"{where} must be a finite number; got {value!r}")
        return float(value)
    if int in options and not (float in options and isinstance(value, float)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise InterventionError(f"{where} must be an int; got {value!r}")
        return operator.index(value)  # a NumPy or torch integer as an int
    return value


def _is_group(annotation) -> bool:
    """Whether a field annotated so holds a token group (a name or positions, `Group`, possibly optional)."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return str in options and _INTS in options


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _ints(value, where: str, expected: str) -> tuple[int, ...]:
    """An int or a non-empty sequence of ints as a tuple of ints (an empty one would apply nothing, silently);
    strings, bools, floats and other things are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InterventionError(f"{where} must be {expected}; got {value!r}")
    items = list(value)
    if not items:
        raise InterventionError(f"{where} must not be empty; got {value!r}")
    try:
        if any(isinstance(item, bool) for item in items):
            raise TypeError
        ints = tuple(operator.index(item) for item in items)
    except TypeError:
        raise InterventionError(f"{where} must be {expected}; got {value!r}") from None
    repeated = next((item for index, item in enumerate(ints) if item in ints[:index]), None)
    if repeated is not None and expected == "ints":  # positions of a token group may repeat; layers, heads, rows not
        raise InterventionError(f"{where} lists {repeated} twice; got {value!r}: give each once")
    return ints


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _frozen(value):
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value

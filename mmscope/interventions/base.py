"""The `Intervention` base class and the `Context` it edits the model through.

An intervention is a small frozen dataclass with one method, `apply(ctx)`, which runs inside an nnsight trace
and reads or writes the model's real intermediate values through `ctx` — e.g. `ctx.residual(layer)`,
`ctx.attention_mask(layer)`, `ctx.positions("image")`. Because it is a dataclass of plain values it round-trips
through a dict (`to_dict` / `Intervention.from_dict`), so an experiment's interventions can be saved in its
config and re-run.

Composition: `Model.run` gives each intervention its own nnsight invoke over the whole batch, in list order.
nnsight then interleaves them with the forward pass, so every intervention may touch layers in its own forward
order and edits to the same site chain (the second sees what the first wrote).

Restriction: a sweep engine may run several variants as rows of one forward, over only the positions after a
cached prefix. It then gives each variant a `Context` restricted to its `rows`, with the forward's first
position as `offset`: sites are that row slice, positions are shifted by the offset, and mask edits touch only
those rows. An intervention may declare, through `affected_from`, the first position it reads or changes; the
engine only runs it on a suffix that starts at or before that position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmscope.errors import InterventionError, known

if TYPE_CHECKING:
    from mmscope.inputs import Example
    from mmscope.model import Model

Group = str | tuple[int, ...]
SITES = ("residual", "attention", "mlp")


def as_group(group: str | Sequence[int]) -> Group:
    """A token group: a layout name, or explicit positions (stored as a tuple so the dataclass stays hashable)."""
    return group if isinstance(group, str) else tuple(int(p) for p in group)


def as_layers(layers: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, int) else tuple(int(layer) for layer in layers)


class Context:
    """What an intervention sees: the running model's sites, the batch's token layout, its size and dtype.

    Values returned by `residual`, `attention_output`, `mlp_output` are the live tensors of the forward pass
    (batch `[B, T, D]`); editing them in place changes what flows on.

    `rows` (a slice of the running batch, default all of it) and `offset` (the forward's first position, default
    0) restrict the context to one variant of a batched suffix pass: sites are the `[len(rows), T - offset, D]`
    view of those rows, positions count from `offset`, and mask edits change those rows only.
    """

    def __init__(self, model: Model, example: Example, rows: slice | None = None, offset: int = 0) -> None:
        self.model = model
        self.example = example
        self.n_layers = model.n_layers
        self.n_heads = model.n_heads
        self.batch_size = len(example)
        self.seq_len = example.seq_len
        if rows is not None and rows.stop - rows.start != self.batch_size:
            raise InterventionError(f"rows {rows} do not hold the {self.batch_size} row(s) of this context's example")
        self.rows = rows
        self.offset = offset

    # --- where things are -------------------------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise InterventionError(f"layer {layer} out of range; the model has layers 0..{self.n_layers - 1}")
        return layer

    def layer(self, layer: int):
        """The nnsight envoy of decoder layer `layer`."""
        return self.model.layer_envoys[self.check_layer(layer)]

    def attention(self, layer: int):
        return self.model.adapter_path(self.layer(layer), self.model.adapter.attention)

    def mlp(self, layer: int):
        return self.model.adapter_path(self.layer(layer), self.model.adapter.mlp)

    def positions(self, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, cols)` index tensors of `group` over the whole batch: `x[ctx.positions("image")]` is `[n, D]`."""
        rows, cols = [], []
        for row in range(self.batch_size):
            found = self.row_positions(group, row)
            rows.append(torch.full_like(found, row))
            cols.append(found)
        return torch.cat(rows), torch.cat(cols)

    def row_positions(self, group: Group, row: int) -> torch.Tensor:
        """Positions `[n]` of `group` in batch row `row`, counted from the forward's first position."""
        found = self.example.positions(group, row)
        if self.offset and len(found) and int(found.min()) < self.offset:
            raise InterventionError(
                f"group {group!r} of row {row} starts at position {int(found.min())}, before this forward's first "
                f"position {self.offset} (earlier positions come from a cache); an intervention that touches it "
                f"must not claim affected_from > {int(found.min())}"
            )
        return found - self.offset

    # --- values of the running forward pass ----------------------------------------------------------------------
    def residual(self, layer: int) -> torch.Tensor:
        """Residual stream after decoder layer `layer`, `[B, T, D]`."""
        return self._own_rows(_first(self.layer(layer).output))

    def attention_output(self, layer: int) -> torch.Tensor:
        """Self-attention output of layer `layer` before it is added to the residual, `[B, T, D]`."""
        return self._own_rows(_first(self.attention(layer).output))

    def mlp_output(self, layer: int) -> torch.Tensor:
        """MLP output of layer `layer` before it is added to the residual, `[B, T, D]`."""
        return self._own_rows(_first(self.mlp(layer).output))

    def _own_rows(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.rows is None else value[self.rows]  # a view: in-place edits reach the forward

    def site(self, site: str, layer: int) -> torch.Tensor:
        """One of `SITES` ("residual", "attention", "mlp") at `layer`, `[B, T, D]`."""
        readers = {"residual": self.residual, "attention": self.attention_output, "mlp": self.mlp_output}
        if site not in readers:
            raise InterventionError(f"unknown site {site!r}; known: {known(SITES)}")
        return readers[site](layer)

    def edit_attention_mask(self, layer: int, edit) -> None:
        """Replace the additive mask layer `layer`'s self-attention receives by `edit(mask)`.

        `mask` is `[B, 1 or H, Q, K]` in the hidden states' dtype (0 = attend, dtype minimum = blocked), built
        as a causal mask when the model passed None, converted when it passed a boolean one. `edit` must
        return a new tensor (the model's own mask is shared by every layer and must not be edited in place).
        With `rows`, `edit` sees and replaces only those rows.
        """
        from mmscope.interventions.masks import additive_mask

        attention = self.attention(layer)
        args, kwargs = attention.inputs
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = additive_mask(kwargs.get("attention_mask"), hidden)
        edited = edit(mask) if self.rows is None else self._edit_rows(mask, edit)
        attention.inputs = (args, {**kwargs, "attention_mask": edited})

    def _edit_rows(self, mask: torch.Tensor, edit) -> torch.Tensor:
        part = edit(mask[self.rows])
        # The first row edit of a layer copies the shared mask once (widened to per-head when the edit is);
        # later variants' edits of that layer then write their rows into the copy instead of copying again.
        if not getattr(mask, "_mmscope_private", False) or part.shape[1] > mask.shape[1]:
            mask = mask.expand(mask.shape[0], max(part.shape[1], mask.shape[1]), *mask.shape[2:]).clone()
            mask._mmscope_private = True
        mask[self.rows] = part
        return mask

    def skip_layer(self, layer: int) -> None:
        """Run decoder layer `layer` as the identity (its input passes on unchanged)."""
        if self.rows is not None:
            raise InterventionError(
                f"cannot skip layer {layer} for rows {self.rows.start}..{self.rows.stop - 1} only: a skipped layer "
                "skips for the whole batch; run this intervention in a forward of its own"
            )
        envoy = self.layer(layer)
        envoy.skip(envoy.input)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Intervention:
    """Base class: a frozen dataclass of plain values with one method, `apply(ctx)`.

    Subclasses are registered by class name for `from_dict`; fields holding sequences are stored as tuples.
    """

    registry: ClassVar[dict[str, type[Intervention]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Intervention.registry[cls.__name__] = cls

    def apply(self, ctx: Context) -> None:
        """Edit the running forward pass through `ctx`."""
        raise NotImplementedError

    def affected_from(self, example: Example) -> int:
        """The first position of `example` (over all rows) whose activations this intervention reads or changes.

        Every earlier position computes exactly as in the clean run at every layer (attention from there on being
        causal), so a sweep engine may take its keys and values from a cache and run only the positions from
        here on. The default, 0, claims nothing and makes the engine run the full forward; override it only
        where the claim always holds.
        """
        return 0

    def to_dict(self) -> dict[str, Any]:
        """`{"type": ClassName, field: value, ...}` with tuples as lists — JSON/YAML ready."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
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


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _frozen(value):
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value

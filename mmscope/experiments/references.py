"""Published curves to draw over a run's own: `mmscope knockout --reference FILE.csv` (or a shipped name).

A reference is a CSV of mean Δp% by centre layer: columns `center` (or `center_layer`, `layer`) and `mean` (or
`mean_relative_change_pct`, `delta_pct`), and optionally `category` and `flow` (the panel and curve it belongs
to; without them it is drawn on every panel) and `n_layers` (the depth of the model it comes from: a reference
from a model of another depth is drawn at the same relative depth, centre c at c · (L − 1) / (L_ref − 1)).
Lines starting with `#` are comments.

Shipped: the one public result curve of the cross-modal information-flow study's code — LLaVA-1.5-7b, GQA
ChooseAttr, question→last, window 9 — read off its published plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmscope.errors import InputError

SHIPPED = Path(__file__).parent / "references"
REFERENCES = {path.stem: path for path in sorted(SHIPPED.glob("*.csv"))}
X_COLUMNS = ("center", "center_layer", "layer")
Y_COLUMNS = ("mean", "mean_relative_change_pct", "delta_pct")


@dataclass(frozen=True)
class Reference:
    """One published curve: its points, the panel (category) and flow it belongs to (None: any), its model's
    depth (None: unknown, drawn as is) and its label."""

    label: str
    center: tuple[float, ...]
    mean: tuple[float, ...]
    category: str | None = None
    flow: str | None = None
    n_layers: int | None = None

    def centers_for(self, n_layers: int) -> list[float]:
        """The reference's centres on the axis of a model of `n_layers` (the same relative depth)."""
        if self.n_layers is None or self.n_layers == n_layers or self.n_layers < 2 or n_layers < 2:
            return list(self.center)
        return [c * (n_layers - 1) / (self.n_layers - 1) for c in self.center]


def read_reference(name_or_path: str) -> list[Reference]:
    """The curves of a reference CSV (one per category × flow it holds), or an InputError naming the file and
    what is wrong with it."""
    path = REFERENCES.get(name_or_path, Path(name_or_path).expanduser())
    if not path.is_file():
        raise InputError(f"reference {name_or_path!r} (--reference) is neither a CSV file nor a shipped reference "
                         f"({', '.join(REFERENCES)})")
    import pandas as pd  # imported when a reference file is read, not for --help or a missing one

    try:
        table = pd.read_csv(path, comment="#")
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise InputError(f"reference {path} (--reference) is not a readable CSV ({str(error).splitlines()[0]})") \
            from None
    x = next((column for column in X_COLUMNS if column in table), None)
    y = next((column for column in Y_COLUMNS if column in table), None)
    if x is None or y is None:
        raise InputError(f"reference {path} (--reference) needs a centre column ({' or '.join(X_COLUMNS)}) and a "
                         f"mean column ({' or '.join(Y_COLUMNS)}); it has {', '.join(map(str, table.columns))}")
    if not pd.api.types.is_numeric_dtype(table[x]) or not pd.api.types.is_numeric_dtype(table[y]):
        raise InputError(f"reference {path} (--reference): columns {x!r} and {y!r} must hold numbers")
    keys = [column for column in ("category", "flow", "n_layers") if column in table]
    groups = table.groupby(keys, sort=False) if keys else [((), table)]
    curves = []
    for key, part in groups:
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        part = part.sort_values(x)
        curves.append(Reference(
            label=f"{path.stem}", center=tuple(part[x].astype(float)), mean=tuple(part[y].astype(float)),
            category=key.get("category"), flow=key.get("flow"),
            n_layers=int(key["n_layers"]) if "n_layers" in key else None,
        ))
    return curves

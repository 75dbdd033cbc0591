"""Printed summary tables (pandas does the formatting)."""

from __future__ import annotations

import pandas as pd

from mmscope.data import CATEGORIES


def accuracy_table(results: dict) -> str:
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

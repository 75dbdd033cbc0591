"""The printed findings of a map run: per kind × target × panel, the mean over the regions on the question's
object beside that of the others (`object_means`), and the region of the largest mean (for knockout: the
largest mean drop).
"""

from __future__ import annotations

import pandas as pd

from mmscope.experiments.attribution import agreement_lines, agreement_scalars
from mmscope.experiments.declarations import MapOptions
from mmscope.experiments.maps.figures import CHANGES, MAPPED_EXAMPLES
from mmscope.experiments.maps.kinds import ESTIMATES, kind_values


def object_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind × target × layer, the mean value of the regions on the question's object and of the others
    (examples with a box)."""
    boxed = table[table["has_object"]].assign(value=kind_values(table))
    if boxed.empty:
        return pd.DataFrame(columns=["kind", "target", "layer", "on_object", "mean", "n"])
    means = boxed.groupby(["kind", "target", "layer", "on_object"])["value"].agg(["mean", "count"]).reset_index()
    return means.rename(columns={"count": "n"})


KIND_NAMES = {"knockout": "Region knockout, mean Δp %", "patch": "Region patching, mean share restored",
              "lens": "Logit lens on the image tokens, mean p", "attention": "Attention to each region, mean weight",
              "atp-knockout": "Region knockout estimated to first order, mean Δ metric",
              "atp-patch": "Region patching estimated to first order, mean Δ metric"}
DROPS = ("knockout", "atp-knockout")  # kinds whose finding is the largest mean drop


def map_findings(table: pd.DataFrame, summary: pd.DataFrame, options: MapOptions) -> list[str]:
    """Per kind × target × panel, the mean value of object regions and of the others, and the region with the
    largest mean (for knockout: the largest mean drop)."""
    means = object_means(table)
    lines = []
    for kind in dict.fromkeys(table["kind"]):
        if kind in DROPS:
            centres = ", ".join(str(c) for c in options.centers)
            panels = f"window {options.window} around layer{'s' if len(options.centers) > 1 else ''} {centres}"
        else:
            layers = list(options.layers)
            consecutive = len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
            panels = f"layers {layers[0]}-{layers[-1]}" if consecutive else \
                f"layer{'s' if len(layers) > 1 else ''} {', '.join(str(layer) for layer in layers)}"
        if kind == "attention" and options.head is not None:
            panels += f", head {options.head}"
        lines += ["", f"{KIND_NAMES[kind]} ({panels}, regions {options.region}x{options.region}):"]
        own_table = table[table["kind"] == kind]
        fmt = "+.3g" if kind in CHANGES else ".3g"  # signed: a change; unsigned: a probability
        for target, layer in dict.fromkeys(zip(own_table["target"], own_table["layer"], strict=True)):
            part = means[(means["kind"] == kind) & (means["target"] == target) & (means["layer"] == layer)]
            on = part[part["on_object"].astype(bool)]["mean"]
            off = part[~part["on_object"].astype(bool)]["mean"]
            own = summary[(summary["kind"] == kind) & (summary["target"] == target) & (summary["layer"] == layer)]
            own = own[own["mean"].notna()]
            object_text = (f"object regions {on.iloc[0]:{fmt}}, other regions {off.iloc[0]:{fmt}}"
                           if len(on) and len(off) else "no object box")
            if own.empty:
                lines.append(f"  {target}, layer {layer}: {object_text}; no finite value")
                continue
            top = own.loc[own["mean"].idxmin() if kind in DROPS else own["mean"].idxmax()]
            rect = own_table[own_table["region"] == top["region"]].iloc[0]
            which = "largest mean drop" if kind in DROPS else "largest mean"
            lines.append(f"  {target}, layer {layer}: {object_text}; {which}: region {int(top['region'])} "
                         f"(x {rect['x0']:.0f}-{rect['x1']:.0f}, y {rect['y0']:.0f}-{rect['y1']:.0f}) "
                         f"{top['mean']:{fmt}}")
    estimated = table[table["kind"].isin(ESTIMATES)]
    if not estimated.empty:
        lines += agreement_lines(estimated, ["kind"], f"Estimates (Δ {options.metric}, each kind ranked over its targets, panels and regions)")
        lines.append("  (map_estimates.png: estimate against exact; map_<example>.png: the exact map of the verified "
                     "regions under each estimate)")
    shown = sorted(table["example"].unique())[:MAPPED_EXAMPLES]
    lines += ["", f"maps over the images: map_<example>.png for examples {', '.join(str(int(e)) for e in shown)}; "
                  "map.png: the object-centred mean"]
    return lines


def estimate_scalars(table: pd.DataFrame) -> dict[str, float]:
    """For the W&B run summary: the estimated kinds' agreement with the exact effects, per kind."""
    estimated = table[table["kind"].isin(ESTIMATES)]
    return agreement_scalars(estimated, ["kind"]) if not estimated.empty else {}

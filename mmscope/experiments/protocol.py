"""Protocols: every knob where mmscope's defaults and a study's own code differ, named once.

mmscope's defaults are the geometric, documented choices; the cross-modal information-flow study (Zhang et al.,
CVPR 2025) made other ones in its code. `--protocol study` sets every knob the study's way, so that a run
reproduces the paper; each knob is also its own option, which wins over the protocol:

    knob              default                                  study
    answer tokens     8 greedy tokens                          128 greedy tokens
    answer match      lenient: strip, lower case, no final     lower: strip().lower()
                      full stop
    ci                normal: mean ± 1.96 standard errors      bootstrap: 95% percentile bootstrap of the mean
                                                               (seaborn's default, the study's figures)
    lens              raw (no final norm)                      raw
    lens axis         layers: 0..L-1 = after decoder layer ℓ   hidden-states: 0 = embeddings, ℓ = after layer ℓ-1,
                                                               L = the final-normed output (transformers'
                                                               hidden_states)

A knob left unset (None) takes its protocol's value when the run starts (`configure`), against the loaded model;
config.yaml records the values the run used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmscope.model import Model

CHOICES = {
    "answer_match": ("lenient", "lower"),
    "ci": ("normal", "bootstrap"),
    "lens": ("raw", "normed"),
    "lens_axis": ("layers", "hidden-states"),
}


@dataclass(frozen=True)
class Protocol:
    """One value per knob (the names of the options that take them)."""

    answer_tokens: int
    answer_match: str
    ci: str
    lens: str
    lens_axis: str


PROTOCOLS = {
    "default": Protocol(answer_tokens=8, answer_match="lenient", ci="normal", lens="raw", lens_axis="layers"),
    "study": Protocol(answer_tokens=128, answer_match="lower", ci="bootstrap", lens="raw", lens_axis="hidden-states"),
}
KNOBS = tuple(field.name for field in dataclasses.fields(Protocol))


def configure(options, model: Model):
    """`options` with every knob left unset taken from its protocol; returns them and the run header's line
    naming the value of every knob."""
    protocol = PROTOCOLS[options.protocol]
    unset = {knob for knob in KNOBS if hasattr(options, knob) and getattr(options, knob) is None}
    options = dataclasses.replace(options, **{knob: getattr(protocol, knob) for knob in unset})
    notes: list[str] = []
    chosen = ", ".join(f"{knob.replace('_', ' ')} {getattr(options, knob)}" for knob in KNOBS
                       if hasattr(options, knob))
    return options, [f"protocol {options.protocol}: {chosen}", *notes]

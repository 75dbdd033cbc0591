"""Logit lens at the last position: at which layer does the answer become readable?

The residual stream after each layer is projected onto the vocabulary with the unembedding (`lm_head`), with
the final norm ("normed") or without it ("raw" — what the cross-modal information-flow study did), and the
probability of the answer token is tracked: lower-case, its capitalised variant when the vocabulary has one,
and for choose questions the false option. The answer appears first in lower case in the study's LLaVA runs.
The lens only reads activations: it applies no intervention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmscope.experiments.figures import curves
from mmscope.experiments.options import QuestionOptions, check_choice, option
from mmscope.experiments.runner import Experiment, PerQuestion, Question, Sweep, questions
from mmscope.layout import Example
from mmscope.model import Model

LENSES = ("raw", "normed")


@dataclass(frozen=True)
class LensOptions(QuestionOptions):
    """`mmscope lens`: which lens."""

    lens: str = option("raw", "raw (no final norm, as in the study) or normed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("lens", self.lens, LENSES)


def tracked_tokens(model: Model, example: Example, row: dict, answer_token: int) -> dict[str, int]:
    """Token ids the lens follows: the answer, its capitalised form, and the false option (when distinct)."""
    tokens = {"answer": answer_token}
    capitalised = model.answer_tokens(example, row["answer"].capitalize())[0][0]
    if capitalised != answer_token and capitalised != model.tokenizer.unk_token_id:
        tokens["answer_capitalised"] = capitalised
    false_option = row.get("false_option")
    if false_option:
        false_token = model.answer_tokens(example, false_option)[0][0]
        if false_token != answer_token:
            tokens["false_option"] = false_token
    return tokens


def lens_rows(sweep: Sweep[LensOptions], question: Question) -> list[dict]:
    """p(token) after each layer for every tracked token of one question."""
    model, lens = sweep.model, sweep.options.lens
    states = model.hidden_states(question.example)[1:, 0, -1]  # [L, D] after each decoder layer, last position
    probs = model.unembed(states, normed=lens == "normed").softmax(-1)
    return [
        {"lens": lens, "layer": layer, "token": name, "token_id": token, "prob": probs[layer, token].item()}
        for name, token in tracked_tokens(model, question.example, question.row, question.answer.first_token).items()
        for layer in range(model.n_layers)
    ]


def lens_figure(summary: pd.DataFrame, path: Path, options: LensOptions) -> Path:
    """Mean p(token) ± 95% CI against the layer, one curve per tracked token, one panel per category."""
    return curves(summary, path, x="layer", hue="token", panel="category", ylabel="probability",
                  title=f"Logit lens at the last position ({options.lens})")


def lens_findings(table: pd.DataFrame, summary: pd.DataFrame, options: LensOptions) -> list[str]:
    """Which lens, and the mean p(answer) per category × layer."""
    answer = summary[summary["token"] == "answer"].pivot(index="category", columns="layer", values="mean")
    note = ("raw lens: hidden states go straight to lm_head, without the final norm, as in the study"
            if options.lens == "raw" else "normed lens: hidden states pass the final norm before lm_head")
    return [note, "", "Mean p(answer) by layer:", answer.to_string(float_format=lambda v: f"{v:.3f}")]


LENS = Experiment(
    name="lens",
    help="Logit lens at the last position: p(answer), its capitalised form and the false option, per layer.",
    options=LensOptions,
    data=questions,
    work=PerQuestion(lens_rows),
    value="prob",
    by=("category", "token", "layer"),
    figure=lens_figure,
    findings=lens_findings,
    desc="logit lens",
)

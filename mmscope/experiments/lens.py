"""Logit lens at the last position: at which layer does the answer become readable?

The residual stream after each layer is projected onto the vocabulary with the unembedding (`lm_head`), with
the final norm ("normed") or without it ("raw" — what the cross-modal information-flow study did), and the
probability of the answer token is tracked: lower-case, its capitalised variant when the vocabulary has one,
and for choose questions the false option. The answer appears first in lower case in the study's LLaVA runs.
"""

from __future__ import annotations

from mmscope.experiments.answers import clean_answer
from mmscope.experiments.common import example_of, resumable_loop, row_ids
from mmscope.experiments.runs import RunDir
from mmscope.model import Model

LENSES = ("raw", "normed")


def tracked_tokens(model: Model, example, row: dict, answer_token: int) -> dict[str, int]:
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


def lens_rows(model: Model, index: int, row: dict, lens: str, include_all: bool = False) -> list[dict] | None:
    example = example_of(model, row)
    answer = clean_answer(model, example, row["answer"])
    if not answer.correct and not include_all:
        return None
    states = model.hidden_states(example)[1:, 0, -1]  # [L, D] after each decoder layer, last position
    probs = model.unembed(states, normed=lens == "normed").softmax(-1)
    ids = row_ids(index, row)
    return [
        {**ids, "lens": lens, "layer": layer, "token": name, "token_id": token, "prob": probs[layer, token].item()}
        for name, token in tracked_tokens(model, example, row, answer.first_token).items()
        for layer in range(model.n_layers)
    ]


def run_lens(model: Model, dataset, run: RunDir, lens: str = "raw", include_all: bool = False) -> dict[str, int]:
    if lens not in LENSES:
        raise ValueError(f"unknown lens {lens!r}; known: {', '.join(LENSES)}")
    return resumable_loop(run, dataset, lambda i, row: lens_rows(model, i, row, lens, include_all), desc="logit lens")

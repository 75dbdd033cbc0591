"""Logit lens at the last position: at which layer does the answer become readable?

The residual stream at the last position is projected onto the vocabulary with the unembedding (`lm_head`),
with the final norm ("normed") or without it ("raw" — what the cross-modal information-flow study did), and the
probability of four tokens is tracked, as the study's code does: the first token of the gold answer in lower
case (`answer`) and capitalised (`Answer`), and for choose questions the false option in both forms
(`false_option`, `False_option`). The study found the lower-case answer readable first, in middle layers, and
the capitalised one — what LLaVA writes — later. Both are the gold answer's, not the model's greedy token, so
the two cases can be told apart whichever the model writes (tokens with the same id give the same curve).

Each label is written as the model writes its own answer after that prompt: with a leading space when the first
token of the clean greedy answer starts with one (`ĠRed`, `▁Red`), without it otherwise (`Red`) — on real
tokenizers two different tokens. The report names the token strings tracked and how often each spelling was
chosen.

The x axis (`--lens-axis`), in mmscope's one layer numbering (`mmscope.sites`: decoder layers 0 … L−1, the
embeddings −1):
  * `layers`: L points, layer ℓ = the stream after decoder layer ℓ;
  * `hidden-states`: L + 1 points, transformers' `hidden_states` — the embeddings (−1), then after each decoder
    layer ℓ, the last one (L−1) through the final norm (so its point is the model's own next-token
    distribution, whatever the lens).
The lens only reads activations: it applies no intervention.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from mmscope.experiments import declarations
from mmscope.experiments.declarations import LensOptions  # declared without torch; kept importable from here
from mmscope.experiments.figures import PROBABILITY, curves
from mmscope.experiments.runner import Experiment, Finished, PerQuestion, Question, Sweep, questions
from mmscope.layout import Example
from mmscope.model import Model
from mmscope.sites import EMBEDDINGS, layer_name


TOKENS = ("answer", "Answer", "false_option", "False_option")  # the tracked tokens, in the figure's order


def tracked_tokens(model: Model, example: Example, row: dict, leading_space: bool | None = None) -> dict[str, int]:
    """Token ids the lens follows: the first token of the gold answer in lower case and capitalised, and of the
    false option in both forms where the question has one (the same id may appear under two names), each written
    with a leading space or not (`leading_space`; None: as the model's greedy next token is written)."""
    if leading_space is None:
        leading_space = model.greedy_leading_space(example)[0]
    tokens = {}
    for name, text in (("answer", row["answer"]), ("false_option", row.get("false_option"))):
        if text and text.strip():
            lower = text.strip().lower()
            tokens[name] = model.answer_tokens(example, lower, leading_space)[0][0]
            tokens[name[0].upper() + name[1:]] = model.answer_tokens(example, lower.capitalize(), leading_space)[0][0]
    return tokens


def lens_probs(model: Model, example: Example, lens: str, axis: str) -> torch.Tensor:
    """p(vocabulary) at the last position of one example `[points, V]` on the lens axis `axis`."""
    states = model.hidden_states(example)[:, 0, -1]  # [L + 1, D]: the embeddings, then after each layer
    if axis == "layers":
        return model.unembed(states[1:], normed=lens == "normed").softmax(-1)
    below = model.unembed(states[:-1], normed=lens == "normed")  # embeddings … after layer L - 2
    top = model.unembed(states[-1:], normed=True)  # the final-normed output: the model's own logits
    return torch.cat([below, top]).softmax(-1)


def lens_rows(sweep: Sweep[LensOptions], question: Question) -> list[dict]:
    """p(token) at each point of the lens axis for every tracked token of one question."""
    model, options = sweep.model, sweep.options
    probs = lens_probs(model, question.example, options.lens, options.lens_axis)
    space = model.writes_leading_space(question.example, [question.answer.first_token])[0]
    other = tracked_tokens(model, question.example, question.row, not space)
    spelled = model.tokenizer.convert_ids_to_tokens
    first = EMBEDDINGS if options.lens_axis == "hidden-states" else 0  # the layer of the axis's first point
    return [
        {"generated": question.answer.text, "lens": options.lens, "axis": options.lens_axis, "layer": first + point,
         "token": name, "token_id": token, "token_text": spelled(token), "leading_space": space,
         "other_spelling": spelled(other[name]) if other[name] != token else None, "prob": probs[point, token].item()}
        for name, token in tracked_tokens(model, question.example, question.row, space).items()
        for point in range(len(probs))
    ]


def spelling_findings(table: pd.DataFrame) -> list[str]:
    """Which token strings the lens tracked per name, and why that spelling: how many questions' greedy answers
    start with a space, and, where a label's other spelling is another token, that it was not tracked."""
    first = table[table["layer"] == table["layer"].min()]
    per_question = first.drop_duplicates("example")
    spaced = int(per_question["leading_space"].sum())
    lines = ["", f"tracked tokens: each label's first token written as the model writes its own answer after the "
                 f"prompt — with a leading space on {spaced} of {len(per_question)} questions, without on "
                 f"{len(per_question) - spaced} (read from the first token of each clean greedy answer):"]
    for name in TOKENS:
        part = first[first["token"] == name]
        if part.empty:
            continue
        counts = part["token_text"].value_counts()
        shown = ", ".join(f"{text!r} ×{count}" for text, count in counts.head(6).items())
        more = f", … ({len(counts)} strings)" if len(counts) > 6 else ""
        lines.append(f"  {name}: {shown}{more}")
    two_ways = first[first["other_spelling"].notna()]
    if len(two_ways):
        row = two_ways.iloc[0]
        lines.append(f"  {len(two_ways)} of {len(first)} labels are two tokens spelt with and without a space "
                     f"(e.g. {row['token_text']!r} tracked, not {row['other_spelling']!r}): the one the model "
                     f"writes is tracked")
    return lines


def lens_figure(run: Finished[LensOptions], path: Path) -> Path:
    """Mean p(token) ± 95% CI against the layer, one curve per tracked token (one colour each in every panel;
    the capitalised forms dashed, so a curve equal to its lower-case one stays visible), one panel per
    category."""
    summary, options = run.summary, run.options
    axis = ("embeddings, after each layer, the last through the final norm" if options.lens_axis == "hidden-states"
            else "after each layer")
    return curves(summary, path, x="layer", hue="token", panel="category", ylabel="probability",
                  title=f"Logit lens at the last position ({options.lens}; {axis})", limits=PROBABILITY,
                  hue_order=TOKENS, styles={"Answer": "--", "False_option": "--"})


def lens_findings(table: pd.DataFrame, summary: pd.DataFrame, options: LensOptions) -> list[str]:
    """Which lens and axis, the mean p(token) per token × layer over all categories, the layer where each
    token's mean peaks, and the mean p(answer) and p(Answer) per category × layer."""
    note = ("raw lens: hidden states go straight to lm_head, without the final norm, as in the study"
            if options.lens == "raw" else "normed lens: hidden states pass the final norm before lm_head")
    if options.lens_axis == "hidden-states":
        note += "; the embeddings, then ℓ = after decoder layer ℓ, the last through the final norm (the output)"
    else:
        note += "; layer ℓ = after decoder layer ℓ"
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    pooled = table.pivot_table(index="token", columns="layer", values="prob", aggfunc="mean")
    order = [token for token in TOKENS if token in pooled.index]
    pooled = pooled.loc[order]
    peaks = ", ".join(f"{token} → {layer_name(pooled.loc[token].idxmax())}" for token in order)
    lines = [note, *spelling_findings(table), "", "Mean p(token) by layer, all categories:",
             pooled.rename(columns=layer_name).to_string(float_format=fmt), "", f"peak layer: {peaks}"]
    for token in ("answer", "Answer"):
        part = summary[summary["token"] == token].pivot(index="category", columns="layer", values="mean")
        lines += ["", f"Mean p({token}) by category and layer:",
                  part.rename(columns=layer_name).to_string(float_format=fmt)]
    return lines


LENS = Experiment(
    command=declarations.LENS,
    data=questions,
    work=PerQuestion(lens_rows),
    value="prob",
    by=("category", "token", "layer"),
    figure=lens_figure,
    findings=lens_findings,
    desc="logit lens",
)

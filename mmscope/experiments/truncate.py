"""Truncation sweep: how good is the answer if the model stops after layer ℓ?

For each layer ℓ the decoder exits early (`Truncate(ℓ)`: later layers skipped, final norm and lm_head applied)
and we record the probability of the clean answer's first token and whether it is still the argmax.
"""

from __future__ import annotations

from mmscope.experiments.answers import clean_answer
from mmscope.experiments.common import example_of, resumable_loop, row_ids
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.runs import RunDir
from mmscope.interventions import Truncate
from mmscope.model import Model


def truncate_rows(model: Model, index: int, row: dict, include_all: bool = False,
                  engine: str = "prefix") -> list[dict] | None:
    example = example_of(model, row)
    answer = clean_answer(model, example, row["answer"])
    if not answer.correct and not include_all:
        return None
    variants = [Variant(("truncate", layer), (Truncate(layer),)) for layer in range(model.n_layers)]
    clean, probs = run_variants(model, example, variants, engine=engine)
    ids = row_ids(index, row)
    p_clean = clean.probs[answer.first_token].item()
    return [
        {**ids, "layer": layer, "p_clean": p_clean, "p_answer": probs[layer, answer.first_token].item(),
         "top1": float(probs[layer].argmax().item() == answer.first_token)}
        for layer in range(model.n_layers)
    ]


def run_truncate(model: Model, dataset, run: RunDir, include_all: bool = False,
                 engine: str = "prefix") -> dict[str, int]:
    return resumable_loop(run, dataset, lambda i, row: truncate_rows(model, i, row, include_all, engine),
                          desc="truncation")

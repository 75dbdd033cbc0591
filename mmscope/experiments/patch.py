"""Activation-patching sweep: which (layer, token group) carries the image information the answer needs?

Each correctly answered question runs twice in one batch: clean, and corrupted — the same question about the
image of another scene. For every layer ℓ and token group g, the clean residual stream at (ℓ, g) is patched
into the corrupted run, and we measure how much of the clean answer's probability comes back:

    restored = (p_patched − p_corrupted) / (p_clean − p_corrupted)

1 means the patched activation alone restores the clean answer; 0 means it carries nothing the corruption
removed. Examples where the corruption barely changes p (|p_clean − p_corrupted| < 0.05) are dropped from the
ratio, as the ratio is meaningless there; their raw probabilities stay in the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmscope.experiments.answers import clean_answer
from mmscope.experiments.common import example_of, resumable_loop, row_ids
from mmscope.experiments.runs import RunDir
from mmscope.interventions import ActivationPatch
from mmscope.model import Model

PATCH_GROUPS = ("image", "object", "question", "last")
MIN_EFFECT = 0.05


def corrupting_row(dataset, index: int) -> dict:
    """The next row with a different image (the corrupted run's image)."""
    for offset in range(1, len(dataset)):
        other = dataset[(index + offset) % len(dataset)]
        if other["image_id"] != dataset[index]["image_id"]:
            return other
    raise ValueError("patching needs at least two different images in the data")


def patch_rows(model: Model, dataset, index: int, row: dict, groups: Sequence[str], site: str,
               include_all: bool = False) -> list[dict] | None:
    clean = example_of(model, row)
    answer = clean_answer(model, clean, row["answer"])
    if not answer.correct and not include_all:
        return None
    other = corrupting_row(dataset, index)
    corrupted = model.prepare(other["image"].convert("RGB"), row["question"], boxes=clean.meta[0]["boxes"])
    pair = model.batch([clean, corrupted])
    base = model.next_token_probs(pair)[:, answer.first_token]
    p_clean, p_corrupted = base[0].item(), base[1].item()
    effect = p_clean - p_corrupted
    ids = row_ids(index, row)
    rows = []
    for group in [g for g in groups if g in pair.groups()]:
        for layer in range(model.n_layers):
            patched = model.next_token_probs(pair, [ActivationPatch(site, (layer,), group)])[1, answer.first_token]
            p_patched = patched.item()
            rows.append({
                **ids, "corrupting_image_id": str(other["image_id"]), "site": site, "group": group, "layer": layer,
                "p_clean": p_clean, "p_corrupted": p_corrupted, "p_patched": p_patched,
                "restored": (p_patched - p_corrupted) / effect if abs(effect) >= MIN_EFFECT else float("nan"),
            })
    return rows


def run_patch(model: Model, dataset, run: RunDir, groups: Sequence[str] = PATCH_GROUPS, site: str = "residual",
              include_all: bool = False) -> dict[str, int]:
    return resumable_loop(run, dataset,
                          lambda i, row: patch_rows(model, dataset, i, row, groups, site, include_all),
                          desc="patching")

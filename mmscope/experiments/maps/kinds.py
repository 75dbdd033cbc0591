"""The four kinds of map, each a value per region and panel: what is run for it and what is read.

`knockout` and `patch` sweep one intervention per region (`knockout_variants`, `patch_variants`, recorded by
`map_variants`) and score them as knockout and patch do (`mmscope.experiments.scores`); `lens` and `attention`
read the clean run (`image_lens`, `image_attention`). `map_rows` gives one question's rows, every kind's values
beside their region; `kind_values` reads each row's value from its kind's column (`VALUES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mmscope.errors import InputError, MMScopeError
from mmscope.experiments.attribution import knockout_estimates, patch_attribution, verify_estimates, weight_gradients
from mmscope.experiments.declarations import MapOptions
from mmscope.experiments.engine import Variant, run_variants
from mmscope.experiments.maps.regions import Region, example_regions, region_columns
from mmscope.experiments.options import OptionError
from mmscope.experiments.runner import Question, Sweep, Variants
from mmscope.experiments.scores import corrupted_example, knockout_scores, restored_share
from mmscope.interventions import CachedPatch, Knockout, knockout_window
from mmscope.layout import Example
from mmscope.model import Model

ESTIMATES = ("atp-knockout", "atp-patch")  # the kinds estimated to first order, some candidates verified
VERIFIED = {kind: f"{kind} verified" for kind in ESTIMATES}  # figures: each estimated kind's exact values
VALUES = {"knockout": "delta_pct", "patch": "restored", "lens": "prob", "attention": "attention",
          **{kind: "estimate" for kind in ESTIMATES}, **{shown: "exact" for shown in VERIFIED.values()}}  # per kind


def knockout_variants(regions: Sequence[Region], options: MapOptions, n_layers: int,
                      targets: Sequence[str] | None = None) -> tuple[Variant, ...]:
    """One knockout per centre × target (default: `options.targets`) × region: the target no longer reads the
    region's image tokens in the centre's window."""
    return tuple(Variant(("knockout", center, target, region.index),
                         (Knockout(region.positions, target, knockout_window(center, options.window, n_layers)),))
                 for center in options.centers for target in (options.targets if targets is None else targets)
                 for region in regions)


def held_targets(options: MapOptions, example: Example) -> list[str]:
    """The targets this question's example holds (`object_word` only where its question spells an object name)."""
    return [target for target in options.targets if target in example.layout]


def patch_variants(regions: Sequence[Region], options: MapOptions) -> tuple[Variant, ...]:
    """One clean → corrupted patch per layer × region: the clean run's site at the region's tokens."""
    return tuple(Variant(("patch", layer, options.site, region.index),
                         (CachedPatch(options.site, (layer,), region.positions),))
                 for layer in options.layers for region in regions)


def attention_weights_available(model: Model, example: Example, kind: str = "attention") -> None:
    """Refuse `--kind attention` (or `atp-knockout`) for a model whose self-attention gives no weights (sdpa
    attention)."""
    try:
        model.run(example, [], lambda ctx: ctx.attention_weights(0).shape)
    except MMScopeError as error:
        raise OptionError(f"--kind {kind} reads attention weights: {' '.join(str(error).split())}") from None


def map_variants(options: MapOptions, model: Model, dataset) -> Variants:
    """The interventions of the first question of `dataset` (config.yaml's record of what ran; every question
    builds its own, over the regions of its own image, in `map_rows`); refuses a family without patch
    rectangles, or without attention weights for `--kind attention`, before any question runs."""
    first = dataset[0]
    image = first["image"].convert("RGB")
    example = model.prepare(image, first["question"])  # regions need no boxes (and a family may refuse them)
    regions = example_regions(model, image, example, options.region)
    for kind in {"attention", "atp-knockout"} & set(options.kinds):
        attention_weights_available(model, example, kind)
    parameters = {"kinds": list(options.kinds), "region": options.region}
    parameters |= {name: getattr(options, name) for name in ("targets", "window", "centers", "layers", "site",
                                                             "lens_token", "head", "verify", "verify_random",
                                                             "metric")
                   if getattr(options, name) is not None}
    variants = knockout_variants(regions, options, model.n_layers) if "knockout" in options.kinds else ()
    variants += patch_variants(regions, options) if "patch" in options.kinds else ()
    return Variants(parameters, variants, named_by="--target")


def knockout_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per centre × target × region, the knockout's window and Δp%."""
    options, model, example = sweep.options, sweep.model, question.example
    targets = held_targets(options, example)
    if not targets:
        return []
    variants = knockout_variants(regions, options, model.n_layers, targets)
    clean, probs = run_variants(model, example, variants, engine=options.engine)
    token = question.answer.first_token
    p_clean = clean.probs[token].item()
    rows = []
    for variant, variant_probs in zip(variants, probs, strict=True):
        _, center, target, index = variant.key
        layers = knockout_window(center, options.window, model.n_layers)
        rows.append({"kind": "knockout", "target": target, "layer": center, "region": index,
                     "window": options.window, "center": center,
                     **knockout_scores(layers, p_clean, variant_probs[token].item())})
    return rows


def region_corruption(sweep: Sweep[MapOptions], question: Question) -> tuple[dict, Example]:
    """The corrupting row and the corrupted example of a region patch: the next other scene's image, resized to
    the clean one's size; refused where its image tokens sit elsewhere than the clean run's."""
    clean = question.example
    other, corrupted = corrupted_example(sweep.model, sweep.dataset, question, same_size=True)
    if corrupted.layout["image"] != clean.layout["image"] or corrupted.seq_len != clean.seq_len:
        raise InputError(f"question {question.row['question_id']}: the corrupted run's image tokens sit elsewhere "
                         "than the clean run's; region patching needs them at the same positions")
    return other, corrupted


def patch_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per layer × region, p(answer) patched and the share restored (target: the site patched)."""
    options, model, clean = sweep.options, sweep.model, question.example
    other, corrupted = region_corruption(sweep, question)
    variants = patch_variants(regions, options)
    run, probs = run_variants(model, corrupted, variants, source=clean, engine=options.engine)
    token = question.answer.first_token
    p_clean, p_corrupted = run.source.probs[token].item(), run.probs[token].item()
    rows = []
    for variant, patched in zip(variants, probs, strict=True):
        _, layer, site, index = variant.key
        p_patched = patched[token].item()
        rows.append({"kind": "patch", "target": site, "layer": layer, "region": index, "site": site,
                     "corrupting_image_id": str(other["image_id"]), "p_clean": p_clean, "p_corrupted": p_corrupted,
                     "p_patched": p_patched, "restored": restored_share(p_clean, p_corrupted, p_patched)})
    return rows


def atp_knockout_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per centre × target × region, the first-order estimate of the knockout's change of the metric (the sum
    of its window's single-layer estimates, `knockout_estimates`, from one forward and one backward pass), and
    the exact change where verified (the largest |estimates| and a random sample of the others)."""
    options, model, example = sweep.options, sweep.model, question.example
    token = question.answer.first_token
    targets = held_targets(options, example)
    if not targets:
        return []
    variants = knockout_variants(regions, options, model.n_layers, targets)
    windows = {center: knockout_window(center, options.window, model.n_layers) for center in options.centers}
    layers = sorted({layer for window in windows.values() for layer in window})
    gradients = weight_gradients(model, example, layers, token, options.metric)
    column = {region.index: i for i, region in enumerate(regions)}
    single = {target: knockout_estimates(example, gradients, target, [region.positions for region in regions])
              for target in targets}  # [len(layers), regions]
    row_of = {layer: i for i, layer in enumerate(layers)}
    estimates = torch.stack([single[target][[row_of[layer] for layer in windows[center]], column[index]].sum()
                             for _, center, target, index in (variant.key for variant in variants)])
    found = verify_estimates(model, example, variants.__getitem__, estimates, token, top=options.verify,
                             sampled=options.verify_random, seed=options.seed + question.index,
                             metric=options.metric, engine=options.engine)
    p_clean = found.p_example
    rows = []
    for variant, verified in zip(variants, found.columns, strict=True):
        _, center, target, index = variant.key
        rows.append({"kind": "atp-knockout", "target": target, "layer": center, "region": index,
                     "window": options.window, "center": center, "first_layer": windows[center][0],
                     "last_layer": windows[center][-1], "metric": options.metric, "p_clean": p_clean, **verified})
    return rows


def atp_patch_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per layer × region, the first-order estimate of patching the clean run's site at the region's tokens
    into the corrupted run (the sum of its tokens' estimates, `patch_attribution`, from one backward pass of the
    corrupted run), and the exact change of the metric where verified (target: the site patched)."""
    options, model, clean = sweep.options, sweep.model, question.example
    other, corrupted = region_corruption(sweep, question)
    token = question.answer.first_token
    cache = model.cache(clean, [options.site])
    grid = patch_attribution(model, corrupted, cache, [options.site], options.layers, token, options.metric)
    row_of = {layer: i for i, layer in enumerate(sorted(set(options.layers)))}
    columns = {region.index: torch.tensor(list(region.positions)) for region in regions}
    variants = patch_variants(regions, options)
    estimates = torch.stack([grid[options.site][row_of[layer], columns[index]].sum()
                             for _, layer, _, index in (variant.key for variant in variants)])
    found = verify_estimates(model, corrupted, variants.__getitem__, estimates, token, top=options.verify,
                             sampled=options.verify_random, seed=options.seed + question.index,
                             metric=options.metric, source=clean, engine=options.engine)
    p_clean, p_corrupted = found.p_source, found.p_example
    rows = []
    for variant, verified, p_patched in zip(variants, found.columns, found.p, strict=True):
        _, layer, site, index = variant.key
        rows.append({"kind": "atp-patch", "target": site, "layer": layer, "region": index, "site": site,
                     "corrupting_image_id": str(other["image_id"]), "metric": options.metric, "p_clean": p_clean,
                     "p_corrupted": p_corrupted, "p_patched": p_patched,
                     "restored": restored_share(p_clean, p_corrupted, p_patched), **verified})
    return rows


def lens_token(model: Model, question: Question, which: str) -> int | None:
    """The token the lens reads: the clean answer's first token, or the first token of the question's first
    object name, written as the model writes its answer (None where it names none)."""
    if which == "answer":
        return question.answer.first_token
    names = [name for name in question.row.get("object_names") or [] if name and name.strip()]
    if not names:
        return None
    space = model.writes_leading_space(question.example, [question.answer.first_token])
    return model.answer_tokens(question.example, names[0].strip(), space)[0][0]


def image_lens(model: Model, example: Example, layers: Sequence[int], token: int) -> torch.Tensor:
    """`[len(layers), n_image]`: p(`token`) of the normed logit lens on each image token's residual stream after
    each layer."""
    states = model.hidden_states(example)[:, 0]  # [L + 1, T, D]: the embeddings, then after each layer
    image = torch.tensor(example.layout["image"])
    return torch.stack([model.unembed(states[layer + 1, image], normed=True).softmax(-1)[:, token].cpu()
                        for layer in layers])


def lens_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per layer × region, the mean p(token) of the lens over the region's tokens (target: the token read)."""
    options, model, example = sweep.options, sweep.model, question.example
    token = lens_token(model, question, options.lens_token)
    if token is None:
        return []
    probs = image_lens(model, example, options.layers, token)
    columns = region_columns(example, regions)
    return [{"kind": "lens", "target": options.lens_token, "layer": layer, "region": region.index,
             "token_id": token, "prob": probs[i, columns[region.index]].mean().item()}
            for i, layer in enumerate(options.layers) for region in regions]


def image_attention(model: Model, example: Example, layers: Sequence[int], targets: Sequence[str],
                    head: int | None = None) -> dict[str, torch.Tensor]:
    """Per target, `[len(layers), n_image]`: the attention weight from the target's positions (their mean) to each
    image token, per layer, of one `head` (default: the mean over heads) — every target read from one forward."""
    image = torch.tensor(example.layout["image"])
    queries = {target: torch.tensor(example.layout[target]) for target in targets}
    heads = slice(None) if head is None else slice(head, head + 1)

    def readout(ctx) -> dict[str, torch.Tensor]:
        weights = [ctx.attention_weights(layer)[0, heads] for layer in layers]  # [H, T, T] each (H = 1 with head)
        return {target: torch.stack([w[:, rows.to(w.device)][..., image.to(w.device)].float().mean((0, 1)).cpu()
                                     for w in weights])
                for target, rows in queries.items()}

    return model.run(example, [], readout)


def attention_values(sweep: Sweep[MapOptions], question: Question, regions: Sequence[Region]) -> list[dict]:
    """Per target × layer × region, the attention from the target to the region's tokens (summed over them), of
    `--head` or the mean over heads (`head` -1)."""
    options, model, example = sweep.options, sweep.model, question.example
    columns = region_columns(example, regions)
    targets = held_targets(options, example)
    if not targets:
        return []
    weights = image_attention(model, example, options.layers, targets, options.head)
    head = -1 if options.head is None else options.head
    return [{"kind": "attention", "target": target, "layer": layer, "region": region.index, "head": head,
             "attention": weights[target][i, columns[region.index]].sum().item()}
            for target in targets for i, layer in enumerate(options.layers) for region in regions]


KIND_VALUES = {"knockout": knockout_values, "patch": patch_values, "lens": lens_values,
               "attention": attention_values, "atp-knockout": atp_knockout_values, "atp-patch": atp_patch_values}


def map_rows(sweep: Sweep[MapOptions], question: Question) -> list[dict]:
    """The rows of one question: per kind, its (panel × target × region) values, each with its region."""
    options, model, example = sweep.options, sweep.model, question.example
    regions = example_regions(model, question.row["image"], example, options.region)
    objects = set(example.layout.get("object", ()))
    by_index = {region.index: region for region in regions}
    rows = []
    for kind in options.kinds:
        for values in KIND_VALUES[kind](sweep, question, regions):
            region = by_index[values["region"]]
            x0, y0, x1, y1 = region.rectangle
            rows.append({
                "generated": question.answer.text, "correct": question.answer.correct,
                **values,
                "grid": region.grid, "grid_row": region.row, "grid_col": region.col,
                "x0": x0, "y0": y0, "x1": x1, "y1": y1, "positions": list(region.positions),
                "has_object": bool(objects), "on_object": bool(objects & set(region.positions)),
            })
    return rows


def kind_values(table: pd.DataFrame) -> pd.Series:
    """Each row's value: its kind's column (`VALUES`)."""
    values = pd.Series(np.nan, index=table.index, dtype=float)
    for kind, column in VALUES.items():
        chosen = table["kind"] == kind
        if chosen.any():
            values[chosen] = table.loc[chosen, column].astype(float)
    return values

"""Frozen per-layer features for probing: the residual stream after each decoder layer, pooled over a group.

Pooling choices follow the probing study (Tao et al., 2024): the last token, the mean over image tokens, or the
mean over the text (question) tokens. Features can also be read under interventions — e.g. after an attention
knockout — to ask how an edit changes what a layer linearly encodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import reduce
from tqdm.auto import tqdm

from mmscope.errors import InputError, known
from mmscope.interventions import Intervention
from mmscope.model import Model

POOLINGS = {"last": "last", "image": "image", "text": "question"}


def pooled(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean of `states [L, T, D]` over `positions` → `[L, D]`."""
    return reduce(states[:, positions], "layers n dim -> layers dim", "mean")


def layer_features(model: Model, images, texts: Sequence[str], pooling: str = "last", *,
                   interventions: Sequence[Intervention] = (), batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """Features `[N, n_layers + 1, D]` (embeddings, then after each layer) of each (image, text) pair."""
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; known: {known(POOLINGS)}")
    group = POOLINGS[pooling]
    features = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"features ({pooling})", disable=not progress):
        examples = [model.prepare(image.convert("RGB"), text)
                    for image, text in zip(images[start : start + batch_size], texts[start : start + batch_size],
                                           strict=True)]
        batch = model.batch(examples)
        states = model.hidden_states(batch, interventions)  # [L+1, B, T, D]
        for row in range(len(batch)):
            features.append(pooled(states[:, row], batch.positions(group, row)))
    return torch.stack(features).cpu()

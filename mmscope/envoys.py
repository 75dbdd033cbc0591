"""Where a `Context` finds a model's sites: the nnsight envoys of its parts (`Sites`), the checks of a site's
name, and the additive form of the attention mask a layer receives (`additive_mask`).

`Sites` finds each part once, through the adapter's attribute paths (`Adapter.layers`, `.attention`, `.mlp`,
`.vision_layers`, `.projector` …), and refuses a layer the model lacks — or, for a family without vision sites,
any part of the vision tower, naming the family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmscope.errors import InterventionError, known
from mmscope.models.adapter import attribute_path
from mmscope.sites import SITES, VISION_SITES

if TYPE_CHECKING:
    from mmscope.models.adapter import Adapter


class Sites:
    """The nnsight envoys of one model's parts, found once through its adapter's paths."""

    def __init__(self, envoy, adapter: Adapter) -> None:
        self.adapter = adapter
        self.layers = attribute_path(envoy, adapter.layers)
        self.lm_head = attribute_path(envoy, adapter.lm_head)
        self.decoder = attribute_path(envoy, adapter.layers.rsplit(".", 1)[0])  # the parent of the layers
        self.n_layers = len(self.layers)
        self.n_heads = adapter.text_config.num_attention_heads
        self.envoy = envoy

    def layer(self, layer: int):
        if not _whole(layer) or not 0 <= layer < self.n_layers:
            what = "out of range" if _whole(layer) else "is not a whole number"
            shown = layer if _whole(layer) else repr(layer)
            raise InterventionError(f"layer {shown} {what}; the model has layers 0..{self.n_layers - 1}")
        return self.layers[layer]

    def attention(self, layer: int):
        return attribute_path(self.layer(layer), self.adapter.attention)

    def mlp(self, layer: int):
        return attribute_path(self.layer(layer), self.adapter.mlp)

    def vision_layers(self, asked: str):
        """The vision tower's layers, or the family's refusal of `asked` where it has none."""
        if self.adapter.vision_layers is None:
            raise self.adapter.no_vision_sites(asked)
        return attribute_path(self.envoy, self.adapter.vision_layers)

    def vision_layer(self, layer: int, asked: str):
        layers = self.vision_layers(asked)
        if not _whole(layer) or not 0 <= layer < len(layers):
            what = "out of range" if _whole(layer) else "is not a whole number"
            shown = layer if _whole(layer) else repr(layer)
            raise InterventionError(f"{asked}: vision layer {shown} {what}; the vision tower has layers "
                                    f"0..{len(layers) - 1}")
        return layers[layer]

    def projector(self, asked: str):
        if self.adapter.projector is None:
            raise self.adapter.no_vision_sites(asked)
        return attribute_path(self.envoy, self.adapter.projector)


def check_site(site: str) -> str:
    """`site`, or an InterventionError when it is not one of `SITES`."""
    if site not in SITES:
        raise InterventionError(f"unknown site {site!r}; known: {known(SITES)}")
    return site


def check_vision_site(site: str, layers: tuple[int, ...]) -> str:
    """`site`, or an InterventionError when it is not one of `VISION_SITES` or is the projector at a layer
    other than 0."""
    if site not in VISION_SITES:
        raise InterventionError(f"unknown vision site {site!r}; known: {known(VISION_SITES)}")
    if site == "projector" and set(layers) != {0}:
        raise InterventionError(f"the projector is one site, layer 0; got layers {list(layers)}")
    return site


def additive_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The mask a self-attention receives, as an additive `[B, 1 or H, Q, K]` tensor in `hidden`'s dtype.

    `None` (an SDPA model that relies on `is_causal`) becomes the causal mask for `Q = K = hidden.shape[1]`;
    a boolean mask (True = attend) becomes 0 / minimum; a padding mask broadcast over queries (`Q = 1` for a
    longer input, as GPT-2-style remote code passes while applying causality itself) is expanded to all queries.
    """
    dtype = hidden.dtype
    minimum = torch.finfo(dtype).min
    if mask is None:
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None].expand(hidden.shape[0], 1, length, length)
    if mask.shape[-2] == 1 and hidden.shape[1] > 1:
        mask = mask.expand(*mask.shape[:-2], hidden.shape[1], mask.shape[-1])
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(minimum, dtype=dtype, device=mask.device))
    return mask.to(dtype)


def output_tensor(value):
    """A module's output as a site reads it: the first element where the module returns a tuple."""
    return value[0] if isinstance(value, tuple) else value


def _whole(value) -> bool:
    """Whether `value` is an int (a NumPy or torch integer too), not a bool: a layer index."""
    return not isinstance(value, bool) and hasattr(value, "__index__")

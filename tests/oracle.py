"""Independent computations with plain PyTorch and transformers — no nnsight, no mmscope."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText

_models = {}


def plain_model(folder, attn_implementation="eager"):
    key = (str(folder), attn_implementation)
    if key not in _models:
        _models[key] = AutoModelForImageTextToText.from_pretrained(
            folder, attn_implementation=attn_implementation, dtype=torch.float32
        ).eval()
    return _models[key]


def plain_inputs(inputs):
    """The model's inputs plus position ids that ignore left padding."""
    inputs = dict(inputs)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


def forward_with_hooks(model, inputs, pre_hooks=(), hooks=()):
    """Logits `[B, T, V]` with forward pre-hooks (with kwargs) and forward hooks registered for the pass."""
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in pre_hooks]
    handles += [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return model(**plain_inputs(inputs)).logits
    finally:
        for handle in handles:
            handle.remove()


def knockout_logits(model, inputs, pairs_per_row, layers, heads=None):
    """Logits with attention from targets to sources blocked in `layers` by editing each attention's mask.

    `pairs_per_row[b]` is a list of (target, source) position pairs of row b.
    """
    n_heads = model.config.text_config.num_attention_heads

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        if heads is not None:
            mask = mask.expand(mask.shape[0], n_heads, *mask.shape[2:]).clone()
        minimum = torch.finfo(mask.dtype).min
        for row, pairs in enumerate(pairs_per_row):
            for target, source in pairs:
                if target == source:
                    continue
                for head in heads if heads is not None else range(mask.shape[1]):
                    mask[row, head, target, source] = minimum
        kwargs["attention_mask"] = mask
        return args, kwargs

    layer_list = model.model.language_model.layers
    return forward_with_hooks(model, inputs, pre_hooks=[(layer_list[i].self_attn, edit) for i in layers])

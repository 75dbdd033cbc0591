"""`mmscope.context`: every site a `Context` reads is the tensor a plain PyTorch hook sees at the same module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from oracle import (
    LLAVA,
    forward_with_hooks,
    knockout_logits,
    pairs,
    plain_inputs,
    plain_model,
    scaled_logits,
)

from mmscope.experiments.rows import Restriction, RowContext
from mmscope.interventions import Context, Intervention
from mmscope.interventions.masks import block, pair_mask

TOLERANCE = 1e-6


def recorded(model, inputs, modules):
    """Outputs (first element of a tuple) and the attention_mask keyword of each module, from plain hooks."""
    seen = {}

    def output_of(name):
        def hook(module, args, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    def mask_of(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["attention_mask"].clone()
        return hook

    pre = [(module, mask_of(name)) for name, module in modules.items() if name.startswith("mask")]
    post = [(module, output_of(name)) for name, module in modules.items() if not name.startswith("mask")]
    logits = forward_with_hooks(LLAVA, model, inputs, pre_hooks=pre, hooks=post)
    return seen, logits


def test_each_site_is_the_tensor_a_plain_hook_sees(tiny, tiny_folder, examples):
    batch = examples[2]
    model = plain_model(tiny_folder)
    layers = model.model.language_model.layers
    seen, logits = recorded(model, batch.inputs, {
        "residual": layers[1],
        "attention": layers[2].self_attn, "mlp": layers[2].mlp, "mask": layers[3].self_attn,
    })
    with torch.no_grad():
        embeds = model(**plain_inputs(LLAVA, batch.inputs), output_hidden_states=True).hidden_states[0]
    with tiny.trace(batch) as ctx:
        embeddings = ctx.embeddings().save()
        residual = ctx.residual(1).save()
        attention = ctx.attention_output(2).save()
        mlp = ctx.site("mlp", 2).save()
        mask = ctx.attention_mask(3).save()
        out = ctx.logits().save()
    assert torch.allclose(embeddings, embeds, atol=TOLERANCE)  # image features in place of the image tokens
    assert torch.allclose(residual, seen["residual"], atol=TOLERANCE)
    assert torch.allclose(attention, seen["attention"], atol=TOLERANCE)
    assert torch.allclose(mlp, seen["mlp"], atol=TOLERANCE)
    assert torch.equal(mask, seen["mask"])
    assert torch.allclose(out, logits, atol=1e-5)


def test_setting_a_layer_mask_inline_is_the_knockout_of_an_independent_pre_hook(tiny, tiny_folder, examples):
    batch = examples[2]
    blocked = pair_mask(batch, "last", "image")
    with tiny.trace(batch) as ctx:
        for layer in (1, 2):
            ctx.set_attention_mask(layer, block(ctx.attention_mask(layer), blocked, None, ctx.n_heads))
        probs = ctx.logits()[:, -1].softmax(-1).save()
    blocked_pairs = pairs(batch, "last", "image")
    expected = knockout_logits(LLAVA, plain_model(tiny_folder), batch.inputs, blocked_pairs, (1, 2))[:, -1].softmax(-1)
    assert torch.allclose(probs, expected, atol=TOLERANCE)


@dataclass(frozen=True)
class ScaleImageAfter(Intervention):
    """Multiply the residual stream at image positions after `layer` by `factor`."""

    factor: float
    layer: int

    def apply(self, ctx: Context) -> None:
        ctx.residual(self.layer)[ctx.positions("image")] *= self.factor


def test_a_context_restricted_to_one_row_edits_that_row_only(tiny, tiny_folder, examples):
    first, second, batch = examples
    masks: dict = {}
    row = RowContext(tiny.sites, batch.select([1]), Restriction(slice(1, 2), 0, masks))
    whole = tiny.context(batch)
    probs = tiny.run_inputs(tiny.model_inputs(batch), [(ScaleImageAfter(0.5, 1), row)],
                            lambda: whole.logits()[:, -1].float().softmax(-1))
    expected = scaled_logits(LLAVA, plain_model(tiny_folder), batch.inputs, 1, [[], batch.layouts[1]["image"]], 0.5)
    assert torch.allclose(probs, expected[:, -1].softmax(-1), atol=TOLERANCE)
    assert torch.allclose(probs[0], tiny.next_token_probs(batch)[0], atol=TOLERANCE)

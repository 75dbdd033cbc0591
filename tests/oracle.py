"""Independent computations with plain PyTorch and transformers — no nnsight, no mmscope.

A `Family` says where a plain Hugging Face model of one family keeps its parts; every oracle takes one, e.g.
`LLAVA` for the tiny LLaVA checkpoints of conftest (tests/families.py describes the other families).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText


# --- how a test reaches a family's parts on the plain HF model ---------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How a test reaches a family's parts on the plain HF model (paths are attribute paths from the model)."""

    name: str
    decoder: str  # the language decoder: it holds `layers` and the final norm
    final_norm: str = "norm"  # from the decoder
    lm_head: str = "lm_head"
    attention: str = "self_attn"  # from a decoder layer
    mlp: str = "mlp"  # from a decoder layer
    first_position: int | None = 0  # position id of the first real token; None: the model computes them (3D rope)
    count_includes_markers: bool = False  # the placeholder expands into tile markers too: count the processor's output

    def layers(self, model):
        return operator.attrgetter(f"{self.decoder}.layers")(model)

    def readout(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a last-layer output, as the model's forward computes them: final norm, then lm_head.

        No family here does more. Gemma 3's conditional-generation forward has no logit soft-cap; PaliGemma's
        would soft-cap by its text config's `final_logit_softcapping`, which Gemma (v1) configs do not have.
        """
        norm = operator.attrgetter(f"{self.decoder}.{self.final_norm}")(model)
        return operator.attrgetter(self.lm_head)(model)(norm(hidden))


LLAVA = Family("llava", decoder="model.language_model")

_plain: dict = {}


def plain_model(folder, attn_implementation="eager"):
    key = (str(folder), attn_implementation)
    if key not in _plain:
        _plain[key] = AutoModelForImageTextToText.from_pretrained(
            folder, attn_implementation=attn_implementation, dtype=torch.float32
        ).eval()
    return _plain[key]


# --- the oracles ----------------------------------------------------------------------------------------------------
def plain_inputs(family: Family, inputs: dict) -> dict:
    """The model's inputs, with padding-aware position ids unless the family's model computes its own."""
    inputs = dict(inputs)
    if family.first_position is not None:
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1 + family.first_position).clamp(min=0)
    return inputs


def forward_with_hooks(family: Family, model, inputs, pre_hooks=(), hooks=()):
    """Logits `[B, T, V]` with forward pre-hooks (with kwargs) and forward hooks registered for one pass."""
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in pre_hooks]
    handles += [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return model(**plain_inputs(family, inputs)).logits
    finally:
        for handle in handles:
            handle.remove()


def pairs(example, target, source):
    """Per row, every (target, source) position pair of two groups."""
    return [
        list(itertools.product(example.positions(target, row).tolist(), example.positions(source, row).tolist()))
        for row in range(len(example))
    ]


def knockout_edit(model, pairs_per_row, heads=None):
    """A forward pre-hook for a decoder attention module that blocks attention from targets to sources (all heads,
    or `heads`) on top of the model's own mask; `pairs_per_row[b]` lists the (target, source) pairs of row b."""

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dtype.is_floating_point, "the oracle runs eager attention"
        n_heads = model.config.get_text_config().num_attention_heads
        mask = mask.clone() if heads is None else mask.expand(mask.shape[0], n_heads, *mask.shape[2:]).clone()
        minimum = torch.finfo(mask.dtype).min
        for row, row_pairs in enumerate(pairs_per_row):
            for target, source in row_pairs:
                if target != source:
                    mask[row, list(heads) if heads is not None else slice(None), target, source] = minimum
        kwargs["attention_mask"] = mask
        return args, kwargs

    return edit


def knockout_logits(family: Family, model, inputs, pairs_per_row, layers, heads=None):
    """Logits with attention from targets to sources blocked in `layers` (all heads, or `heads`), on top of the
    model's own mask. `pairs_per_row[b]` lists the (target, source) position pairs of row b."""
    edit = knockout_edit(model, pairs_per_row, heads)
    layer_list = family.layers(model)
    hooks = [(getattr(layer_list[i], family.attention), edit) for i in layers]
    return forward_with_hooks(family, model, inputs, pre_hooks=hooks)


def _tensor(output) -> torch.Tensor:
    """A module's output activation: the output itself, or the first element of a tuple (attention, weights)."""
    return output[0] if isinstance(output, tuple) else output


def layer_outputs(family: Family, model, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits `[B, T, V]` and every decoder layer's output `[B, T, D]`, from one plain forward.

    The outputs are the layers' own: what a model adds between layers (Qwen3-VL's deepstack visual features, at
    image positions after its first layers) is not in them."""
    outputs = []

    def read(module, args, output):
        outputs.append(_tensor(output))

    logits = forward_with_hooks(family, model, inputs, hooks=[(layer, read) for layer in family.layers(model)])
    return logits, outputs


def site_module(family: Family, model, site: str, layer: int):
    """The module whose output is `site` ("residual", "attention", "mlp") of decoder layer `layer`."""
    module = family.layers(model)[layer]
    return module if site == "residual" else getattr(module, {"attention": family.attention, "mlp": family.mlp}[site])


def patched_logits(family: Family, model, inputs, site: str, layers, positions, source_row=0, target_row=1):
    """Logits with `site`'s output at `positions` copied from `source_row` into `target_row` in each of `layers`."""

    def copy(module, args, output):
        value = _tensor(output).clone()
        value[target_row, positions] = value[source_row, positions]
        return (value, *output[1:]) if isinstance(output, tuple) else value

    hooks = [(site_module(family, model, site, layer), copy) for layer in layers]
    return forward_with_hooks(family, model, inputs, hooks=hooks)


def scaled_logits(family: Family, model, inputs, layer: int, positions_per_row, factor: float):
    """Logits with the residual stream after decoder `layer` multiplied by `factor` at `positions_per_row[b]`
    of each row b."""

    def scale(module, args, output):
        value = _tensor(output).clone()
        for row, positions in enumerate(positions_per_row):
            value[row, positions] *= factor
        return (value, *output[1:]) if isinstance(output, tuple) else value

    return forward_with_hooks(family, model, inputs, hooks=[(family.layers(model)[layer], scale)])


PLACES = ("top-left", "bottom-right", "centre")


def placed_box(where: str, width: int, height: int, corner=(12, 9), centre=(14, 12)) -> tuple[float, ...]:
    """An `(x, y, w, h)` box of size `corner` in the top-left or bottom-right corner of a `width` x `height` image,
    or of size `centre` in its middle — the placements the box-to-patch tests try."""
    if where == "centre":
        return (width / 2 - centre[0] / 2, height / 2 - centre[1] / 2, *centre)
    return {"top-left": (0, 0, *corner), "bottom-right": (width - corner[0], height - corner[1], *corner)}[where]


def pixel_change(image_processor, image: Image.Image, box) -> torch.Tensor:
    """`|pixel_values(white box on black) - pixel_values(black)|` as the real image processor computes them, in
    its own output shape: where a box `(x, y, w, h)` of an `image`-sized picture lands after pad/resize/crop."""
    blank = Image.new("RGB", image.size, (0, 0, 0))
    drawn = blank.copy()
    x, y, w, h = box
    drawn.paste((255, 255, 255), (int(x), int(y), int(x + w), int(y + h)))
    before = image_processor(blank, return_tensors="pt")["pixel_values"]
    return (image_processor(drawn, return_tensors="pt")["pixel_values"] - before).abs()


# --- the study's protocol, as its authors' loop runs it ------------------------------------------------------------
def study_window(center: int, k: int, n_layers: int) -> list[int]:
    """The study's window of k layers around `center`, cut at the model's ends (written out independently)."""
    first = center - k // 2
    return [layer for layer in range(first, first + k) if 0 <= layer < n_layers]


def study_knockout(family: Family, model, inputs: dict, groups: dict, flows, k: int) -> dict:
    """One question through the study's loop: the scored token is the first id HF `generate` writes (greedy);
    p of it at the last position, clean and with each flow blocked in the window around every centre layer.

    `groups` maps a group name to its positions in row 0; a flow is `source->target`, blocking every target →
    source edge (the target's edge to itself too when source and target are the same group). Returns the token id
    and, per (flow, centre), (p_clean, Δp%)."""
    plain = {key: value for key, value in inputs.items() if key != "position_ids"}
    with torch.no_grad():
        generated = model.generate(**plain, max_new_tokens=1, do_sample=False,
                                   pad_token_id=model.config.get_text_config().pad_token_id)
    token = int(generated[0, inputs["input_ids"].shape[1]])
    clean = forward_with_hooks(family, model, inputs)[0, -1].float().softmax(-1)[token].item()
    n_layers = len(family.layers(model))
    results = {}
    for flow in flows:
        source, target = flow.split("->")
        edges = [(t, s) for t in groups[target] for s in groups[source] if t != s or source == target]

        def edit(module, args, kwargs, edges=edges):
            mask = kwargs["attention_mask"].clone()
            for t, s in edges:
                mask[0, :, t, s] = torch.finfo(mask.dtype).min
            kwargs["attention_mask"] = mask
            return args, kwargs

        for center in range(n_layers):
            hooks = [(getattr(family.layers(model)[i], family.attention), edit)
                     for i in study_window(center, k, n_layers)]
            knocked = forward_with_hooks(family, model, inputs, pre_hooks=hooks)[0, -1].float().softmax(-1)[token]
            results[flow, center] = (clean, (knocked.item() - clean) / clean * 100)
    return {"token": token, "values": results}

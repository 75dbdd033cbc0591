"""Sites inside the vision tower, against forward hooks on the plain HF model (no nnsight, no mmscope).

The oracle reaches the vision tower's modules by its own paths below and edits them in place from hooks: a
forward hook on a vision layer (or its attention / MLP, or the projector) for reads, scaling and patching, a
forward pre-hook on a vision attention editing the `attention_mask` keyword for knockout. Edits are in place
(as mmscope's are) because the tower's hidden states are also recorded by transformers' own output hooks.
"""

from __future__ import annotations

import operator
import sys

import pytest
import torch
from conftest import scene
from families import QUESTIONS, family_params, load_family
from oracle import LLAVA, forward_with_hooks, knockout_edit, pairs, plain_model
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import mmscope
from mmscope.errors import InterventionError, UnsupportedModelError
from mmscope.experiments.engine import Variant, run_variants
from mmscope.interventions import Intervention, Knockout, VisionCachedPatch, VisionKnockout, VisionScale

# the oracle's own paths: (vision layers, attention, MLP on one layer, projector)
TOWERS = {
    "clip": ("model.vision_tower.encoder.layers", "self_attn", "mlp", "model.multi_modal_projector"),
    "qwen": ("model.visual.blocks", "attn", "mlp", "model.visual.merger"),
}
VISION_FAMILIES = {"llava": "clip", "llava_next": "clip", "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen"}
CLIP = ["llava", "llava_next"]
WITHOUT_VISION = ["gemma3", "paligemma", "idefics3", "kosmos2", "emu3"]


class Case:
    """A family's mmscope model, its plain HF twin, how the oracle reaches it, and a two-row batch."""

    def __init__(self, name, model, folder, family, batch) -> None:
        self.name, self.model, self.family, self.batch = name, model, family, batch
        self.plain = plain_model(folder)
        self.tower = TOWERS[VISION_FAMILIES[name]]

    def layer(self, layer: int):
        return operator.attrgetter(self.tower[0])(self.plain)[layer]

    def module(self, site: str, layer: int = 0):
        if site == "projector":
            return operator.attrgetter(self.tower[3])(self.plain)
        module = self.layer(layer)
        if site == "vision_residual":
            return module
        return getattr(module, self.tower[1] if site == "vision_attention" else self.tower[2])

    def hooked(self, pre_hooks=(), hooks=()) -> torch.Tensor:
        return forward_with_hooks(self.family, self.plain, self.batch.inputs, pre_hooks, hooks)

    def logits(self, interventions, source=None) -> torch.Tensor:
        return self.model.run(self.batch, interventions, readout=lambda ctx: ctx.logits().float(), source=source)


@pytest.fixture(scope="session", params=list(VISION_FAMILIES))
def case(request, tmp_path_factory, tiny_folder, tiny):
    return make_case(request.param, tmp_path_factory, tiny_folder, tiny)


@pytest.fixture(scope="session", params=CLIP)
def clip_case(request, tmp_path_factory, tiny_folder, tiny):
    return make_case(request.param, tmp_path_factory, tiny_folder, tiny)


_cases: dict[str, Case] = {}


def make_case(name, tmp_path_factory, tiny_folder, tiny) -> Case:
    if name not in _cases:
        if name == "llava":
            first = tiny.prepare(scene(seed=1), QUESTIONS[0])
            second = tiny.prepare(scene(48, 36, seed=2), QUESTIONS[1])
            _cases[name] = Case(name, tiny, tiny_folder, LLAVA, tiny.batch([first, second]))
        else:
            loaded = load_family(name, tmp_path_factory)
            _cases[name] = Case(name, loaded.model, loaded.folder, loaded.family, loaded.examples[2])
    return _cases[name]


def tensor(output):
    return output[0] if isinstance(output, tuple) else output


def rows(case: Case, tokens: tuple[int, ...], inputs: dict | None = None):
    """The oracle's index of `tokens` of every image in a vision site (CLIP: [images, N, D]; Qwen: flattened,
    images of t*h*w patches one after another) of the batch's inputs, or of `inputs`."""
    if VISION_FAMILIES[case.name] == "clip":
        return slice(None), list(tokens)
    lengths = (inputs or case.batch.inputs)["image_grid_thw"].prod(-1)
    starts = (lengths.cumsum(0) - lengths).tolist()
    return [start + token for start in starts for token in tokens]


def test_vision_sites_read_what_hooks_capture(case):
    n = case.model.run(case.batch, readout=lambda ctx: ctx.n_vision_layers)
    assert n == len(operator.attrgetter(case.tower[0])(case.plain))
    sites = [(site, layer) for layer in range(n) for site in ("vision_attention", "vision_mlp", "vision_residual")]
    sites.append(("projector", 0))

    def readout(ctx):
        return [ctx.vision_site(*pair).clone() for pair in sites]

    read = case.model.run(case.batch, readout=readout)
    captured = {}

    def capture(pair):
        return lambda module, args, output: captured.__setitem__(pair, tensor(output).clone())

    case.hooked(hooks=[(case.module(*pair), capture(pair)) for pair in sites])
    for pair, value in zip(sites, read, strict=True):
        assert value.shape == captured[pair].shape, pair
        torch.testing.assert_close(value, captured[pair], atol=1e-6, rtol=0)
    readers = case.model.run(case.batch, readout=lambda ctx: (
        ctx.vision_attention_output(0).clone(), ctx.vision_mlp_output(0).clone(), ctx.vision_residual(0).clone(),
        ctx.projector_output().clone()))
    for value, pair in zip(readers, [*sites[:3], sites[-1]], strict=True):
        torch.testing.assert_close(value, captured[pair], atol=0, rtol=0)
    residual = captured["vision_residual", 0]
    if VISION_FAMILIES[case.name] == "clip":  # [tiles, CLS + g*g patches, D_v]
        vision = case.plain.config.vision_config
        n_tiles = len(case.batch.inputs["pixel_values"])  # LLaVA: one per image
        if case.name == "llava_next":  # each image's base view and high-resolution tiles
            n_tiles = sum(image_size_to_num_patches(size, case.plain.config.image_grid_pinpoints, vision.image_size)
                          for size in case.batch.inputs["image_sizes"].tolist())
            assert n_tiles > len(case.batch.inputs["pixel_values"])
        assert residual.shape[:2] == (n_tiles, (vision.image_size // vision.patch_size) ** 2 + 1)
    else:  # [sum over images of t*h*w patches, D_v]
        assert residual.shape[0] == int(case.batch.inputs["image_grid_thw"].prod(-1).sum())
    alone = case.model.prepare(scene(40, 30, seed=1), QUESTIONS[0])
    cache = case.model.cache(alone, sites=["vision_residual", "projector"], layers=[], vision_layers=[n - 1])
    assert set(cache.activations) == {("vision_residual", n - 1), ("projector", 0)}
    captured.clear()
    forward_with_hooks(case.family, case.plain, alone.inputs, hooks=[
        (case.module("vision_residual", n - 1), capture(("vision_residual", n - 1))),
        (case.module("projector"), capture(("projector", 0)))])
    for pair, value in captured.items():
        torch.testing.assert_close(cache.site(*pair), value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("site", "factor"),
                         [("vision_residual", 0.0), ("vision_attention", 2.5), ("vision_mlp", -1.0)])
def test_scaling_a_vision_site_matches_the_hook(case, site, factor):
    tokens = (0, 2, 5)

    def scale(module, args, output):
        tensor(output)[rows(case, tokens)] *= factor

    expected = case.hooked(hooks=[(case.module(site, 0), scale)])
    got = case.logits([VisionScale(site, 0, tokens, factor)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - case.logits([])).abs().max() > 1e-4  # the edit reaches the logits


def test_editing_the_projector_output_inline_matches_the_hook(case):
    """The image features entering the decoder: features 1 and 3 of every image (CLIP: `[images, g*g, D]`) or
    rows 1 and 3 of Qwen's flattened merger output."""
    index = (slice(None), [1, 3]) if VISION_FAMILIES[case.name] == "clip" else [1, 3]

    def scale(module, args, output):
        tensor(output)[index] *= 3.0

    expected = case.hooked(hooks=[(case.module("projector"), scale)])
    with case.model.trace(case.batch) as ctx:
        ctx.projector_output()[index] *= 3.0
        logits = ctx.logits().float().save()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits - case.logits([])).abs().max() > 1e-4


def knockout_hook(blocked):
    """A pre-hook on a vision attention that blocks the (query, key) pairs `blocked` in every image on top of its
    mask."""

    def edit(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        n = hidden.shape[1]
        mask = hidden.new_zeros(hidden.shape[0], 1, n, n) if mask is None else mask.clone()
        for query, key in blocked:
            if query != key:
                mask[:, :, query, key] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    return edit


@pytest.mark.parametrize(("sources", "targets"), [((1, 2, 3, 4, 6), (2, 5, 7, 8)), ("patches", "cls"),
                                                  ("cls", "patches")])
def test_vision_knockout_matches_the_mask_hook(clip_case, sources, targets):
    case = clip_case
    vision = case.plain.config.vision_config
    length = (vision.image_size // vision.patch_size) ** 2 + 1  # CLS, then the patches
    named = {"cls": [0], "patches": list(range(1, length))}
    blocked = [(q, k) for q in named.get(targets, targets) for k in named.get(sources, sources)]
    captured = {}

    def capture(module, args, output):
        captured["residual"] = tensor(output).clone()

    expected = case.hooked(pre_hooks=[(case.module("vision_attention", 0), knockout_hook(blocked))],
                           hooks=[(case.module("vision_residual", 0), capture)])
    knockout = VisionKnockout(sources, targets, layers=[0])

    def readout(ctx):
        return ctx.vision_residual(0).clone(), ctx.logits().float()

    residual, logits = case.model.run(case.batch, [knockout], readout)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(residual, captured["residual"], atol=1e-6, rtol=0)
    clean = case.model.run(case.batch, readout=lambda ctx: ctx.vision_residual(0).clone())
    assert (residual - clean).abs().max() > 1e-3  # the targets read less (a CLS target reaches no logit here)


def test_vision_knockout_under_sdpa_matches_the_eager_mask_hook(tiny_sdpa, tiny_folder):
    """SDPA takes the same additive mask: the knockout there equals the eager model's hooked forward."""
    example = tiny_sdpa.prepare(scene(seed=5), QUESTIONS[0])
    blocked = [(q, k) for q in range(1, 17) for k in (1, 2, 3)]
    plain = plain_model(tiny_folder)
    attention = operator.attrgetter(TOWERS["clip"][0])(plain)[0].self_attn
    expected = forward_with_hooks(LLAVA, plain, example.inputs, pre_hooks=[(attention, knockout_hook(blocked))])
    got = tiny_sdpa.run(example, [VisionKnockout((1, 2, 3), "patches", 0)], readout=lambda ctx: ctx.logits().float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vision_tokens_index_each_site_in_its_own_layout(case):
    """CLIP's vision layers hold CLS at 0, its projector only the patches; Qwen's have no CLS at all."""
    if VISION_FAMILIES[case.name] == "clip":
        cls = case.model.run(case.batch, readout=lambda ctx: ctx.vision_residual(0)[ctx.vision_tokens("cls")].clone())
        direct = case.model.run(case.batch, readout=lambda ctx: ctx.vision_residual(0)[:, [0]].clone())
        torch.testing.assert_close(cls, direct, atol=0, rtol=0)
        with pytest.raises(InterventionError, match="the projector's features have no CLS token"):
            case.model.run(case.batch, [VisionScale("projector", 0, "cls")])
    else:
        with pytest.raises(InterventionError, match="have no CLS token; known: patches or positions"):
            case.model.run(case.batch, [VisionScale("vision_residual", 0, "cls")])


def test_vision_and_decoder_interventions_compose_in_one_forward(clip_case):
    case = clip_case
    decoder_edit = knockout_edit(case.plain, pairs(case.batch, "last", "image"))

    def scale(module, args, output):
        tensor(output)[:, [1, 4]] *= 0.0

    decoder_attention = case.family.layers(case.plain)[1].self_attn
    expected = case.hooked(pre_hooks=[(decoder_attention, decoder_edit)],
                           hooks=[(case.module("vision_residual"), scale)])
    # the decoder edit first in the list: each intervention runs in its own forward order
    got = case.logits([Knockout("image", "last", layers=[1]), VisionScale("vision_residual", 0, (1, 4))])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vision_cached_patch_matches_the_hook(case):
    """Clean → corrupted: the first image's vision residual at some tokens, written into the second image's run
    (the same image size, so the tower sees the same shapes)."""
    model = case.model
    size = (40, 30)
    clean = model.prepare(scene(*size, seed=7), QUESTIONS[0])
    corrupted = model.prepare(scene(*size, seed=8), QUESTIONS[0])
    tokens = (1, 2, 3)
    cache = model.cache(clean, sites=["vision_residual", "projector"], layers=[], vision_layers=[0])
    captured = {}

    def capture(module, args, output):
        captured["value"] = tensor(output).clone()

    forward_with_hooks(case.family, case.plain, clean.inputs, hooks=[(case.module("vision_residual", 0), capture)])
    index = rows(case, tokens, clean.inputs)

    def patch(module, args, output):
        tensor(output)[index] = captured["value"][index]

    expected = forward_with_hooks(case.family, case.plain, corrupted.inputs,
                                  hooks=[(case.module("vision_residual", 0), patch)])
    patched = VisionCachedPatch("vision_residual", 0, tokens)
    got = model.run(corrupted, [patched], readout=lambda ctx: ctx.logits().float(), source=cache)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if case.name == "qwen3_vl":
        return  # its deepstack features carry the image into the decoder besides the merger's output
    whole = VisionCachedPatch("projector", 0, "patches")  # every image feature from the clean run
    clean_logits = model.run(clean, readout=lambda ctx: ctx.logits().float())
    torch.testing.assert_close(model.run(corrupted, [whole], readout=lambda ctx: ctx.logits().float(),
                                         source=cache), clean_logits, atol=1e-5, rtol=0)


def test_sweep_engine_gives_vision_variants_a_full_forward(clip_case):
    """A vision edit changes the image features: the prefix engine, which caches the clean prefix, must agree
    with one full forward per variant."""
    model = clip_case.model
    example = model.prepare(scene(seed=3), QUESTIONS[0])
    source = model.prepare(scene(seed=4), QUESTIONS[0])
    variants = [
        Variant(("scale",), (VisionScale("vision_residual", 0, "patches", 0.5),)),
        Variant(("knockout",), (VisionKnockout("patches", "patches", 0),)),
        Variant(("both",), (VisionScale("vision_mlp", 0, (1, 2), 0.0), Knockout("question", "last", [2, 3]))),
        Variant(("patch",), (VisionCachedPatch("vision_residual", 0, "patches"),)),
        Variant(("decoder",), (Knockout("image", "last", [2, 3]),)),
    ]
    _, prefix = run_variants(model, example, variants, source=source)
    _, naive = run_variants(model, example, variants, source=source, engine="naive")
    torch.testing.assert_close(prefix, naive, atol=1e-6, rtol=0)
    cache = model.cache(source, sites=["vision_residual"], layers=[], vision_layers=[0])
    for row, variant in enumerate(variants):
        expected = model.next_token_probs(example, variant.interventions, source=cache)
        torch.testing.assert_close(prefix[row], expected, atol=1e-6, rtol=0)
    assert all(intervention.first_layer() == 0 and intervention.affected_from(example) == 0
               for variant in variants[:4] for intervention in variant.interventions[:1])


def test_vision_interventions_round_trip_through_dicts():
    for intervention in (VisionKnockout("patches", "cls", range(2)), VisionKnockout((1, 2), (3,), [0], keep_self=False),
                         VisionScale("vision_mlp", [0, 1], (0, 4), 2.0), VisionCachedPatch("projector", 0)):
        data = intervention.to_dict()
        assert Intervention.from_dict(data) == intervention
        assert intervention.groups() == frozenset()


def test_bad_vision_fields_are_refused(clip_case):
    with pytest.raises(InterventionError, match="unknown vision site 'vision'; known: vision_residual"):
        VisionScale("vision", 0)
    with pytest.raises(InterventionError, match="projector is one site, layer 0"):
        VisionScale("projector", 1)
    with pytest.raises(InterventionError, match="vision layer 7 out of range; the vision tower has layers 0..1"):
        clip_case.logits([VisionScale("vision_residual", 7)])
    with pytest.raises(InterventionError, match=r"vision tokens \[99\] out of range"):
        clip_case.logits([VisionKnockout((99,), "cls", 0)])


QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def qwen_chunk_knockout(attention, blocked: torch.Tensor):
    """The oracle for Qwen-VL: the tower's own forward, with the additive mask of `blocked` (`[S, S]` over the
    flattened patches) handed to the per-block eager attention call that transformers makes with
    attention_mask=None — each call's block of `blocked`, found by counting the rows of the calls before it (the
    blocks of `cu_seqlens`, in order). A pre-hook on `attention` restarts the count; other layers are untouched.
    Returns the (pre-hook, patched attention function) pair."""
    modeling = sys.modules[type(attention).__module__]
    original = modeling.eager_attention_forward
    state = {"offset": 0}

    def restart(module, args, kwargs):
        state["offset"] = 0

    def attend(module, query, key, value, attention_mask, **kwargs):
        if module is attention:
            assert attention_mask is None  # what the tower passes: the block alone is the mask
            n, start = query.shape[2], state["offset"]
            state["offset"] += n
            edges = blocked[start : start + n, start : start + n]
            attention_mask = query.new_zeros(n, n).masked_fill(edges, torch.finfo(query.dtype).min)[None, None]
        return original(module, query, key, value, attention_mask, **kwargs)

    return modeling, restart, attend


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize(("sources", "targets", "keep_self"), [
    ((1, 2, 3, 4, 6), (2, 5, 7, 8), True), ("patches", (0, 3, 9), True), ((0, 1, 2, 3), "patches", False)])
def test_qwen_vision_knockout_matches_the_chunked_attention_oracle(name, sources, targets, keep_self, monkeypatch,
                                                                   tmp_path_factory, tiny_folder, tiny):
    """Patch → patch knockout in Qwen-VL's vision blocks (no CLS), in a batch of two images of different sizes,
    in a windowed block (Qwen2.5-VL's layer 0) and a full one: against the tower's own forward with the mask
    given to its per-block attention calls."""
    case = make_case(name, tmp_path_factory, tiny_folder, tiny)
    lengths = case.batch.inputs["image_grid_thw"].prod(-1).tolist()
    assert len(set(lengths)) == 2
    total = sum(lengths)
    blocked = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length in lengths:  # each image's own patches: "patches" is all of them
        queries = range(length) if targets == "patches" else targets
        keys = range(length) if sources == "patches" else sources
        for query in queries:
            for key in keys:
                if query != key or not keep_self:
                    blocked[start + query, start + key] = True
        start += length
    layer = 1 if name == "qwen2_5_vl" else 0  # Qwen2.5-VL: layer 0 attends within windows, layer 1 over the image
    for layers in ([0], [0, 1]):
        hooks, pre_hooks = [], []
        captured = {}
        for chosen in layers:
            attention = case.module("vision_attention", chosen)
            modeling, restart, attend = qwen_chunk_knockout(attention, blocked)
            monkeypatch.setattr(modeling, "eager_attention_forward", attend)
            pre_hooks.append((attention, restart))
        hooks.append((case.module("vision_residual", layer),
                      lambda module, args, output: captured.__setitem__("residual", tensor(output).clone())))
        expected = case.hooked(pre_hooks=pre_hooks, hooks=hooks)
        monkeypatch.undo()
        knockout = VisionKnockout(sources, targets, layers=layers, keep_self=keep_self)
        residual, logits = case.model.run(case.batch, [knockout], lambda ctx: (
            ctx.vision_residual(layer).clone(), ctx.logits().float()))
        torch.testing.assert_close(residual, captured["residual"], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
        clean = case.model.run(case.batch, readout=lambda ctx: (ctx.vision_residual(layer).clone(),
                                                                 ctx.logits().float()))
        assert (residual - clean[0]).abs().max() > 1e-4  # the knockout changes what the patches read
        assert (logits - clean[1]).abs().max() > 1e-5


def test_qwen_vision_knockout_under_sdpa_matches_the_eager_oracle(monkeypatch, tmp_path_factory):
    """A tower loaded with sdpa attention (its own blocks attend with SDPA): the knockout, recomputed as eager
    attention, equals the eager model's tower given the mask per block."""
    loaded = load_family("qwen2_5_vl", tmp_path_factory)
    model = mmscope.load(loaded.folder, attn_implementation="sdpa")
    assert model.adapter.model.config.vision_config._attn_implementation == "sdpa"
    example = loaded.examples[0]
    plain = plain_model(loaded.folder)
    total = int(example.inputs["image_grid_thw"].prod(-1).sum())
    blocked = torch.zeros(total, total, dtype=torch.bool)
    blocked[:, [0, 5, 6]] = True
    blocked.fill_diagonal_(False)
    attentions = [operator.attrgetter(TOWERS["qwen"][0])(plain)[layer].attn for layer in (0, 1)]
    pre_hooks = []
    for attention in attentions:
        modeling, restart, attend = qwen_chunk_knockout(attention, blocked)
        monkeypatch.setattr(modeling, "eager_attention_forward", attend)
        pre_hooks.append((attention, restart))
    expected = forward_with_hooks(loaded.family, plain, example.inputs, pre_hooks=pre_hooks)
    monkeypatch.undo()
    got = model.run(example, [VisionKnockout((0, 5, 6), "patches", [0, 1])], readout=lambda ctx: ctx.logits().float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - model.run(example, readout=lambda ctx: ctx.logits().float())).abs().max() > 1e-5


def test_a_qwen_vision_mask_opened_across_images_matches_one_block_over_all_patches(tmp_path_factory, tiny_folder,
                                                                                    tiny):
    """The mask can also open pairs: a zero mask at layer 0 lets both images' patches read each other, as the
    tower does when its `cu_seqlens` make one block of the whole sequence (the oracle's pre-hook)."""
    case = make_case("qwen2_vl", tmp_path_factory, tiny_folder, tiny)

    def one_block(module, args, kwargs):
        bounds = kwargs["cu_seqlens"]
        kwargs["cu_seqlens"] = bounds[[0, -1]]
        return args, kwargs

    expected = case.hooked(pre_hooks=[(case.module("vision_attention", 0), one_block)])
    with case.model.trace(case.batch) as ctx:
        mask = ctx.vision_attention_mask(0)
        ctx.set_vision_attention_mask(0, torch.zeros_like(mask))
        logits = ctx.logits().float().save()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits - case.logits([])).abs().max() > 1e-5


def test_qwen_vision_knockout_through_the_sweep_engine_equals_a_full_run(tmp_path_factory):
    model = load_family("qwen2_vl", tmp_path_factory).model
    example = load_family("qwen2_vl", tmp_path_factory).examples[0]
    variants = [Variant(("knockout",), (VisionKnockout("patches", (0, 1, 2), [0, 1]),)),
                Variant(("both",), (VisionKnockout((4, 5), "patches", 1), Knockout("image", "last", [2])))]
    _, prefix = run_variants(model, example, variants)
    for row, variant in enumerate(variants):
        torch.testing.assert_close(prefix[row], model.next_token_probs(example, variant.interventions), atol=1e-6,
                                   rtol=0)
    assert (prefix[0] - model.next_token_probs(example, [])).abs().max() > 1e-6


def test_qwen_vision_knockout_under_flash_attention_is_refused_in_one_line(tmp_path_factory):
    model = load_family("qwen2_vl", tmp_path_factory).model
    example = load_family("qwen2_vl", tmp_path_factory).examples[0]
    vision = model.adapter.model.config.vision_config
    saved = vision._attn_implementation
    try:
        vision._attn_implementation = "flash_attention_2"
        with pytest.raises(InterventionError) as error:
            model.run(example, [VisionKnockout((0, 1), (2,), 0)])
    finally:
        vision._attn_implementation = saved
    message = str(error.value)
    assert "\n" not in message
    assert "ctx.vision_attention_mask(0)" in message and "qwen_vl" in message and "flash_attention_2" in message


@pytest.mark.parametrize("name", family_params(WITHOUT_VISION))
def test_families_without_vision_sites_refuse_in_one_line(name, tmp_path_factory):
    loaded = load_family(name, tmp_path_factory)
    family = loaded.model.adapter.family
    example = loaded.examples[0]
    asked = {
        "ctx.vision_residual(0)": [VisionScale("vision_residual", 0)],
        "ctx.vision_mlp_output(1)": [VisionScale("vision_mlp", 1)],
        "ctx.vision_attention_mask(0)": [VisionKnockout("patches", "cls", 0)],
        "ctx.projector_output()": [VisionScale("projector", 0)],
    }
    for what, interventions in asked.items():
        with pytest.raises(UnsupportedModelError) as error:
            loaded.model.run(example, interventions)
        message = str(error.value)
        assert "\n" not in message and what in message and f"the {family} family" in message
        assert "llava, llava_next, qwen_vl" in message
    with pytest.raises(UnsupportedModelError, match=f"model.cache.*the {family} family"):
        loaded.model.cache(example, sites=["vision_residual"])

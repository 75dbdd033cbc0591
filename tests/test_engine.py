"""The sweep engine: the prefix engine gives every variant the probabilities the naive loop gives it.

Each test sweeps variants of one example with both engines and compares per variant (≤ 1e-6 in float32), and
checks through `plan` which path each variant took: a batched suffix pass from a start after the image, or a
full forward for variants that reach into the prefix or claim nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import scene
from PIL import ImageOps

import mmscope
from mmscope.errors import InputError, InterventionError, LayoutError
from mmscope.experiments.engine import ENGINES, Variant, clean_pass, plan, run_variants, variant_features
from mmscope.experiments.shared_prefix import SharedPrefixCache
from mmscope.interventions import (
    SITES,
    ActivationPatch,
    CachedPatch,
    Context,
    Intervention,
    Knockout,
    SkipLayers,
    Truncate,
    knockout_window,
)

TOLERANCE = 1e-6
AFTER_PREFIX = (("image", "last"), ("question", "last"), ("last", "last"), ("image", "question"),
                ("object", "question"))
INTO_PREFIX = (("image", "image"), ("system", "image"), ("other_patches", "object"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and a second thread stalls whenever another job holds a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sweep(model, flows, k=3, heads=None, centers=None) -> list[Variant]:
    return [
        Variant((f"{source}->{target}", center), (Knockout(
            source, target, knockout_window(center, k, model.n_layers), heads, keep_self=source != target),))
        for source, target in flows
        for center in (centers or range(model.n_layers))
    ]


def both_engines(model, example, variants, **options):
    clean, probs = run_variants(model, example, variants, **options)
    naive_clean, naive = run_variants(model, example, variants, engine="naive")
    return clean, probs, naive_clean, naive


def starts(model, example, variants, budget=1024) -> dict[tuple, int]:
    batches = plan(model, example, clean_pass(model, example), variants, budget)
    return {variants[index].key: batch.start for batch in batches for index in batch.variants}


@pytest.mark.parametrize("overhead", [0, None])
@pytest.mark.parametrize("which", ["short", "long", "left-padded"])
def test_knockouts_after_the_prefix_run_as_suffix_passes_and_equal_the_naive_loop(tiny, examples, which, overhead):
    """With no cost per pass (overhead 0) every row starts at its window's first layer; by default the planner
    groups them (on this 4-layer model, mostly from layer 0)."""
    short, long, batch = examples
    example = {"short": short, "long": long, "left-padded": batch.select([0])}[which]
    variants = sweep(tiny, AFTER_PREFIX)
    clean, probs, naive_clean, naive = both_engines(tiny, example, variants, layer_overhead=overhead)
    assert torch.allclose(clean.probs, naive_clean.probs, atol=TOLERANCE, rtol=0)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert (naive - naive_clean.probs).abs().amax(-1).min() > 1e-6, "every knockout must change the output"
    image_end = max(example.layout["image"]) + 1
    assert all(start >= image_end for start in starts(tiny, example, variants).values())


def test_a_sweep_raises_no_deprecation_warning_from_transformers(tiny, examples):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        run_variants(tiny, examples[0], sweep(tiny, AFTER_PREFIX[:1]))


def test_knockouts_into_the_image_start_inside_it_at_their_first_target_and_layer(tiny, examples):
    """LLaVA's decoder takes the image in its input embeddings and attends causally: a suffix may start at any
    position, so a knockout whose targets are image or object patches starts at its first target."""
    example = examples[1]
    variants = sweep(tiny, INTO_PREFIX + AFTER_PREFIX[:2])
    _, probs, _, naive = both_engines(tiny, example, variants, layer_overhead=0)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    for batch in plan(tiny, example, clean_pass(tiny, example), variants, layer_overhead=0):
        for index in batch.variants:
            knockout = variants[index].interventions[0]
            assert batch.start == int(example.positions(knockout.target, 0).min()), variants[index].key
            assert batch.first_layer == min(knockout.layers), variants[index].key


def test_the_planner_weighs_layers_a_row_did_not_need_against_one_more_pass(tiny, examples):
    """With no cost per pass every row runs from its own first layer; with a prohibitive one, all rows of a start
    share one pass from the earliest. Both give the naive loop's probabilities."""
    example = examples[0]
    variants = sweep(tiny, AFTER_PREFIX[:2], k=1)  # one layer each: first layers 0, 1, 2, 3
    clean = clean_pass(tiny, example)
    free = plan(tiny, example, clean, variants, layer_overhead=0)
    costly = plan(tiny, example, clean, variants, layer_overhead=1e9)
    assert sorted(batch.first_layer for batch in free) == [0, 1, 2, 3]
    assert [(batch.first_layer, len(batch.variants)) for batch in costly] == [(0, len(variants))]
    naive = run_variants(tiny, example, variants, engine="naive")[1]
    for overhead in (0, 1e9):
        probs = run_variants(tiny, example, variants, layer_overhead=overhead)[1]
        assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)


def test_early_exits_and_skipped_layers_start_from_the_cached_stream_and_equal_the_naive_loop(tiny, examples):
    example = examples[0]
    variants = [Variant(("exit", layer), (Truncate(layer),)) for layer in range(tiny.n_layers)]
    variants += [Variant(("skip", 2), (SkipLayers((2,)),)), Variant(("skip", 1, 3), (SkipLayers((1, 3)),))]
    _, probs, naive_clean, naive = both_engines(tiny, example, variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert (naive[:-3] - naive_clean.probs).abs().amax(-1).min() > 1e-6
    batches = plan(tiny, example, clean_pass(tiny, example), variants)
    assert sorted(len(batch.variants) for batch in batches) == [1] * len(variants)
    assert sorted(batch.first_layer for batch in batches) == [1, 1, 2, 2, 3, 4]  # exiting after the last: clean


def test_head_subsets_equal_the_naive_loop(tiny, examples):
    variants = sweep(tiny, (("image", "last"), ("image", "question")), heads=(1, 3), centers=(1, 2))
    _, probs, _, naive = both_engines(tiny, examples[0], variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)


def test_grouped_query_attention_equals_the_naive_loop(padded_folder):
    model = mmscope.load(padded_folder)
    example = model.prepare(scene(seed=5), "What color is the cube?")
    variants = sweep(model, (("image", "last"), ("image", "question")), centers=(0, 1))
    _, probs, _, naive = both_engines(model, example, variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)


def test_an_sdpa_model_equals_its_naive_loop(tiny_sdpa):
    example = tiny_sdpa.prepare(scene(seed=1), "Is the cube red or blue?")
    variants = sweep(tiny_sdpa, (("image", "last"), ("image", "question")), centers=(1, 2))
    _, probs, _, naive = both_engines(tiny_sdpa, example, variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)


def test_a_small_memory_budget_splits_batches_without_changing_results(tiny, examples):
    example = examples[0]
    variants = sweep(tiny, AFTER_PREFIX[:2])
    one_batch = plan(tiny, example, clean_pass(tiny, example), variants, 1024)
    one_row_each = plan(tiny, example, clean_pass(tiny, example), variants, 1e-3)
    assert len(one_batch) == 1 and len(one_row_each) == len(variants)
    _, large = run_variants(tiny, example, variants)
    _, small = run_variants(tiny, example, variants, memory_budget_mb=1e-3)
    assert torch.allclose(large, small, atol=TOLERANCE, rtol=0)


def test_the_prefix_is_shared_by_every_row_not_copied(tiny, examples):
    clean = clean_pass(tiny, examples[0])
    shared = SharedPrefixCache(clean.cache, 40)
    for kept, full in zip(shared.layers, clean.cache.layers, strict=True):
        assert kept.prefix_keys.data_ptr() == full.keys.data_ptr()
        assert kept.prefix_keys.shape[-2] == 40


@dataclass(frozen=True)
class ScaleQuestion(Intervention):
    """Scale the residual stream at question positions after `layer`; it declares where it starts."""

    factor: float
    layer: int

    def apply(self, ctx: Context) -> None:
        ctx.residual(self.layer)[ctx.positions("question")] *= self.factor

    def affected_from(self, example) -> int:
        return int(example.positions("question", 0).min())


@dataclass(frozen=True)
class ScaleImage(Intervention):
    """Scale the residual stream at image positions after `layer`; it claims nothing."""

    factor: float
    layer: int

    def apply(self, ctx: Context) -> None:
        ctx.residual(self.layer)[ctx.positions("image")] *= self.factor


def test_user_interventions_run_on_their_own_row_or_fall_back_when_they_claim_nothing(tiny, examples):
    example = examples[0]
    layers = range(tiny.n_layers - 2)  # later, question positions have (almost) no way left to the answer
    variants = [Variant(("question", layer), (ScaleQuestion(0.5, layer),)) for layer in layers]
    variants += [Variant(("image", 1), (ScaleImage(0.5, 1),)), Variant(("skip",), (SkipLayers((1,)),))]
    variants += sweep(tiny, AFTER_PREFIX[:1])
    _, probs, naive_clean, naive = both_engines(tiny, example, variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert (naive[: len(layers) + 2] - naive_clean.probs).abs().amax(-1).min() > 1e-6
    question_start = example.layout["question"][0]
    assert starts(tiny, example, variants) == {
        **{("question", layer): question_start for layer in layers},
        ("image", 1): 0, ("skip",): 0, **{variant.key: example.seq_len - 1 for variant in variants[-4:]},
    }


def test_variants_of_several_interventions_start_at_the_earliest(tiny, examples):
    example = examples[1]
    both = (Knockout("image", "last", (1, 2)), Knockout("question", "instruction", (0, 1)))
    variants = [Variant(("both",), both), Variant(("none",), ())]
    clean, probs, _, naive = both_engines(tiny, example, variants)
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert torch.allclose(probs[1], clean.probs, atol=TOLERANCE, rtol=0)
    assert starts(tiny, example, variants)[("both",)] == example.layout["instruction"][0]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_batch_1_patch_has_no_row_to_patch_into_and_is_refused(tiny, examples, engine):
    variants = [Variant(("patch",), (ActivationPatch("residual", (1,), "last"),))]
    with pytest.raises(InterventionError, match="no row to patch into"):
        run_variants(tiny, examples[0], variants, engine=engine)


def test_bad_engine_budget_and_batches_are_named(tiny, examples):
    with pytest.raises(InputError, match=f"unknown engine 'fast'; known: {', '.join(ENGINES)}"):
        run_variants(tiny, examples[0], [], engine="fast")
    with pytest.raises(InputError, match="batch of 2"):
        run_variants(tiny, examples[2], [])
    with pytest.raises(InputError, match="memory_budget_mb must be positive"):
        run_variants(tiny, examples[0], [], memory_budget_mb=0)
    with pytest.raises(InputError, match="layer_overhead must be at least 0; got -1"):
        run_variants(tiny, examples[0], [], layer_overhead=-1)
    with pytest.raises(InputError, match="the source is one example"):
        run_variants(tiny, examples[0], [], source=examples[2])
    clean, probs = run_variants(tiny, examples[0], [])
    assert probs.shape == (0, len(clean.probs))


@pytest.mark.parametrize(
    ("family", "shared"),
    [("llava_next", True), ("qwen2_vl", True), ("qwen3_vl", True), ("idefics3", True),
     ("paligemma", False), ("gemma3", False)],
)
def test_other_families_equal_the_naive_loop_and_share_the_prefix_only_where_attention_allows(
    family, shared, tmp_path_factory
):
    """Qwen's 3-D rotary positions and Qwen3's deepstack features ride along; PaliGemma's prompt attends
    bidirectionally (read off its masks) and Gemma3 has sliding-window layers: every variant runs in full."""
    from families import load_family

    loaded = load_family(family, tmp_path_factory)
    model, example = loaded.model, loaded.examples[1]
    variants = sweep(model, AFTER_PREFIX[:4], centers=(1, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probs, _, naive = both_engines(model, example, variants, layer_overhead=0)
        suffix_starts = starts(model, example, variants).values()
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert any(suffix_starts) == shared
    assert any("prefix engine" in str(warning.message) for warning in caught) == (family == "gemma3")


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl", "idefics3", "paligemma", "gemma3"])
def test_other_families_patch_from_a_clean_cache_as_the_naive_loop_does(family, tmp_path_factory):
    """The same question about an inverted image; residual and attention patches of every group at every layer
    (Qwen3's deepstack and PaliGemma's prefix keep image positions out of suffix passes)."""
    from families import IMAGES, QUESTIONS, load_family

    model = load_family(family, tmp_path_factory).model
    clean = model.prepare(scene(*IMAGES[1], seed=2), QUESTIONS[1])
    corrupted = model.prepare(ImageOps.invert(scene(*IMAGES[1], seed=2)), QUESTIONS[1])
    variants = patches(model, "residual", ("image", "question", "last")) + patches(model, "attention", ("image",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Gemma3's full-forward warning
        run, probs = run_variants(model, corrupted, variants, source=clean, layer_overhead=0)
        naive_run, naive = run_variants(model, corrupted, variants, source=clean, engine="naive")
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert torch.allclose(run.source.probs, naive_run.source.probs, atol=TOLERANCE, rtol=0)
    assert (naive - naive_run.probs).abs().amax(-1).max() > 10 * TOLERANCE


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 2e-3)])
def test_in_half_precision_the_prefix_engine_equals_the_naive_loop_within_that_precision(dtype, tolerance):
    """Measured on this example: 2.3e-2 in bfloat16, 6.1e-4 in float16, where the engine and the naive loop round
    in different orders. bfloat16 keeps 8 bits: a logit near 10 is rounded to 0.06, and where a knockout leaves p
    near 0.5, dp = p(1 - p) dlogit moves by 0.016 per such step. Masks use the dtype's own minimum, so nothing
    overflows to NaN."""
    from mmscope.zoo import sample

    model = mmscope.load("shapes-llava", dtype=dtype)
    scene = sample(0, category="ChooseAttr")  # a held-out scene: its object carries the answer
    example = model.prepare(scene.image, scene.question, boxes=scene.boxes)
    variants = sweep(model, AFTER_PREFIX, centers=(1, 4, 6))
    clean, probs, naive_clean, naive = both_engines(model, example, variants)
    assert not probs.isnan().any() and not naive.isnan().any()
    assert (probs - naive).abs().max() <= tolerance
    assert (clean.probs - naive_clean.probs).abs().max() <= tolerance
    assert (naive - naive_clean.probs).abs().amax(-1).max() > 0.5, "the knockouts must still matter"


PATCH_GROUPS = ("image", "object", "question", "last")


def patch_pair(model, question="Is the cube red or blue?", box=(5, 5, 10, 8)):
    """One question asked of two images of the same size (clean, corrupted; every pixel differs): the same
    positions in both."""
    clean, corrupted = scene(seed=1), ImageOps.invert(scene(seed=1))
    return model.prepare(clean, question, boxes=[box]), model.prepare(corrupted, question, boxes=[box])


def patches(model, site, groups=PATCH_GROUPS) -> list[Variant]:
    return [Variant((group, layer), (CachedPatch(site, (layer,), group),))
            for group in groups for layer in range(model.n_layers)]


@pytest.mark.parametrize("site", SITES)
def test_patches_from_a_clean_cache_equal_the_naive_loop_and_row_to_row_patching(tiny, site):
    """Three computations of every (group, layer) patch: the engine, the naive loop (a cached clean run, one full
    forward per patch) and, independently of any cache, ActivationPatch in a [clean, corrupted] batch."""
    clean, corrupted = patch_pair(tiny)
    variants = patches(tiny, site)
    run, probs = run_variants(tiny, corrupted, variants, source=clean)
    naive_run, naive = run_variants(tiny, corrupted, variants, source=clean, engine="naive")
    assert torch.allclose(probs, naive, atol=TOLERANCE, rtol=0)
    assert torch.allclose(run.source.probs, tiny.next_token_probs(clean), atol=TOLERANCE, rtol=0)
    assert torch.allclose(run.probs, naive_run.probs, atol=TOLERANCE, rtol=0)
    pair = tiny.batch([clean, corrupted])
    for variant, patched in zip(variants, probs, strict=True):
        (patch,) = variant.interventions
        row_to_row = tiny.next_token_probs(pair, [ActivationPatch(site, patch.layers, patch.positions)])[1]
        assert torch.allclose(patched, row_to_row, atol=TOLERANCE, rtol=0), variant.key
    assert (naive - run.probs).abs().amax(-1).max() > 10 * TOLERANCE, "the patches must matter"
    if site == "residual":  # the last position's final stream patched: the clean run's answer, exactly
        assert torch.allclose(probs[variants.index(variants[-1])], run.source.probs, atol=TOLERANCE, rtol=0)


def test_a_residual_patch_of_the_whole_image_starts_after_it_on_the_clean_runs_keys(tiny):
    """Patching every image position's stream leaves the image carrying the clean run's values from that layer
    on (the text before it being the same): those rows start after the image, reading the clean run's cache in
    later layers. An object patch covers only some image positions and starts at its first one."""
    clean, corrupted = patch_pair(tiny)
    variants = patches(tiny, "residual")
    run = clean_pass(tiny, corrupted)
    run.source = clean_pass(tiny, clean)
    image_end = max(corrupted.layout["image"]) + 1
    for batch in plan(tiny, corrupted, run, variants, layer_overhead=0):
        for row, index in enumerate(batch.variants):
            group, layer = variants[index].key
            if group == "image":
                assert (batch.start, batch.from_source, batch.omitted[row]) == (image_end, True, 0)
                assert batch.first_layers[row] == layer + 1
            else:
                assert (batch.start, batch.from_source) == (int(corrupted.positions(group, 0).min()), False)
                assert batch.first_layers[row] == layer


def test_a_cached_patch_needs_a_source_with_the_group_and_the_site(tiny):
    clean, corrupted = patch_pair(tiny)
    with pytest.raises(InputError, match="pass source="):
        run_variants(tiny, corrupted, patches(tiny, "mlp", ("last",)))
    with pytest.raises(InterventionError, match="pass `source=cache`"):
        tiny.next_token_probs(corrupted, [CachedPatch("mlp", (1,), "last")])
    cache = tiny.cache(clean, sites=["residual"], layers=[0, 1])
    with pytest.raises(InterventionError, match="holds no 'mlp' activation at layer 1"):
        tiny.next_token_probs(corrupted, [CachedPatch("mlp", (1,), "last")], source=cache)
    longer = tiny.prepare(scene(seed=1), "Is the cube red or blue or red?", boxes=[(5, 5, 10, 8)])
    with pytest.raises(InterventionError, match="positions in the source example but"):
        tiny.next_token_probs(corrupted, [CachedPatch("residual", (1,), "question")], source=tiny.cache(longer))
    assert torch.allclose(cache.site("residual", 1)[0], tiny.hidden_states(clean)[2, 0], atol=1e-6, rtol=0)


FEATURE_TOLERANCE = 1e-5


@pytest.mark.parametrize("which", ["short", "long", "left-padded"])
def test_pooled_features_of_each_variant_equal_one_full_forward_per_variant(tiny, examples, which):
    """`variant_features` reads each variant's pooled residual stream from the engine's passes: equal to
    `model.hidden_states` under the variant, pooled by hand, at every depth; depths below a variant's first
    layer are the clean ones exactly."""
    short, long, batch = examples
    example = {"short": short, "long": long, "left-padded": batch.select([0])}[which]
    variants = sweep(tiny, AFTER_PREFIX + INTO_PREFIX, k=2)
    variants += [Variant(("truncate", layer), (Truncate(layer),)) for layer in range(tiny.n_layers)]
    variants += [Variant(("skip", layer), (SkipLayers((layer,)),)) for layer in range(tiny.n_layers)]
    groups = ["last", "image", "question", "object"]
    clean, features = variant_features(tiny, example, variants, groups)
    naive_clean, naive = variant_features(tiny, example, variants, groups, engine="naive")
    assert clean.keys() == features.keys() == set(groups)
    for group in groups:
        at = example.positions(group, 0)
        by_hand = tiny.hidden_states(example)[:, 0, at].mean(1)  # [L + 1, D]
        assert torch.allclose(clean[group], by_hand, atol=FEATURE_TOLERANCE, rtol=0)
        assert torch.allclose(naive_clean[group], by_hand, atol=FEATURE_TOLERANCE, rtol=0)
        for index, variant in enumerate(variants):
            expected = tiny.hidden_states(example, variant.interventions)[:, 0, at].mean(1)
            assert torch.allclose(features[group][index], expected, atol=FEATURE_TOLERANCE, rtol=0), (group, variant.key)
            assert torch.allclose(naive[group][index], expected, atol=FEATURE_TOLERANCE, rtol=0)
            first = min(intervention.first_layer() for intervention in variant.interventions)
            assert torch.equal(features[group][index, : first + 1], clean[group][: first + 1]), (group, variant.key)
    moved = torch.stack([(features[group] - clean[group]).abs().amax((1, 2)) for group in groups]).amax(0)
    assert (moved[: len(variants) - 2 * tiny.n_layers] > 1e-6).all(), "every knockout must move some feature"


def test_pooled_features_refuse_what_they_cannot_read(tiny, examples):
    short, _, batch = examples
    read = variant_features
    with pytest.raises(InputError, match="one example"):
        read(tiny, batch, [], ["last"])
    with pytest.raises(LayoutError, match="unknown token group 'imag'"):
        read(tiny, short, [], ["imag"])
    with pytest.raises(InputError, match="non-empty sequence"):
        read(tiny, short, [], "last")
    with pytest.raises(InputError, match="unknown engine"):
        read(tiny, short, [], ["last"], engine="fast")
    patch = Variant(("patch", 0), (CachedPatch("residual", (0,), "image"),))
    with pytest.raises(InputError, match="source run"):
        read(tiny, short, [patch], ["last"])

"""`mmscope.interventions` against independent plain-PyTorch computations on tiny random LLaVA checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml
from oracle import (
    LLAVA,
    forward_with_hooks,
    knockout_logits,
    pairs,
    patched_logits,
    plain_inputs,
    plain_model,
    scaled_logits,
)

from mmscope.errors import InterventionError

from mmscope.interventions import (
    ActivationPatch,
    Context,
    Intervention,
    Knockout,
    SkipLayers,
    Truncate,
    knockout_window,
)

TOLERANCE = 1e-6


def last_probs(logits):
    return logits[:, -1].softmax(-1)


@pytest.mark.parametrize(
    ("source", "target", "layers"),
    [("image", "last", (1, 2)), ("image", "question", (0, 1, 2, 3)), ("question", "last", (2,)),
     ("object", "question", (0, 3))],
)
def test_knockout_of_all_target_source_pairs_matches_independent_masked_forward(
    tiny, tiny_folder, examples, source, target, layers
):
    batch = examples[2]
    blocked = pairs(batch, target, source)
    expected = last_probs(knockout_logits(LLAVA, plain_model(tiny_folder), batch.inputs, blocked, layers))
    got = tiny.next_token_probs(batch, [Knockout(source, target, layers)])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)
    clean = tiny.next_token_probs(batch)
    assert (got - clean).abs().max() > 1e-5, "the knockout must change the output"


def test_knockout_of_a_head_subset_matches_independent_per_head_mask(tiny, tiny_folder, examples):
    batch = examples[2]
    expected = last_probs(
        knockout_logits(LLAVA, plain_model(tiny_folder), batch.inputs, pairs(batch, "last", "image"), (0, 2),
                        heads=(1, 3))
    )
    got = tiny.next_token_probs(batch, [Knockout("image", "last", (0, 2), heads=(1, 3))])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_knockout_under_sdpa_equals_the_eager_oracle(tiny_sdpa, tiny_folder, examples):
    batch = examples[2]
    blocked = pairs(batch, "last", "image")
    expected = last_probs(knockout_logits(LLAVA, plain_model(tiny_folder), batch.inputs, blocked, (1, 3)))
    got = tiny_sdpa.next_token_probs(batch, [Knockout("image", "last", (1, 3))])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_batched_rows_equal_their_single_runs(tiny, examples):
    first, second, batch = examples
    probs = tiny.next_token_probs(batch, [Knockout("image", "last", (0, 1))])
    assert torch.allclose(probs[0], tiny.next_token_probs(first, [Knockout("image", "last", (0, 1))]), atol=TOLERANCE)
    assert torch.allclose(probs[1], tiny.next_token_probs(second, [Knockout("image", "last", (0, 1))]), atol=TOLERANCE)


def test_knockout_of_a_group_from_itself_only_changes_nothing(tiny, examples):
    batch = examples[2]
    assert torch.equal(tiny.next_token_probs(batch, [Knockout("last", "last", range(4))]), tiny.next_token_probs(batch))


def test_knockout_leaves_positions_before_its_targets_and_layers_before_its_window_unchanged(tiny, examples):
    batch = examples[2]
    clean = tiny.hidden_states(batch)
    knocked = tiny.hidden_states(batch, [Knockout("image", "last", (2, 3))])
    assert torch.equal(knocked[:3], clean[:3]), "embeddings and layers 0-1 precede the window"
    real = slice(batch.padding[0], -1)  # pad rows are fully masked and attend uniformly, so they may move
    assert torch.equal(knocked[:, :, real], clean[:, :, real]), "only the last position is a target"
    assert not torch.equal(knocked[3:, :, -1], clean[3:, :, -1])


def test_knockout_of_everything_from_everything_has_no_nan(tiny, examples):
    batch = examples[2]
    everything = tuple(range(batch.seq_len - batch.padding[0]))
    probs = tiny.next_token_probs(batch, [Knockout(everything, everything, range(4))])
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)


def test_last_to_last_without_self_blocks_the_diagonal_and_never_empties_a_row(tiny, tiny_folder, examples):
    batch = examples[2]
    last = pairs(batch, "last", "last")
    model = plain_model(tiny_folder)
    got = tiny.next_token_probs(batch, [Knockout("last", "last", (0, 1, 2, 3), keep_self=False)])
    n_heads = model.config.text_config.num_attention_heads

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        for row, row_pairs in enumerate(last):
            for target, source in row_pairs:
                mask[row, :, target, source] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    layers = model.model.language_model.layers
    hooks = [(layers[i].self_attn, edit) for i in range(4)]
    expected = last_probs(forward_with_hooks(LLAVA, model, batch.inputs, pre_hooks=hooks))
    assert torch.allclose(got, expected, atol=TOLERANCE) and n_heads == 4
    assert not torch.allclose(got, tiny.next_token_probs(batch), atol=1e-5)
    everything = tuple(range(batch.seq_len - batch.padding[0]))
    emptied = tiny.next_token_probs(batch, [Knockout(everything, everything, range(4), keep_self=False)])
    assert torch.isfinite(emptied).all()
    assert torch.allclose(emptied, tiny.next_token_probs(batch, [Knockout(everything, everything, range(4))]), atol=TOLERANCE)


def test_composed_knockouts_chain_and_equal_their_union(tiny, tiny_folder, examples):
    batch = examples[2]
    both = pairs(batch, "last", "image")
    both = [a + b for a, b in zip(both, pairs(batch, "question", "image"), strict=True)]
    expected = last_probs(knockout_logits(LLAVA, plain_model(tiny_folder), batch.inputs, both, (1, 2)))
    one_order = [Knockout("image", "last", (1, 2)), Knockout("image", "question", (2, 1))]
    assert torch.allclose(tiny.next_token_probs(batch, one_order), expected, atol=TOLERANCE)
    assert torch.allclose(tiny.next_token_probs(batch, one_order[::-1]), expected, atol=TOLERANCE)


def test_knockout_window_follows_the_study_convention():
    assert knockout_window(0, 9, 32) == (0, 1, 2, 3, 4)
    assert knockout_window(10, 9, 32) == tuple(range(6, 15))
    assert knockout_window(31, 9, 32) == (27, 28, 29, 30, 31)
    assert knockout_window(5, 4, 32) == (3, 4, 5, 6)
    assert knockout_window(3, 1, 8) == (3,)


@pytest.mark.parametrize("site", ["residual", "attention", "mlp"])
def test_patching_clean_into_corrupted_matches_an_independent_hook_at_each_site(tiny, tiny_folder, site):
    from conftest import scene

    clean = tiny.prepare(scene(seed=3), "Is the cube red or blue?")
    corrupted = tiny.prepare(scene(seed=4), "Is the cube red or blue?")
    pair = tiny.batch([clean, corrupted])
    image = clean.layout["image"]
    expected = last_probs(patched_logits(LLAVA, plain_model(tiny_folder), pair.inputs, site, (1,), image))
    got = tiny.next_token_probs(pair, [ActivationPatch(site, (1,), "image")])
    assert torch.allclose(got, expected, atol=TOLERANCE)
    assert not torch.allclose(got[1], tiny.next_token_probs(pair)[1], atol=1e-5), "the patch must change row 1"


def test_a_patch_with_no_row_to_patch_into_is_refused(tiny, examples):
    with pytest.raises(InterventionError, match="no row to patch into: a batch of 1"):
        tiny.next_token_probs(examples[0], [ActivationPatch("residual", (1,), "image")])
    with pytest.raises(InterventionError, match=r"target_rows \[2\] not in a batch of 2"):
        tiny.next_token_probs(examples[2], [ActivationPatch("residual", (1,), "image", target_rows=[2])])


def test_patching_the_whole_residual_copies_the_source_run(tiny):
    from conftest import scene

    clean = tiny.prepare(scene(seed=3), "Is the cube red or blue?")
    corrupted = tiny.prepare(scene(seed=4), "Is the cube red or blue?")
    pair = tiny.batch([clean, corrupted])
    everything = tuple(range(pair.seq_len))
    patched = tiny.next_token_probs(pair, [ActivationPatch("residual", (1,), everything)])
    assert torch.allclose(patched[1], patched[0], atol=TOLERANCE)
    assert not torch.allclose(tiny.next_token_probs(corrupted), patched[0], atol=1e-4)


def test_truncation_after_each_layer_equals_final_norm_and_lm_head_on_the_plain_hidden_state(
    tiny, tiny_folder, examples
):
    batch = examples[2]
    model = plain_model(tiny_folder)
    with torch.no_grad():
        hidden = model(**plain_inputs(LLAVA, batch.inputs), output_hidden_states=True).hidden_states
        clean = tiny.next_token_probs(batch)
        for layer in range(tiny.n_layers - 1):  # hidden[layer + 1] is the stream after decoder layer `layer`
            expected = model.lm_head(model.model.language_model.norm(hidden[layer + 1]))[:, -1].softmax(-1)
            got = tiny.next_token_probs(batch, [Truncate(layer)])
            assert torch.allclose(got, expected, atol=TOLERANCE), layer
            assert not torch.allclose(got, clean, atol=1e-5), layer


def test_skipping_layers_equals_identity_hooks(tiny, tiny_folder, examples):
    batch = examples[2]
    model = plain_model(tiny_folder)
    layers = model.model.language_model.layers
    identity = [(layers[i], lambda module, args, output: args[0]) for i in (0, 2)]
    expected = last_probs(forward_with_hooks(LLAVA, model, batch.inputs, hooks=identity))
    assert torch.allclose(tiny.next_token_probs(batch, [SkipLayers((0, 2))]), expected, atol=TOLERANCE)


@dataclass(frozen=True)
class ScaleImageTokens(Intervention):
    """Multiply the residual stream at image positions by `factor` after the given layers."""

    factor: float
    layers: tuple[int, ...]

    def apply(self, ctx: Context) -> None:
        for layer in self.layers:
            ctx.residual(layer)[ctx.positions("image")] *= self.factor


def test_a_user_intervention_in_ten_lines_matches_an_independent_hook(tiny, tiny_folder, examples):
    batch = examples[2]
    images = [layout["image"] for layout in batch.layouts]
    expected = last_probs(scaled_logits(LLAVA, plain_model(tiny_folder), batch.inputs, 1, images, 0.5))
    got = tiny.next_token_probs(batch, [ScaleImageTokens(0.5, (1,))])
    assert torch.allclose(got, expected, atol=TOLERANCE)
    assert Intervention.from_dict(ScaleImageTokens(0.5, (1,)).to_dict()) == ScaleImageTokens(0.5, (1,))


@pytest.mark.parametrize(
    "intervention",
    [Knockout("image", "last", range(2, 5), heads=[0, 1]), Knockout((1, 2), [5], [3]),
     ActivationPatch("attention", [1], "image", source_row=1, target_rows=[0]), Truncate(2), SkipLayers([0, 3])],
)
def test_interventions_round_trip_through_yaml(intervention):
    text = yaml.safe_dump(intervention.to_dict())
    assert Intervention.from_dict(yaml.safe_load(text)) == intervention


def test_sequence_fields_are_normalised_once_from_their_annotations():
    knockout = Knockout("image", [5, 6], [1, 2], heads=range(2))
    assert knockout.layers == (1, 2) and knockout.target == (5, 6) and knockout.heads == (0, 1)
    assert hash(knockout) == hash(Knockout("image", (5, 6), (1, 2), heads=(0, 1)))
    assert ScaleImageTokens(0.5, [1, 2]).layers == (1, 2) and ScaleImageTokens(0.5, 3).layers == (3,)
    assert hash(ScaleImageTokens(0.5, [1, 2])) == hash(ScaleImageTokens(0.5, (1, 2)))


@pytest.mark.parametrize(
    ("build", "message"),
    [(lambda: Knockout("image", "last", "12"), "Knockout.layers must be ints; got '12'"),
     (lambda: Knockout("image", "last", [1.5]), r"Knockout.layers must be ints; got \[1.5\]"),
     (lambda: Knockout("image", "last", (1,), heads=[True]), "Knockout.heads must be ints"),
     (lambda: Knockout("image", "last", (1,), keep_self="no"), "Knockout.keep_self must be True or False"),
     (lambda: Knockout(3.0, "last", (1,)), "Knockout.source must be a token-group name or positions"),
     (lambda: SkipLayers(None), "SkipLayers.layers must be ints; got None"),
     (lambda: Knockout("image", "last", ()), r"Knockout.layers must not be empty; got \(\)"),
     (lambda: Knockout("image", "last", (1,), heads=[]), r"Knockout.heads must not be empty; got \[\]"),
     (lambda: Knockout((), "last", (1,)), r"Knockout.source must not be empty"),
     (lambda: ActivationPatch("mlp", range(0), "image"), r"ActivationPatch.layers must not be empty")],
)
def test_malformed_fields_are_refused_by_name(build, message):
    with pytest.raises(InterventionError, match=message):
        build()


def test_a_second_intervention_class_of_a_registered_name_is_refused():
    with pytest.raises(InterventionError, match="intervention 'Knockout' .* has the name of mmscope.interventions"):
        @dataclass(frozen=True)
        class Knockout(Intervention):  # noqa: F811 — a user class shadowing the built-in one
            layers: tuple[int, ...]
    assert Intervention.registry["Knockout"].__module__ == "mmscope.interventions.knockout"

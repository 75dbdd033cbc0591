"""Interventions against independent plain-PyTorch computations on tiny random LLaVA checkpoints."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import yaml
from oracle import forward_with_hooks, knockout_logits, plain_inputs, plain_model

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


def pairs(example, target, source):
    return [
        list(itertools.product(example.positions(target, row).tolist(), example.positions(source, row).tolist()))
        for row in range(len(example))
    ]


@pytest.mark.parametrize(
    ("source", "target", "layers"),
    [("image", "last", (1, 2)), ("image", "question", (0, 1, 2, 3)), ("question", "last", (2,)),
     ("object", "question", (0, 3))],
)
def test_knockout_of_all_target_source_pairs_matches_independent_masked_forward(
    tiny, tiny_folder, examples, source, target, layers
):
    batch = examples[2]
    expected = last_probs(knockout_logits(plain_model(tiny_folder), batch.inputs, pairs(batch, target, source), layers))
    got = tiny.next_token_probs(batch, [Knockout(source, target, layers)])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)
    clean = tiny.next_token_probs(batch)
    assert (got - clean).abs().max() > 1e-5, "the knockout must change the output"


def test_knockout_of_a_head_subset_matches_independent_per_head_mask(tiny, tiny_folder, examples):
    batch = examples[2]
    expected = last_probs(
        knockout_logits(plain_model(tiny_folder), batch.inputs, pairs(batch, "last", "image"), (0, 2), heads=(1, 3))
    )
    got = tiny.next_token_probs(batch, [Knockout("image", "last", (0, 2), heads=(1, 3))])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_knockout_under_sdpa_equals_the_eager_oracle(tiny_sdpa, tiny_folder, examples):
    batch = examples[2]
    expected = last_probs(knockout_logits(plain_model(tiny_folder), batch.inputs, pairs(batch, "last", "image"), (1, 3)))
    got = tiny_sdpa.next_token_probs(batch, [Knockout("image", "last", (1, 3))])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_empty_intervention_list_equals_plain_hf_forward(tiny, tiny_folder, examples):
    batch = examples[2]
    with torch.no_grad():
        expected = last_probs(plain_model(tiny_folder)(**plain_inputs(batch.inputs)).logits)
    assert torch.equal(tiny.next_token_probs(batch), expected)


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
    expected = last_probs(forward_with_hooks(model, batch.inputs, pre_hooks=[(layers[i].self_attn, edit) for i in range(4)]))
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
    expected = last_probs(knockout_logits(plain_model(tiny_folder), batch.inputs, both, (1, 2)))
    one_order = [Knockout("image", "last", (1, 2)), Knockout("image", "question", (2, 1))]
    assert torch.allclose(tiny.next_token_probs(batch, one_order), expected, atol=TOLERANCE)
    assert torch.allclose(tiny.next_token_probs(batch, one_order[::-1]), expected, atol=TOLERANCE)


def test_knockout_window_follows_the_study_convention():
    assert knockout_window(0, 9, 32) == (0, 1, 2, 3, 4)
    assert knockout_window(10, 9, 32) == tuple(range(6, 15))
    assert knockout_window(31, 9, 32) == (27, 28, 29, 30, 31)
    assert knockout_window(5, 4, 32) == (3, 4, 5, 6)
    assert knockout_window(3, 1, 8) == (3,)


def test_patching_clean_into_clean_is_a_no_op(tiny, examples):
    first = examples[0]
    pair = tiny.batch([first, first])
    clean = tiny.next_token_probs(pair)
    for site in ("residual", "attention", "mlp"):
        patched = tiny.next_token_probs(pair, [ActivationPatch(site, (0, 2), "image")])
        assert torch.equal(patched, clean)


def test_patching_the_whole_residual_copies_the_source_run(tiny):
    from conftest import scene

    clean = tiny.prepare(scene(seed=3), "Is the cube red or blue?")
    corrupted = tiny.prepare(scene(seed=4), "Is the cube red or blue?")
    pair = tiny.batch([clean, corrupted])
    everything = tuple(range(pair.seq_len))
    patched = tiny.next_token_probs(pair, [ActivationPatch("residual", (1,), everything)])
    assert torch.allclose(patched[1], patched[0], atol=TOLERANCE)
    assert not torch.allclose(tiny.next_token_probs(corrupted), patched[0], atol=1e-4)


def test_patching_image_tokens_matches_an_independent_hook(tiny, tiny_folder):
    from conftest import scene

    clean = tiny.prepare(scene(seed=3), "Is the cube red or blue?")
    corrupted = tiny.prepare(scene(seed=4), "Is the cube red or blue?")
    pair = tiny.batch([clean, corrupted])
    image = clean.layout["image"]
    model = plain_model(tiny_folder)

    def copy_row0_to_row1(module, args, output):
        output = output.clone()
        output[1, image] = output[0, image]
        return output

    expected = last_probs(forward_with_hooks(model, pair.inputs, hooks=[(model.model.language_model.layers[1].mlp,
                                                                         copy_row0_to_row1)]))
    got = tiny.next_token_probs(pair, [ActivationPatch("mlp", (1,), "image")])
    assert torch.allclose(got, expected, atol=TOLERANCE)


def test_truncation_at_the_last_layer_equals_the_normal_output(tiny, examples):
    batch = examples[2]
    assert torch.equal(tiny.next_token_probs(batch, [Truncate(tiny.n_layers - 1)]), tiny.next_token_probs(batch))


def test_truncation_equals_final_norm_and_lm_head_on_the_plain_hidden_state(tiny, tiny_folder, examples):
    batch = examples[2]
    model = plain_model(tiny_folder)
    with torch.no_grad():
        hidden = model(**plain_inputs(batch.inputs), output_hidden_states=True).hidden_states[2]  # after layer 1
        expected = model.lm_head(model.model.language_model.norm(hidden))[:, -1].softmax(-1)
    assert torch.allclose(tiny.next_token_probs(batch, [Truncate(1)]), expected, atol=TOLERANCE)


def test_skipping_layers_equals_identity_hooks(tiny, tiny_folder, examples):
    batch = examples[2]
    model = plain_model(tiny_folder)
    layers = model.model.language_model.layers
    identity = [(layers[i], lambda module, args, output: args[0]) for i in (0, 2)]
    expected = last_probs(forward_with_hooks(model, batch.inputs, hooks=identity))
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
    model = plain_model(tiny_folder)

    def scale(module, args, output):
        output = output.clone()
        for row in range(len(batch)):
            output[row, batch.layouts[row]["image"]] *= 0.5
        return output

    expected = last_probs(forward_with_hooks(model, batch.inputs, hooks=[(model.model.language_model.layers[1], scale)]))
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


def test_answer_scores_match_teacher_forcing_by_hand(tiny, tiny_folder, examples):
    first = examples[0]
    score = tiny.answer_prob(first, "red or blue")
    tokens = tiny.answer_tokens(first, "red or blue")[0]
    assert len(tokens) == 3
    inputs = dict(first.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logprobs = plain_model(tiny_folder)(**inputs).logits[0].log_softmax(-1)
    start = first.seq_len - 1
    expected = sum(logprobs[start + i, token] for i, token in enumerate(tokens))
    assert torch.allclose(score.logprob[0], expected, atol=1e-5)
    assert torch.allclose(score.first_token_prob[0], tiny.next_token_probs(first)[tokens[0]], atol=TOLERANCE)


def test_greedy_answer_equals_hf_generate(tiny, tiny_folder, examples):
    first = examples[0]
    with torch.no_grad():
        ids = plain_model(tiny_folder).generate(**first.inputs, max_new_tokens=3, do_sample=False)
    expected = tiny.tokenizer.decode(ids[0, first.seq_len :], skip_special_tokens=True).strip()
    assert tiny.generate_answer(first, max_new_tokens=3) == expected

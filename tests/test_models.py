"""`mmscope.models`: every supported family's adapter, end to end on a tiny random checkpoint with its real
processor class.

For each family: `mmscope.load` reads a `save_pretrained` folder; the token layout agrees with the processor's
own image-token count; a knockout over a window equals the plain-PyTorch masked forward (pre-hooks editing the
mask the model itself built); patching the image positions of a clean row into a corrupted one equals forward
hooks doing the same copy at the decoder layer, its self-attention or its MLP; truncation after a layer is the
final norm and lm_head on that layer's output. Family-specific tests check what is particular to each layout
(tiles, newlines, boxes …).
"""

from __future__ import annotations

import pytest
import torch
from conftest import scene
from families import FAMILIES, IMAGES, QUESTIONS, Loaded, byte_tokenizer, family_params, load_family
from oracle import (
    PLACES,
    knockout_logits,
    layer_outputs,
    pairs,
    patched_logits,
    pixel_change,
    placed_box,
    plain_inputs,
)
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, PreTrainedTokenizerFast

import mmscope
from mmscope.errors import InputError
from mmscope.interventions import ActivationPatch, Knockout, Truncate
from mmscope.zoo.build import TinyLlavaSpec, build_llava, save_llava
from mmscope.models.generic import GenericAdapter

TOLERANCE = 1e-6


@pytest.fixture(scope="session", params=family_params(sorted(FAMILIES)))
def loaded(request, tmp_path_factory) -> Loaded:
    return load_family(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def llava_next(tmp_path_factory) -> Loaded:
    return load_family("llava_next", tmp_path_factory)


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory) -> Loaded:
    return load_family("gemma3", tmp_path_factory)


@pytest.fixture(scope="session")
def paligemma(tmp_path_factory) -> Loaded:
    return load_family("paligemma", tmp_path_factory)


@pytest.fixture(scope="session", params=family_params(["idefics3", "smolvlm"]))
def idefics3(request, tmp_path_factory) -> Loaded:
    return load_family(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory) -> Loaded:
    return load_family(request.param, tmp_path_factory)


def last_probs(logits):
    return logits[:, -1].softmax(-1)


def words(model, example, row, group):
    ids = example.inputs["input_ids"][row, example.layouts[row][group]]
    return model.tokenizer.convert_ids_to_tokens(ids.tolist())


# --- every family ------------------------------------------------------------------------------------------------
def test_loaded_through_mmscope_with_the_family_adapter(loaded):
    assert loaded.model.adapter.family == loaded.family.name
    assert loaded.model.n_layers == len(loaded.family.layers(loaded.plain))


def test_the_groups_a_sweep_checks_against_are_those_of_a_real_example_with_a_box(loaded):
    model, image = loaded.model, scene(*IMAGES[0], seed=1)
    if loaded.family.name == "kosmos2":  # latent queries, not patches: no box groups
        with pytest.raises(InputError, match="boxes cannot select them"):
            model.prepare(image, QUESTIONS[0], boxes=[(5, 5, 10, 8)])
        example, boxed = model.prepare(image, QUESTIONS[0], words=["cube"]), set()
    else:
        example = model.prepare(image, QUESTIONS[0], boxes=[(5, 5, 10, 8)], words=["cube"])
        boxed = {"object", "other_patches"}
    assert set(model.groups) == set(example.groups())
    assert {"image", "question", "last", "object_word"} | boxed <= set(model.groups)


def processor_image_count(loaded, layout, width, height) -> int:
    """The processor's own count of image-feature tokens for an image of this size."""
    processor = loaded.model.processor
    if loaded.family.count_includes_markers:  # transformers' own count included the tile markers in some releases
        encoded = processor(images=[[scene(width, height)]], text=[str(processor.image_token)], return_tensors="pt")
        return int((encoded["input_ids"] == loaded.model.adapter.image_token_id).sum())
    if hasattr(processor, "_get_num_multimodal_tokens"):
        count = processor._get_num_multimodal_tokens(image_sizes=[[height, width]]).num_image_tokens[0]
        return count
    if hasattr(processor, "image_token"):  # SmolVLM: its own expansion of the placeholder
        expanded = processor(images=[scene(width, height)], text=[processor.image_token], return_text_replacement_offsets=True)
        return expanded["text_replacement_offsets"][0][0]["replacement"].count(processor.image_token)
    encoded = processor(images=[scene(width, height)], text=["is it red?"], return_tensors="pt")  # Kosmos-2
    return int(encoded["image_embeds_position_mask"].sum())


def test_image_group_matches_the_processors_own_image_token_count(loaded):
    model, batch = loaded.model, loaded.examples[2]
    for row, (width, height) in enumerate(IMAGES):
        layout = batch.layouts[row]
        assert len(layout["image"]) == processor_image_count(loaded, layout, width, height)
        ids = batch.inputs["input_ids"][row]
        assert (ids[layout["image"]] == model.adapter.image_token_id).all() or loaded.family.name == "kosmos2"
    assert words(model, batch, 0, "question") == ["is", "the", "cube", "red", "or", "blue", "?"]
    assert words(model, batch, 1, "question")[:4] == ["what", "color", "is", "this"]
    assert batch.layouts[0]["last"] == [batch.seq_len - 1]


def test_no_intervention_equals_the_plain_forward(loaded):
    batch = loaded.examples[2]
    with torch.no_grad():
        expected = last_probs(loaded.plain(**plain_inputs(loaded.family, batch.inputs)).logits)
    assert torch.allclose(loaded.model.next_token_probs(batch), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("source", "target", "layers"),
    [("image", "last", (1, 2)), ("image", "question", (0, 1, 2, 3)), ("question", "last", (2,))],
)
def test_knockout_over_a_window_equals_the_plain_masked_forward(loaded, source, target, layers):
    batch = loaded.examples[2]
    expected = last_probs(knockout_logits(loaded.family, loaded.plain, batch.inputs, pairs(batch, target, source), layers))
    got = loaded.model.next_token_probs(batch, [Knockout(source, target, layers)])
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (got - loaded.model.next_token_probs(batch)).abs().max() > 1e-5, "the knockout must change the output"


@pytest.mark.parametrize("name", ["gemma3", "paligemma", "qwen2_vl", "llava_next"])
def test_knockout_under_sdpa_equals_the_eager_oracle(name, tmp_path_factory):
    loaded = load_family(name, tmp_path_factory)
    batch = loaded.examples[2]
    expected = last_probs(knockout_logits(loaded.family, loaded.plain, batch.inputs, pairs(batch, "last", "image"), (1, 3)))
    sdpa = mmscope.load(loaded.folder, attn_implementation="sdpa")
    got = sdpa.next_token_probs(batch, [Knockout("image", "last", (1, 3))])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["residual", "attention", "mlp"])
def test_patching_clean_image_positions_into_a_corrupted_row_equals_a_plain_forward_hook(loaded, site):
    """Same question, two images of the same size (so the same image positions): the patch copies row 0's
    activation there into row 1 in layers 0 and 2, as forward hooks on the decoder layer / its self-attention /
    its MLP do."""
    model, layers = loaded.model, (0, 2)
    clean = model.prepare(scene(*IMAGES[0], seed=3), QUESTIONS[0])
    corrupted = model.prepare(scene(*IMAGES[0], seed=4), QUESTIONS[0])
    pair = model.batch([clean, corrupted])
    image = pair.layouts[0]["image"]
    assert pair.layouts[1]["image"] == image
    expected = last_probs(patched_logits(loaded.family, loaded.plain, pair.inputs, site, layers, image))
    got = model.next_token_probs(pair, [ActivationPatch(site, layers, "image")])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (got[1] - model.next_token_probs(pair)[1]).abs().max() > 1e-5, "the patch must change the corrupted row"


def test_truncation_after_a_layer_is_the_final_norm_and_lm_head_on_that_layers_output(loaded):
    """The readout applied to the last layer's output must give the plain forward's logits (so it is all the
    forward does after the layers); applied to an earlier layer's output at the last position it is what
    `Truncate` must give. The last position is text, so what Qwen3-VL adds between layers (deepstack features,
    at image positions) is never added to it: its value after a layer is that layer's output."""
    batch, family, plain, model = loaded.examples[2], loaded.family, loaded.plain, loaded.model
    logits, outputs = layer_outputs(family, plain, batch.inputs)
    with torch.no_grad():
        readouts = [family.readout(plain, output[:, -1]).softmax(-1) for output in outputs]
    assert len(outputs) == model.n_layers
    assert torch.allclose(readouts[-1], last_probs(logits), atol=TOLERANCE, rtol=0)
    normal = model.next_token_probs(batch)
    for layer in range(model.n_layers - 1):
        got = model.next_token_probs(batch, [Truncate(layer)])
        assert torch.allclose(got, readouts[layer], atol=TOLERANCE, rtol=0), f"Truncate({layer})"
        assert (got - normal).abs().max() > 1e-5, f"the layers after {layer} must change the output"


def test_greedy_answer_equals_hf_generate(loaded):
    first, model = loaded.examples[0], loaded.model
    with torch.no_grad():
        stop = [model.tokenizer.eos_token_id, model.tokenizer.pad_token_id]  # generate_answer stops at either
        ids = loaded.plain.generate(**first.inputs, max_new_tokens=3, do_sample=False, eos_token_id=stop)
    expected = model.tokenizer.decode(ids[0, first.seq_len :], skip_special_tokens=True).strip()
    assert model.generate_answer(first, max_new_tokens=3) == expected


# --- LLaVA-NeXT ---------------------------------------------------------------------------------------------------
def changed_features(model, image, box):
    """Oracle: per image token, how much its patch's processed pixels change when `box` is drawn white on black
    (the model's own `pack_image_features` orders them, newline tokens marked -1)."""
    patch = model.hf.config.vision_config.patch_size
    change = pixel_change(model.processor.image_processor, image, box)[0].amax(1)  # [tiles, H, W]
    per_patch = change.unfold(1, patch, patch).unfold(2, patch, patch).amax((-1, -2))  # [tiles, g, g]
    features = per_patch.flatten(1)[..., None]
    packed, _ = model.hf.model.pack_image_features(
        [features], torch.tensor([[image.height, image.width]]), "default", image_newline=torch.tensor([-1.0])
    )
    return packed[0][:, 0]


def test_llava_next_batch_of_images_with_different_tile_counts_equals_single_runs(llava_next):
    model = llava_next.model
    wide = model.prepare(scene(60, 20, seed=5), QUESTIONS[0])  # one row of three tiles
    square = llava_next.examples[0]  # two by two tiles
    assert wide.inputs["pixel_values"].shape[1] != square.inputs["pixel_values"].shape[1]
    knockout = [Knockout("image", "last", (1, 2))]
    batched = model.next_token_probs(model.batch([wide, square]), knockout)
    assert torch.allclose(batched[0], model.next_token_probs(wide, knockout), atol=TOLERANCE)
    assert torch.allclose(batched[1], model.next_token_probs(square, knockout), atol=TOLERANCE)


@pytest.mark.parametrize("size", [(40, 30), (30, 50), (60, 20)])
def test_llava_next_groups_follow_the_models_own_packing(llava_next, size):
    model = llava_next.model
    image = scene(*size)
    example = model.prepare(image, QUESTIONS[0])
    layout = example.layout
    packed = changed_features(model, image, (0, 0, 1, 1))
    image_positions = torch.tensor(layout["image"])
    assert len(packed) == len(image_positions)
    assert layout["image_newline"] == image_positions[packed == -1].tolist()
    assert len(layout["image_base"]) == 16
    assert sorted(layout["image_base"] + layout["image_grid"] + layout["image_newline"]) == layout["image"]
    assert "image_markers" not in layout, "LLaVA-NeXT's placeholder expands to image tokens only"


@pytest.mark.parametrize("size", [(40, 30), (30, 50), (60, 20)])
@pytest.mark.parametrize("where", PLACES)
def test_llava_next_boxes_select_patches_in_the_base_and_high_resolution_grids(llava_next, size, where):
    model = llava_next.model
    width, height = size
    box = placed_box(where, width, height)
    image = scene(width, height)
    layout = model.prepare(image, QUESTIONS[0], boxes=[box]).layout
    change = changed_features(model, image, box)
    image_positions = torch.tensor(layout["image"])
    strongly, at_all = image_positions[change > 0.5].tolist(), image_positions[change > 1e-3].tolist()
    got = set(layout["object"])
    assert set(strongly) <= got <= set(at_all)
    assert got & set(layout["image_base"]) and got & set(layout["image_grid"])
    assert not got & set(layout["image_newline"])
    assert sorted(layout["object"] + layout["other_patches"] + layout["image_newline"]) == layout["image"]


# --- Qwen2-VL, Qwen2.5-VL, Qwen3-VL ----------------------------------------------------------------------------
def test_qwen_placeholder_markers_and_model_computed_positions(qwen):
    model, batch = qwen.model, qwen.examples[2]
    for row in range(len(batch)):
        layout = batch.layouts[row]
        assert words(model, batch, row, "image_markers") == ["<|vision_start|>", "<|vision_end|>"]
        assert layout["image_markers"] == [layout["image"][0] - 1, layout["image"][-1] + 1]
        assert layout["image"] == list(range(layout["image"][0], layout["image"][-1] + 1))
    assert "position_ids" not in model.model_inputs(batch), "the model computes its 3D rotary positions itself"
    assert torch.equal(batch.inputs["mm_token_type_ids"][0, batch.layouts[0]["image"]], torch.ones(20, dtype=torch.long))
    assert (batch.inputs["mm_token_type_ids"][0, : batch.padding[0]] == 0).all()


def merged_block_change(model, image, box):
    """Oracle: per merged block (= image token), the largest change of its processed pixels when `box` is drawn
    white on black; the processor emits patches block by block, `merge**2` consecutive patches per token."""
    processor = model.processor.image_processor
    per_patch = pixel_change(processor, image, box).amax(-1)
    return per_patch.view(-1, processor.merge_size**2).amax(-1)


@pytest.mark.parametrize("size", [(40, 30), (30, 50)])
@pytest.mark.parametrize("where", PLACES)
def test_qwen_boxes_select_the_merged_blocks_they_cover(tmp_path_factory, size, where):
    model = load_family("qwen2_vl", tmp_path_factory).model  # one geometry for the three generations
    width, height = size
    box = placed_box(where, width, height)
    image = scene(width, height)
    layout = model.prepare(image, QUESTIONS[0], boxes=[box]).layout
    change = merged_block_change(model, image, box)
    image_positions = torch.tensor(layout["image"])
    assert len(change) == len(image_positions)
    strongly, at_all = image_positions[change > 0.5].tolist(), image_positions[change > 1e-3].tolist()
    assert set(strongly) <= set(layout["object"]) <= set(at_all)
    assert sorted(layout["object"] + layout["other_patches"]) == layout["image"]


# --- Gemma 3 and PaliGemma --------------------------------------------------------------------------------------
def test_gemma3_markers_surround_the_soft_tokens_which_the_token_types_mark(gemma3):
    model, batch = gemma3.model, gemma3.examples[2]
    for row in range(len(batch)):
        layout = batch.layouts[row]
        assert words(model, batch, row, "image_markers") == ["\n", "\n", "<start_of_image>", "<end_of_image>", "\n", "\n"]
        assert words(model, batch, row, "roles") == ["<start_of_turn>", "user", "\n", "<start_of_turn>", "model", "\n"]
        marked = torch.nonzero(batch.inputs["token_type_ids"][row]).flatten().tolist()
        assert marked == layout["image"]


def later_to_earlier(example, group):
    """Knockout groups for the edges from a group's second half to its first half (only a bidirectional mask
    has them)."""
    positions = example.layout[group]
    half = len(positions) // 2
    return tuple(p - example.padding[0] for p in positions[half:]), tuple(p - example.padding[0] for p in positions[:half])


@pytest.mark.parametrize(("name", "source", "target"), [("gemma3", "image", "image"), ("paligemma", "question", "image")])
def test_knockout_of_edges_only_the_models_bidirectional_mask_has(name, source, target, tmp_path_factory):
    loaded = load_family(name, tmp_path_factory)
    model, first = loaded.model, loaded.examples[0]
    if source == target:
        source, target = later_to_earlier(first, source)
    knockout = Knockout(source, target, (0, 1, 2, 3))
    expected = last_probs(knockout_logits(loaded.family, loaded.plain, first.inputs, pairs(first, target, source), range(4)))
    got = model.next_token_probs(first, [knockout])
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (got - model.next_token_probs(first)).abs().max() > 1e-5, "a causal mask would have had no such edges"


def test_paligemma_positions_and_teacher_forced_answers_follow_the_model(paligemma):
    model, first = paligemma.model, paligemma.examples[0]
    with torch.no_grad():
        own = last_probs(paligemma.plain(**first.inputs).logits)  # the model's own 1-indexed positions
    assert torch.allclose(model.next_token_probs(first), own, atol=TOLERANCE, rtol=0)
    tokens = model.answer_tokens(first, "red or blue")[0]
    inputs = dict(first.inputs)
    answer = torch.tensor([tokens])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(answer)], dim=1)  # causal suffix
    with torch.no_grad():
        logprobs = paligemma.plain(**inputs).logits[0].log_softmax(-1)
    expected = sum(logprobs[first.seq_len - 1 + i, token] for i, token in enumerate(tokens))
    assert torch.allclose(model.answer_prob(first, "red or blue").logprob[0], expected, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "paligemma"])
@pytest.mark.parametrize("where", PLACES)
def test_gemma_boxes_select_the_cells_of_the_squashed_grid(name, where, tmp_path_factory):
    model = load_family(name, tmp_path_factory).model
    width, height = 40, 30
    box = placed_box(where, width, height)
    image = scene(width, height)
    layout = model.prepare(image, QUESTIONS[0], boxes=[box]).layout
    change = pixel_change(model.processor.image_processor, image, box)
    side = int(len(layout["image"]) ** 0.5)
    cell = change.shape[-1] // side
    per_cell = change[0].amax(0).unfold(0, cell, cell).unfold(1, cell, cell).amax((-1, -2)).flatten()
    image_positions = torch.tensor(layout["image"])
    strongly, at_all = image_positions[per_cell > 0.5].tolist(), image_positions[per_cell > 1e-3].tolist()
    assert set(strongly) <= set(layout["object"]) <= set(at_all)


# --- Idefics3 and SmolVLM ---------------------------------------------------------------------------------------
def test_idefics3_tiles_tags_and_global_view(idefics3):
    model, first = idefics3.model, idefics3.examples[0]
    markers = ["<fake_token_around_image>", "<row_1_col_1>", "<fake_token_around_image>", "<row_1_col_2>", "\n",
               "<fake_token_around_image>", "<row_2_col_1>", "<fake_token_around_image>", "<row_2_col_2>", "\n",
               "\n", "<fake_token_around_image>", "<global-img>", "<fake_token_around_image>"]
    assert words(model, first, 0, "image_markers") == markers
    layout = first.layout
    assert len(layout["image_tiles"]) == 4 * 16 and len(layout["image_global"]) == 16
    assert layout["image_global"] == layout["image"][-16:]
    assert words(model, first, 0, "roles") == ["user", ":", "assistant", ":"]


def test_idefics3_batch_of_images_with_different_tile_counts_equals_single_runs(idefics3):
    model = idefics3.model
    wide = model.prepare(scene(60, 20, seed=5), QUESTIONS[0])  # one row of two tiles
    square = idefics3.examples[0]
    assert wide.inputs["pixel_values"].shape[1] == 3 and square.inputs["pixel_values"].shape[1] == 5
    knockout = [Knockout("image_global", "last", (1, 2))]
    batched = model.next_token_probs(model.batch([wide, square]), knockout)
    assert torch.allclose(batched[0], model.next_token_probs(wide, knockout), atol=TOLERANCE)
    assert torch.allclose(batched[1], model.next_token_probs(square, knockout), atol=TOLERANCE)


@pytest.mark.parametrize("size", [(40, 30), (60, 20)])
@pytest.mark.parametrize("where", PLACES)
def test_idefics3_boxes_select_cells_in_every_tile_and_the_global_view(tmp_path_factory, size, where):
    model = load_family("idefics3", tmp_path_factory).model  # SmolVLM's geometry is the same
    width, height = size
    box = placed_box(where, width, height)
    image = scene(width, height)
    layout = model.prepare(image, QUESTIONS[0], boxes=[box]).layout
    change = pixel_change(model.processor.image_processor, image, box)
    cell = model.hf.config.vision_config.patch_size * model.hf.config.scale_factor
    per_cell = change[0].amax(1).unfold(1, cell, cell).unfold(2, cell, cell).amax((-1, -2)).flatten()
    image_positions = torch.tensor(layout["image"])
    assert len(per_cell) == len(image_positions)
    strongly, at_all = image_positions[per_cell > 0.5].tolist(), image_positions[per_cell > 1e-3].tolist()
    assert set(strongly) <= set(layout["object"]) <= set(at_all)
    assert set(layout["object"]) & set(layout["image_global"]) and set(layout["object"]) & set(layout["image_tiles"])


# --- Kosmos-2 ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kosmos2(tmp_path_factory) -> Loaded:
    return load_family("kosmos2", tmp_path_factory)


def test_kosmos2_image_tokens_are_where_the_position_mask_puts_the_image(kosmos2):
    model, batch = kosmos2.model, kosmos2.examples[2]
    for row in range(len(batch)):
        layout = batch.layouts[row]
        assert torch.nonzero(batch.inputs["image_embeds_position_mask"][row]).flatten().tolist() == layout["image"]
        assert words(model, batch, row, "image_markers") == ["<image>", "</image>"]
        assert words(model, batch, row, "roles") == ["question", ":", "answer", ":"]


def test_kosmos2_boxes_are_refused_with_the_reason(kosmos2):
    with pytest.raises(InputError, match="latent queries"):
        kosmos2.model.prepare(scene(), QUESTIONS[0], boxes=[(0, 0, 10, 10)])


# --- Emu3 ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def emu3(tmp_path_factory) -> Loaded:
    return load_family("emu3", tmp_path_factory)


def test_emu3_image_tokens_are_vq_codes_with_row_newlines_from_the_models_own_tokenizer(emu3):
    model, first = emu3.model, emu3.examples[0]
    layout = first.layout
    assert words(model, first, 0, "image_markers") == [
        "<|image start|>", "4", "*", "5", "<|image token|>", "<|extra_201|>", "<|image end|>"]
    with torch.no_grad():
        codes = model.hf.model.get_image_tokens(first.inputs["pixel_values"], first.inputs["image_sizes"])
    assert len(codes) == len(layout["image"])
    eol = model.tokenizer.convert_tokens_to_ids("<|extra_200|>")
    image_positions = torch.tensor(layout["image"])
    assert layout["image_newline"] == image_positions[codes == eol].tolist()
    visual = model.tokenizer.convert_ids_to_tokens(codes[codes != eol].tolist())
    assert all(token.startswith("<|visual token") for token in visual), "image tokens are vocabulary entries"


@pytest.mark.parametrize("where", PLACES)
def test_emu3_boxes_select_the_codes_of_the_cells_they_cover(emu3, where):
    model = emu3.model
    width, height = 40, 30
    box = placed_box(where, width, height)
    image = scene(width, height)
    example = model.prepare(image, QUESTIONS[0], boxes=[box])
    layout = example.layout
    change = pixel_change(model.processor.image_processor, image, box)
    factor = model.hf.model.vqmodel.vision_spatial_factor
    per_cell = change[0].amax(0).unfold(0, factor, factor).unfold(1, factor, factor).amax((-1, -2))
    per_cell = torch.cat([per_cell, torch.full((len(per_cell), 1), -1.0)], dim=1).flatten()  # newline column
    image_positions = torch.tensor(layout["image"])
    strongly, at_all = image_positions[per_cell > 0.5].tolist(), image_positions[per_cell > 1e-3].tolist()
    assert set(strongly) <= set(layout["object"]) <= set(at_all)
    assert sorted(layout["object"] + layout["other_patches"] + layout["image_newline"]) == layout["image"]


# --- the generic adapter ------------------------------------------------------------------------------------------
class NoOffsetsTokenizer(PreTrainedTokenizerFast):
    """A tokenizer that, like a slow (remote-code) one, cannot report character offsets."""

    def __call__(self, *args, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("no offsets")
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="session")
def byte_llava(tmp_path_factory):
    """A tiny LLaVA whose tokenizer is byte-level (decodes back to its text, as tiktoken does)."""
    model, processor = build_llava(byte_tokenizer(), TinyLlavaSpec(), seed=2)
    return save_llava(model, processor, tmp_path_factory.mktemp("byte-llava"))


def generic_model(folder, tokenizer, **fields) -> mmscope.Model:
    """The checkpoint as a tokenizer-only model that no registered adapter is used for: fields say it all."""
    hf = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    image_processor = AutoImageProcessor.from_pretrained(folder)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    adapter = GenericAdapter(
        hf, tokenizer, layers="model.language_model.layers", final_norm="model.language_model.norm", lm_head="lm_head",
        image_text=lambda image: "<image>" * 16,
        image_inputs=lambda tokenizer, image: image_processor(image, return_tensors="pt"),
        **({"image_id": image_id} | fields),
    )
    return mmscope.Model(adapter)


@pytest.mark.parametrize("offsets", ["from the tokenizer", "from decoding"])
def test_generic_adapter_by_fields_equals_the_registered_llava_adapter(byte_llava, offsets):
    registered = mmscope.load(byte_llava)
    tokenizer = AutoTokenizer.from_pretrained(byte_llava)
    if offsets == "from decoding":
        tokenizer.__class__ = NoOffsetsTokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    generic = generic_model(byte_llava, tokenizer, find_image=lambda ids: torch.nonzero(ids == image_id).flatten())
    examples = [(scene(40, 30, seed=1), QUESTIONS[0]), (scene(30, 50, seed=2), QUESTIONS[1])]
    ours = generic.batch([generic.prepare(image, question) for image, question in examples])
    reference = registered.batch([registered.prepare(image, question) for image, question in examples])
    assert torch.equal(ours.inputs["input_ids"], reference.inputs["input_ids"])
    assert ours.layouts == reference.layouts
    knockout = [Knockout("image", "last", (1, 2)), Knockout("question", "last", (3,))]
    assert torch.allclose(generic.next_token_probs(ours, knockout), registered.next_token_probs(reference, knockout),
                          atol=TOLERANCE, rtol=0)
    truncated = generic.next_token_probs(ours, [Truncate(1)])
    assert torch.allclose(truncated, registered.next_token_probs(reference, [Truncate(1)]), atol=TOLERANCE, rtol=0)
    assert not torch.allclose(truncated, generic.next_token_probs(ours), atol=1e-5)


def test_paligemma2_logits_are_soft_capped_as_its_forward_does(tmp_path):
    from families import build_paligemma

    folder = build_paligemma(tmp_path, seed=1, softcap=2.0)  # a low cap, so that capping moves the probabilities
    model = mmscope.load(folder)
    batch = model.batch([model.prepare(scene(40, 30, seed=1), QUESTIONS[0]),
                         model.prepare(scene(30, 50, seed=2), QUESTIONS[1])])
    plain = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        output = plain(**plain_inputs(FAMILIES["paligemma"], batch.inputs), output_hidden_states=True)
        uncapped = plain.lm_head(output.hidden_states[-1])[:, -1].softmax(-1)  # the last entry is already normed
    probs = model.next_token_probs(batch)
    assert torch.allclose(probs, output.logits[:, -1].softmax(-1), atol=TOLERANCE)
    assert not torch.allclose(probs, uncapped, atol=1e-3), "the cap must matter here"
    lens = model.unembed(model.hidden_states(batch)[-1, :, -1]).softmax(-1)
    assert torch.allclose(lens, probs, atol=TOLERANCE), "the lens reads logits as the model returns them"


def test_a_padding_mask_broadcast_over_queries_is_knocked_out_per_query():
    from mmscope.context import additive_mask
    from mmscope.interventions.masks import block

    hidden = torch.zeros(2, 5, 8)
    padding = torch.zeros(2, 1, 1, 5)
    padding[1, ..., 0] = torch.finfo(torch.float32).min  # row 1 is left-padded by one
    mask = additive_mask(padding, hidden)
    assert mask.shape == (2, 1, 5, 5)
    blocked = torch.zeros(2, 5, 5, dtype=torch.bool)
    blocked[:, 4, 2] = True
    edited = block(mask, blocked, None, 1)
    assert (edited[:, 0, 4, 2] == torch.finfo(torch.float32).min).all()
    assert (edited[:, 0, 3, 2] == 0).all() and edited[1, 0, 3, 0] == torch.finfo(torch.float32).min

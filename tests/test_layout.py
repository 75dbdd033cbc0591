"""`mmscope.layout`: token groups from offsets, image tokens, object patches from boxes, and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scene
from oracle import PLACES, pixel_change, placed_box

import mmscope
from mmscope.errors import InputError, InterventionError, LayoutError
from mmscope.interventions import ActivationPatch, Knockout, Truncate


def tokens(model, example, row, group):
    ids = example.inputs["input_ids"][row, example.layouts[row][group]]
    return model.tokenizer.convert_ids_to_tokens(ids.tolist())


def test_groups_of_a_padded_batch_of_different_lengths(tiny, examples):
    first, second, batch = examples
    assert batch.padding[0] > 0 and batch.padding[1] == 0
    assert tokens(tiny, batch, 0, "question") == ["is", "the", "cube", "red", "or", "blue", "?"]
    assert tokens(tiny, batch, 1, "question")[:4] == ["what", "color", "is", "this"]
    assert tokens(tiny, batch, 0, "instruction") == "answer the question using a single word or phrase .".split()
    assert tokens(tiny, batch, 1, "roles") == ["user", ":", "assistant", ":"]
    assert tokens(tiny, batch, 0, "system")[:3] == ["a", "chat", "between"]
    for row, single in enumerate((first, second)):
        layout = batch.layouts[row]
        assert layout["last"] == [batch.seq_len - 1]
        assert len(layout["image"]) == 16 == int((batch.inputs["input_ids"][row] == tiny.adapter.image_token_id).sum())
        shift = batch.padding[row]
        assert layout["image"] == [p + shift for p in single.layout["image"]]
        positions = sorted(p for group in ("system", "roles", "image", "question", "instruction") for p in layout[group])
        assert positions == list(range(shift + 1, batch.seq_len)), "every token but BOS has exactly one group"
        assert layout["question"] == sorted(layout["question"])


def test_question_group_excludes_words_the_template_shares_with_it(tiny):
    example = tiny.prepare(scene(), "Answer the question: is the cube red?")
    assert tokens(tiny, example, 0, "question") == ["answer", "the", "question", ":", "is", "the", "cube", "red", "?"]
    assert len(example.layout["instruction"]) == 10


def test_word_spans_find_each_name_as_a_whole_word_or_its_plural():
    from mmscope.layout import word_spans

    question = "Are there any Cubes or cones that are red, like the cube?"
    spans = word_spans(question, ["cube", "cone", "sphere", "red", ""], start=10)
    assert [question[s - 10 : e - 10] for s, e in spans] == ["Cubes", "cones", "red"]  # first occurrence; none
    assert word_spans("Is the reddish cube cubed?", ["red", "cube"]) == [(15, 19)]  # whole words only


def test_the_object_word_group_holds_the_tokens_of_the_named_objects(tiny):
    example = tiny.prepare(scene(), "Is the cube left of the sphere?", words=["cube", "sphere", "cone"])
    ids = example.inputs["input_ids"][0]
    assert tiny.tokenizer.decode(ids[example.layout["object_word"]]).split() == ["cube", "sphere"]
    assert set(example.layout["object_word"]) < set(example.layout["question"])
    assert "object_word" not in tiny.prepare(scene(), "Is the cube red?", words=["sphere"]).layout  # not spelt
    assert "object_word" not in tiny.prepare(scene(), "Is the cube red?").layout  # no names given
    assert "object_word" in tiny.groups
    with pytest.raises(InputError, match="words must be a list"):
        tiny.prepare(scene(), "Is the cube red?", words="cube")


def test_custom_template_string(tiny):
    example = tiny.prepare(scene(), "Is the cube red?", template="USER: <image> {question} ASSISTANT:")
    assert tokens(tiny, example, 0, "question") == ["is", "the", "cube", "red", "?"]
    assert example.layout["image"][0] == 3
    assert "system" not in example.layout


def expected_object_patches(model, image, box):
    """Oracle: draw the box, run the real processor, and see which patches changed."""
    patch = model.hf.config.vision_config.patch_size
    change = pixel_change(model.processor.image_processor, image, box)[0].amax(0)
    grid = change.unfold(0, patch, patch).unfold(1, patch, patch).amax((-1, -2))
    return set(np.flatnonzero(grid.flatten().numpy() > 0.5).tolist())


@pytest.mark.parametrize("size", [(64, 40), (40, 64)])
@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("fixture", ["tiny", "padded"])
def test_object_patches_for_corner_and_centre_boxes_match_the_processed_pixels(request, size, where, fixture):
    model = request.getfixturevalue("tiny") if fixture == "tiny" else mmscope.load(request.getfixturevalue("padded_folder"))
    width, height = size
    box = placed_box(where, width, height, corner=(14, 14), centre=(18, 18))
    image = scene(width, height)
    example = model.prepare(image, "Is the cube red?", boxes=[box])
    first_image = example.layout["image"][0]
    got = {p - first_image for p in example.layout["object"]}
    assert got == expected_object_patches(model, image, box)
    assert sorted(example.layout["object"] + example.layout["other_patches"]) == example.layout["image"]


def test_bad_inputs_get_one_clear_error_naming_the_input(tiny, examples):
    first = examples[0]
    with pytest.raises(LayoutError, match=r"unknown token group 'objct'; known: .*image.*question"):
        tiny.next_token_probs(first, [Knockout("objct", "last", (0,))])
    with pytest.raises(InterventionError, match=r"layer 9 out of range; the model has layers 0\.\.3"):
        tiny.next_token_probs(first, [Knockout("image", "last", (1, 9))])
    with pytest.raises(InterventionError, match="layer 4 out of range"):
        tiny.next_token_probs(first, [Truncate(4)])
    with pytest.raises(InterventionError, match="heads \\[7\\] out of range"):
        tiny.next_token_probs(first, [Knockout("image", "last", (1,), heads=(7,))])
    with pytest.raises(InterventionError, match="unknown site 'mlpp'"):
        ActivationPatch("mlpp", (0,), "image")
    with pytest.raises(InputError, match="question must be a non-empty string"):
        tiny.prepare(scene(), "   ")
    with pytest.raises(InputError, match="image file 'photo.jpg' does not exist"):
        tiny.prepare("photo.jpg", "Is the cube red?")
    with pytest.raises(InputError, match="image must be a PIL.Image.Image or the path of an image file; got int"):
        tiny.prepare(3, "Is the cube red?")
    with pytest.raises(InputError, match=r"box \(30, 20, 20, 20\) .* outside the 40x30 image"):
        tiny.prepare(scene(), "Is the cube red?", boxes=[(30, 20, 20, 20)])
    with pytest.raises(InputError, match=r"box \(5, 5, nan, 4\) has a value that is not a finite number"):
        tiny.prepare(scene(), "Is the cube red?", boxes=[(5, 5, float("nan"), 4)])
    with pytest.raises(InputError, match="boxes is empty"):
        tiny.prepare(scene(), "Is the cube red?", boxes=[])


def test_prepare_takes_the_path_of_an_image_file_as_it_takes_the_image(tiny, tmp_path):
    image = scene(seed=4)
    image.save(tmp_path / "scene.png")
    from_path = tiny.prepare(tmp_path / "scene.png", "Is the cube red?")
    from_text = tiny.prepare(str(tmp_path / "scene.png"), "Is the cube red?")
    from_image = tiny.prepare(image, "Is the cube red?")
    for example in (from_path, from_text):
        assert torch.equal(example.inputs["pixel_values"], from_image.inputs["pixel_values"])
        assert example.layouts == from_image.layouts
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match=r"image file '.*notes.png' cannot be read as an image"):
        tiny.prepare(tmp_path / "notes.png", "Is the cube red?")

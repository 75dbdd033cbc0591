"""`mmscope.Preprocessing`: the study's square padding, chunked prompt tokenisation and red-mask object patches,
and the `random_patches` control group — each checked against a small re-implementation written here."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from conftest import scene
from families import QUESTIONS, load_family, template_text, word_tokenizer
from PIL import Image, ImageDraw
from tokenizers import Regex, pre_tokenizers
from transformers import LlavaImageProcessorPil

import mmscope
from mmscope import Preprocessing
from mmscope.errors import InputError, UnsupportedModelError
from mmscope.layout import BOX_GROUPS
from mmscope.prompts import LLAVA_15
from mmscope.zoo.build import TinyLlavaSpec, build_llava, save_llava

QUESTION = "Is the cube red or blue?"
PATCH, SIDE = 8, 32  # the tiny LLaVA: 32-px crops of 8-px patches, a 4 x 4 grid


@pytest.fixture(scope="module")
def llava(tiny_folder):
    """A LLaVA-1.5 of its own (the tests change its preprocessing), on the shared tiny checkpoint."""
    return mmscope.load(tiny_folder)


@pytest.fixture
def study(llava):
    llava.set_preprocessing(Preprocessing.study())
    yield llava
    llava.set_preprocessing(Preprocessing())


# --- the study's steps, written out ---------------------------------------------------------------------------------
def expand2square(image: Image.Image, background) -> Image.Image:
    """LLaVA's own `expand2square` (llava/mm_utils.py)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, 0) if width < height else (0, (side - height) // 2))
    return result


def mean_colour(folder):
    return tuple(int(x * 255) for x in LlavaImageProcessorPil.from_pretrained(folder).image_mean)


def red_mask_tokens(image_size, boxes, pad_colour=None) -> set[int]:
    """The study's object patches: boxes drawn red (inclusive) on black, [padded,] bicubic-resized so the shortest
    edge is 32, centre-cropped to 32 x 32, cut in 8-px patches; a patch counts when one pixel is exactly red."""
    mask = Image.new("RGB", image_size, (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((x, y, x + w, y + h), fill=(255, 0, 0))
    if pad_colour is not None:
        mask = expand2square(mask, pad_colour)
    width, height = mask.size
    scale = SIDE / min(width, height)
    size = (SIDE, int(height * scale)) if width <= height else (int(width * scale), SIDE)
    resized = torch.tensor(list(mask.resize(size, Image.Resampling.BICUBIC).getdata())).reshape(size[1], size[0], 3)
    top, left = (size[1] - SIDE) // 2, (size[0] - SIDE) // 2
    red = (resized[top : top + SIDE, left : left + SIDE] == torch.tensor([255, 0, 0])).all(-1)
    return {row * 4 + col for row in range(4) for col in range(4)
            if red[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH].any()}


def red_cells_of(mask: Image.Image, patch: int) -> torch.Tensor:
    """`[rows, cols]`: which `patch`-px cells of a PIL mask hold an exactly red pixel."""
    pixels = torch.tensor(list(mask.getdata())).reshape(mask.height, mask.width, 3)
    red = (pixels == torch.tensor([255, 0, 0])).all(-1)
    return red.reshape(mask.height // patch, patch, mask.width // patch, patch).any(3).any(1)


def llava_next_red_mask_tokens(image_size, boxes, pinpoints, tile=16, patch=4) -> list[bool]:
    """The study's rule through LLaVA-NeXT's any-res view, per image token: the base view squashes the mask to one
    tile; the high-resolution view fits it (bicubic) into the best pinpoint, pads it centred with black, cuts
    tiles and stitches their cells; LLaVA-NeXT's unpad keeps the grid rows (or columns) that show the image,
    and a newline token (never red) ends each row."""
    from transformers.image_processing_utils import select_best_resolution

    width, height = image_size
    mask = Image.new("RGB", image_size, (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((x, y, x + w, y + h), fill=(255, 0, 0))
    base = red_cells_of(mask.resize((tile, tile), Image.Resampling.BICUBIC), patch)
    best_height, best_width = select_best_resolution((height, width), pinpoints)
    if best_width / width < best_height / height:
        fitted = (best_width, min(-(-height * best_width // width), best_height))
    else:
        fitted = (min(-(-width * best_height // height), best_width), best_height)
    canvas = Image.new("RGB", (best_width, best_height), (0, 0, 0))
    canvas.paste(mask.resize(fitted, Image.Resampling.BICUBIC),
                 ((best_width - fitted[0]) // 2, (best_height - fitted[1]) // 2))
    grid = red_cells_of(canvas, patch)  # the tiles' cells, stitched back in place
    rows, cols = grid.shape
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        grid = grid[(rows - kept) // 2 : rows - (rows - kept) // 2]
    else:
        kept = int(round(width * (rows / height), 7))
        grid = grid[:, (cols - kept) // 2 : cols - (cols - kept) // 2]
    return base.flatten().tolist() + [cell for row in grid.tolist() for cell in [*row, False]]


def tokenizer_image_token(prompt: str, tokenizer, image_ids: list[int]) -> list[int]:
    """LLaVA's `tokenizer_image_token`, with the placeholder's one image token replaced by the image-token run."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    ids += chunks[0][offset:] + image_ids + chunks[1][offset:]
    return ids


def image_tokens(example, cells) -> list[int]:
    return sorted(example.layout["image"][cell] for cell in cells)


# --- square_pad -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 30), (30, 50)], ids=["wide", "tall"])
def test_square_pad_gives_the_pixels_of_llavas_expand2square(llava, tiny_folder, size):
    image = scene(*size, seed=3)
    llava.set_preprocessing(Preprocessing(square_pad=True))
    try:
        padded = llava.prepare(image, QUESTION).inputs["pixel_values"]
    finally:
        llava.set_preprocessing(Preprocessing())
    plain = LlavaImageProcessorPil.from_pretrained(tiny_folder)
    assert not plain.do_pad
    expected = plain(expand2square(image, mean_colour(tiny_folder)), return_tensors="pt")["pixel_values"]
    assert torch.equal(padded, expected)
    assert not torch.equal(llava.prepare(image, QUESTION).inputs["pixel_values"], expected)  # default: no pad


def test_square_pad_runs_a_copy_of_the_processor_and_leaves_the_loaded_one_alone(tiny_folder):
    model = mmscope.load(tiny_folder, preprocessing=Preprocessing(square_pad=True))
    assert model.preprocessing == Preprocessing(square_pad=True)
    assert model.processor.image_processor.do_pad and not model.adapter.loaded_processor.image_processor.do_pad
    assert model.processor.tokenizer is model.tokenizer
    model.set_preprocessing(Preprocessing())
    assert model.processor is model.adapter.loaded_processor


def test_boxes_under_square_pad_select_the_patches_of_the_padded_square(llava):
    image, box = scene(40, 20, seed=4), (2, 3, 10, 6)  # a 40-px square: 10 rows of padding above, 10 below
    llava.set_preprocessing(Preprocessing(square_pad=True))
    try:
        example = llava.prepare(image, QUESTION, boxes=[box])
    finally:
        llava.set_preprocessing(Preprocessing())
    # In the padded 40 x 40 square the box spans x 2..12, y 13..19; at 32 px that is x 1.6..9.6, y 10.4..15.2
    expected = {row * 4 + col for row in (1,) for col in (0, 1)}
    assert example.layout["object"] == image_tokens(example, expected)
    assert set(example.layout["other_patches"]) == set(example.layout["image"]) - set(example.layout["object"])


# --- red-mask -------------------------------------------------------------------------------------------------------
RED_CASES = [
    ((40, 30), [(5, 5, 10, 8)]),
    ((40, 30), [(0, 0, 6, 5), (34, 25, 6, 5)]),  # corners: on the image's edges
    ((30, 50), [(0, 20, 30, 4)]),  # the full width of a tall image
    ((48, 36), [(30, 20, 12, 10), (0, 0, 3, 36)]),
]


@pytest.mark.parametrize("square_pad", [False, True], ids=["crop", "pad"])
@pytest.mark.parametrize("size, boxes", RED_CASES)
def test_red_mask_objects_equal_the_studys_mask_pixels(llava, tiny_folder, size, boxes, square_pad):
    llava.set_preprocessing(Preprocessing(square_pad=square_pad, object_patches="red-mask"))
    try:
        example = llava.prepare(scene(*size, seed=5), QUESTION, boxes=boxes)
    finally:
        llava.set_preprocessing(Preprocessing())
    expected = red_mask_tokens(size, boxes, mean_colour(tiny_folder) if square_pad else None)
    assert example.layout["object"] == image_tokens(example, expected)
    assert example.layout["other_patches"] == image_tokens(example, set(range(16)) - expected)


def test_red_mask_spills_one_pixel_past_a_box_ending_on_a_patch_boundary(llava):
    image, box = scene(32, 32, seed=6), (8, 8, 8, 4)  # x 8..16: the right edge is the boundary of columns 1 and 2
    overlap = llava.prepare(image, QUESTION, boxes=[box]).layout
    llava.set_preprocessing(Preprocessing(object_patches="red-mask"))
    try:
        red = llava.prepare(image, QUESTION, boxes=[box]).layout
    finally:
        llava.set_preprocessing(Preprocessing())
    assert overlap["object"] == [overlap["image"][5]]  # row 1, column 1
    assert red["object"] == [red["image"][5], red["image"][6]]  # and column 2, through its pixel column 16
    assert set(red["object"]) - set(overlap["object"]) == {red["image"][6]}


@pytest.mark.parametrize("size, boxes", RED_CASES)
def test_red_mask_on_llava_next_reads_both_views_as_the_study_would(tmp_path_factory, size, boxes):
    model = load_family("llava_next", tmp_path_factory).model
    model.set_preprocessing(Preprocessing(object_patches="red-mask"))
    try:
        example = model.prepare(scene(*size, seed=11), QUESTION, boxes=boxes)
    finally:
        model.set_preprocessing(Preprocessing())
    layout = example.layout
    hits = llava_next_red_mask_tokens(size, boxes, model.hf.config.image_grid_pinpoints)
    assert len(hits) == len(layout["image"])
    assert layout["object"] == [p for p, hit in zip(layout["image"], hits, strict=True) if hit]
    assert set(layout["object"]) & set(layout["image_grid"])  # (a thin box may leave no exactly red base pixel)
    assert sorted(layout["object"] + layout["other_patches"] + layout["image_newline"]) == layout["image"]


# --- prompt_chunks --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefix_folder(tmp_path_factory):
    """A tiny LLaVA whose tokenizer prepends "▁" to every text it tokenises, as Llama's SentencePiece does: the
    text after `<image>` tokenised on its own then starts with a "▁" the whole prompt's tokens lack."""
    tokenizer = word_tokenizer([template_text(LLAVA_15), QUESTION, *QUESTIONS, "▁"], ["<image>"], bos="<s>",
                               add_bos=True, newlines=True, extra_special_tokens={"image_token": "<image>"})
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # spaces become "▁", one leads the text
        pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(r"\n|[A-Za-z0-9]+|[^\sA-Za-z0-9]"), behavior="isolated"),
    ])
    model, processor = build_llava(tokenizer, TinyLlavaSpec(), seed=2)
    return save_llava(model, processor, tmp_path_factory.mktemp("prefix-llava"))


@pytest.mark.parametrize("question", [QUESTION, QUESTIONS[1]])
def test_prompt_chunks_tokenise_as_llavas_tokenizer_image_token(prefix_folder, question):
    model = mmscope.load(prefix_folder, preprocessing=Preprocessing(prompt_chunks=True))
    example = model.prepare(scene(seed=7), question)
    prompt, _ = LLAVA_15.render(question, "<image>")
    tokenizer, image_id = model.tokenizer, model.adapter.image_token_id
    expected = tokenizer_image_token(prompt, tokenizer, [image_id] * 16)
    ids = example.inputs["input_ids"][0].tolist()
    assert ids == expected
    assert ids != mmscope.load(prefix_folder).prepare(scene(seed=7), question).inputs["input_ids"][0].tolist()
    assert example.inputs["attention_mask"].tolist() == [[1] * len(expected)]
    # The question's tokens: those of the text after <image> whose characters lie in the question.
    tail = prompt.split("<image>")[1]
    start = tail.index(question)
    encoded = tokenizer(tail, return_offsets_mapping=True)
    first_tail = len(ids) - len(encoded.input_ids) + 1  # the tail's own BOS dropped
    question_tokens = [first_tail + i - 1 for i, (s, e) in enumerate(encoded.offset_mapping)
                       if e > s and s < start + len(question) and e > start]
    assert example.layout["question"] == question_tokens
    words = tokenizer.convert_ids_to_tokens([ids[p] for p in question_tokens])
    assert "".join(words).replace("▁", "") == "".join(question.lower().split())
    assert example.layout["image"] == [p for p, token in enumerate(ids) if token == image_id]
    assert example.layout["last"] == [len(ids) - 1]


def test_prompt_chunks_on_llava_next_keep_its_image_run_and_sizes(tmp_path_factory):
    model = load_family("llava_next", tmp_path_factory).model
    plain = model.prepare(scene(40, 30, seed=8), QUESTION)
    model.set_preprocessing(Preprocessing(prompt_chunks=True, object_patches="red-mask"))
    try:
        chunked = model.prepare(scene(40, 30, seed=8), QUESTION, boxes=[(5, 5, 10, 8)])
    finally:
        model.set_preprocessing(Preprocessing())
    prompt, _ = LLAVA_15.render(QUESTION, "<image>")
    n_image = len(plain.layout["image"])
    expected = tokenizer_image_token(prompt, model.tokenizer, [model.adapter.image_token_id] * n_image)
    assert chunked.inputs["input_ids"][0].tolist() == expected
    assert torch.equal(chunked.inputs["pixel_values"], plain.inputs["pixel_values"])
    assert torch.equal(chunked.inputs["image_sizes"], plain.inputs["image_sizes"])
    assert set(chunked.layout["object"]) <= set(chunked.layout["image_base"]) | set(chunked.layout["image_grid"])
    assert chunked.layout["object"] and not set(chunked.layout["object"]) & set(chunked.layout["image_newline"])


# --- random_patches -------------------------------------------------------------------------------------------------
def test_random_patches_are_a_reproducible_draw_from_the_other_patches(llava):
    image, boxes = scene(seed=9), [(5, 5, 10, 8)]
    first = llava.prepare(image, QUESTION, boxes=boxes).layout
    again = llava.prepare(image, QUESTION, boxes=boxes).layout
    drawn = first["random_patches"]
    assert drawn == again["random_patches"]
    assert len(drawn) == len(first["object"]) == 4 and not set(drawn) & set(first["object"])
    assert set(drawn) <= set(first["other_patches"]) and drawn == sorted(set(drawn))
    # Seeded by SHA-256 of (seed, question, object positions): no salted hash, so any process draws the same.
    key = json.dumps([0, QUESTION, first["object"]]).encode()
    expected = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).sample(
        first["other_patches"], 4)
    assert drawn == sorted(expected)
    by_seed = {tuple(llava.prepare(image, QUESTION, boxes=boxes, control_seed=seed).layout["random_patches"])
               for seed in range(8)}
    by_question = {tuple(llava.prepare(image, question, boxes=boxes).layout["random_patches"])
                   for question in (QUESTION, *QUESTIONS[1:], "Is the sphere left?", "What color is the cube?")}
    assert len(by_seed) > 1 and len(by_question) > 1


def test_random_patches_are_left_out_when_the_object_outnumbers_the_rest(llava):
    layout = llava.prepare(scene(32, 32, seed=10), QUESTION, boxes=[(0, 0, 30, 20)]).layout
    assert len(layout["object"]) > len(layout["other_patches"]) and "random_patches" not in layout
    assert "random_patches" in BOX_GROUPS and "random_patches" in llava.groups


def test_control_seed_must_be_a_whole_number(llava):
    with pytest.raises(InputError, match="control_seed"):
        llava.prepare(scene(), QUESTION, boxes=[(5, 5, 10, 8)], control_seed="1")


# --- the setting itself, and refusals -------------------------------------------------------------------------------
def test_the_study_setting_and_its_record(study):
    assert Preprocessing.study() == Preprocessing(square_pad=True, prompt_chunks=True, object_patches="red-mask")
    record = study.preprocessing.to_dict()
    assert record == {"square_pad": True, "prompt_chunks": True, "object_patches": "red-mask"}
    assert Preprocessing.from_dict(record) == Preprocessing.study()
    assert repr(Preprocessing()) == "Preprocessing(square_pad=False, prompt_chunks=False, object_patches='overlap')"
    example = study.prepare(scene(), QUESTION, boxes=[(5, 5, 10, 8)])
    assert {"object", "other_patches", "random_patches", "question"} <= set(example.layout)
    with pytest.raises(InputError, match="unknown preprocessing knob 'square_padding'.*did you mean 'square_pad'"):
        Preprocessing.from_dict({"square_padding": True})
    with pytest.raises(InputError, match="object_patches 'redmask' is not a rule.*did you mean 'red-mask'"):
        Preprocessing(object_patches="redmask")
    with pytest.raises(InputError, match="square_pad must be True or False"):
        Preprocessing(square_pad="yes")


@pytest.mark.parametrize("family, knob, setting", [
    ("llava_next", "square_pad", Preprocessing(square_pad=True)),
    ("paligemma", "square_pad", Preprocessing(square_pad=True)),
    ("paligemma", "prompt_chunks", Preprocessing(prompt_chunks=True)),
    ("paligemma", "object_patches='red-mask'", Preprocessing(object_patches="red-mask")),
    ("qwen2_vl", "prompt_chunks", Preprocessing(prompt_chunks=True)),
])
def test_a_knob_the_family_cannot_do_is_refused_in_one_line(tmp_path_factory, family, knob, setting):
    model = load_family(family, tmp_path_factory).model
    with pytest.raises(UnsupportedModelError) as refused:
        model.set_preprocessing(setting)
    message = str(refused.value)
    assert f"Preprocessing.{knob}" in message and model.adapter.family in message and "\n" not in message
    assert model.preprocessing == Preprocessing()

"""The instruction-tuning mix of the embedded model's recipe: captions read off the scene graph, true/false
statements, and multi-turn sequences whose only supervised tokens are the answers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from conftest import TINY_TRAINING_SPEC as SPEC

from mmscope.data.scene_graphs import read_scene_graphs
from mmscope.zoo.build import build_llava, build_word_tokenizer
from mmscope.zoo.shapes_llava.instructions import CAPTION_REQUEST, TurnPool
from mmscope.zoo.shapes_llava.train import IGNORE, Batcher, ImageSet, TrainConfig, follow_up_of, prompt_of, train


@pytest.fixture(scope="module")
def pool_and_rows(world):
    from mmscope.data.synthetic import load_synthetic

    rows = load_synthetic(world, "train")
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    pool = TurnPool(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, list(rows["image_id"]),
                    list(rows["question"]), list(rows["answer"]), seed=0)
    return pool, rows


def test_a_caption_names_every_object_first_then_its_attributes_and_the_third_of_the_image_it_lies_in(world,
                                                                                                    pool_and_rows):
    pool, _ = pool_and_rows
    graphs = list(read_scene_graphs(world / "sceneGraphs" / "train_sceneGraphs.json"))
    rng = random.Random(0)
    for graph in graphs:
        request, caption = pool.caption(graph.image_id, rng)
        assert request == CAPTION_REQUEST
        phrases = caption.split(" and ")
        assert sorted(phrase.split()[0] for phrase in phrases) == sorted(obj.name for obj in graph.objects)
        for obj in graph.objects:
            words = next(phrase for phrase in phrases if phrase.split()[0] == obj.name).split()
            assert set(words[1:-2]) == set(obj.attributes)
            x, y, w, h = obj.box
            centre_x, centre_y = (x + w / 2) / graph.width, (y + h / 2) / graph.height
            assert words[-2] == ("left" if centre_x < 1 / 3 else "center" if centre_x < 2 / 3 else "right")
            assert words[-1] == ("top" if centre_y < 1 / 3 else "middle" if centre_y < 2 / 3 else "bottom")


def test_captions_without_positions_hold_the_same_objects_and_no_position_word(world, pool_and_rows):
    pool, rows = pool_and_rows
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    bare = TurnPool(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, list(rows["image_id"]),
                    list(rows["question"]), list(rows["answer"]), seed=0, positions=False)
    for image_id, phrases in pool.objects.items():
        assert bare.objects[image_id] == [" ".join(phrase.split()[:-2]) for phrase in phrases]


def test_statements_are_true_exactly_when_the_scene_graph_says_so(world, pool_and_rows):
    pool, _ = pool_and_rows
    graphs = {g.image_id: g for g in read_scene_graphs(world / "sceneGraphs" / "train_sceneGraphs.json")}
    seen = set()
    for image_id, statements in pool.statements.items():
        for question, answer in statements:
            assert question.startswith("True or false: There is ")
            words = question.removeprefix("True or false: There is ").rstrip(".").split()
            if " of " in question or words[2] in ("above", "below"):
                continue  # relations: checked through the probing tests' own statements
            *attributes, name = [w for w in words if w not in ("a", "an")]
            holds = any(o.name == name and set(attributes) <= set(o.attributes) for o in graphs[image_id].objects)
            assert answer == ("true" if holds else "false"), question
            seen.add(answer)
    assert seen == {"true", "false"}


def test_draw_gives_the_requested_mix_and_never_repeats_a_question(pool_and_rows):
    pool, rows = pool_and_rows
    rng = random.Random(1)
    image_id = rows["image_id"][0]
    own = {(q, a) for q, a, i in zip(rows["question"], rows["answer"], rows["image_id"]) if i == image_id}
    questions_only = pool.draw(0, image_id, 3, 0.0, 0.0, rng)
    assert len(questions_only) == 3 and len(set(questions_only)) == 3 and set(questions_only) <= own
    assert (rows["question"][0], rows["answer"][0]) not in questions_only  # the first turn is row 0 itself
    captions = pool.draw(0, image_id, 4, 1.0, 0.0, rng)
    assert all(question == CAPTION_REQUEST for question, _ in captions)
    described = pool.draw(0, image_id, 4, 0.0, 0.0, rng, description_share=1.0)
    phrases = {phrase.split()[0]: " ".join(phrase.split()[1:]) for phrase in pool.objects[image_id]}
    for question, answer in described:
        name = question.removeprefix("Describe the ").removesuffix(".")
        assert question == f"Describe the {name}." and phrases[name] == answer
    mixed = [question.startswith("Describe the ") for question, _ in pool.draw(0, image_id, 6, 0.0, 0.0, rng,
                                                                                description_share=0.5)]
    assert mixed == sorted(mixed)  # the image's questions before any description of its objects
    statements = pool.draw(0, image_id, 4, 0.0, 1.0, rng)
    assert all(turn in pool.statements[image_id] for turn in statements)
    many = pool.draw(0, image_id, 40, 0.0, 0.0, rng)  # more than the image has: captions fill in
    assert sum(question == CAPTION_REQUEST for question, _ in many) == 40 - (len(own) - 1)


def test_a_multi_turn_batch_supervises_exactly_each_turns_answer_and_its_end_token(world, pool_and_rows):
    pool, rows = pool_and_rows
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]) + pool.corpus())
    model, processor = build_llava(tokenizer, SPEC, seed=0)
    images = ImageSet(processor, rows)
    batcher = Batcher(processor, rows, images, turns=pool, extra_turns=3, caption_share=0.3, statement_share=0.3,
                      seed=4)
    indices = [0, 5, 9]
    batch = batcher(indices)
    replay = random.Random(4)  # the same draws, made independently
    image_token = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    for b, index in enumerate(indices):
        turns = [(rows["question"][index], rows["answer"][index])]
        turns += pool.draw(index, rows["image_id"][index], 3, 0.3, 0.3, replay)
        kept = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][kept].tolist(), batch["labels"][b][kept].tolist()
        text = prompt_of(turns[0][0]).replace("<image>", "<image>" * batcher.n_image_tokens)
        expected_ids, expected_labels = tokenizer(text)["input_ids"], []
        expected_labels = [IGNORE] * len(expected_ids)
        for n, (question, answer) in enumerate(turns):
            if n:
                prompt = tokenizer(follow_up_of(question, question != CAPTION_REQUEST), add_special_tokens=False)
                prompt = prompt["input_ids"]
                expected_ids += prompt
                expected_labels += [IGNORE] * len(prompt)
            reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            expected_ids += reply
            expected_labels += reply
        assert ids == expected_ids and labels == expected_labels
        assert ids.count(image_token) == batcher.n_image_tokens  # one image, at the start
        assert ids.count(tokenizer.eos_token_id) == 4
    # Padding is never supervised, and positions count only real tokens.
    assert (batch["labels"][~batch["attention_mask"].bool()] == IGNORE).all()
    real = batch["attention_mask"].bool()
    assert all(batch["position_ids"][b][real[b]].tolist() == list(range(int(real[b].sum()))) for b in range(3))
    assert follow_up_of("Is it?") == " USER: Is it? \nAnswer the question using a single word or phrase. ASSISTANT:"
    assert follow_up_of(CAPTION_REQUEST, instruction=False) == f" USER: {CAPTION_REQUEST} ASSISTANT:"


def test_a_caption_batch_asks_each_image_for_its_caption_without_the_short_answer_instruction(pool_and_rows):
    pool, rows = pool_and_rows
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]) + pool.corpus())
    model, processor = build_llava(tokenizer, SPEC, seed=0)
    batcher = Batcher(processor, rows, ImageSet(processor, rows), turns=pool, extra_turns=3, seed=2)
    indices = [1, 4]
    batch = batcher(indices, captions=True)
    replay = random.Random(2)
    for b, index in enumerate(indices):
        _, caption = pool.caption(rows["image_id"][index], replay)
        kept = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][kept], batch["labels"][b][kept]
        assert tokenizer.decode(labels[labels != IGNORE]) == caption + " </s>"
        prompt = tokenizer.decode(ids[labels == IGNORE])
        assert "describe the image . assistant :" in prompt and "single word" not in prompt
        assert ids.tolist().count(tokenizer.eos_token_id) == 1  # one turn: no follow-ups
    with pytest.raises(ValueError, match="extra_turns=3 needs a TurnPool"):
        Batcher(processor, rows, ImageSet(processor, rows), extra_turns=3)


def test_a_first_statement_replaces_the_question_and_its_object_targets(world, pool_and_rows):
    from mmscope.zoo.shapes_llava.targets import SceneTargets

    pool, rows = pool_and_rows
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]) + pool.corpus())
    model, processor = build_llava(tokenizer, SPEC, seed=0)
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    targets = SceneTargets(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, 4, SPEC.image_size)
    batcher = Batcher(processor, rows, ImageSet(processor, rows), targets=targets, turns=pool,
                      first_statement_share=0.5, seed=3)
    indices = list(range(12))
    batch = batcher(indices)
    replay = random.Random(3)  # the same draws, made independently
    stated = 0
    for b, index in enumerate(indices):
        own = pool.statements.get(rows["image_id"][index], [])
        if replay.random() < 0.5 and own:
            question, answer = replay.choice(own)
            stated += 1
            assert (batch["mention_positions"][b] == -1).all()  # a statement carries no object targets
        else:
            question, answer = rows["question"][index], rows["answer"][index]
        kept = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][kept], batch["labels"][b][kept]
        assert tokenizer.decode(labels[labels != IGNORE]) == f"{answer.lower()} </s>"
        assert question.lower().rstrip("?.").split()[-1] in tokenizer.decode(ids[labels == IGNORE])
    assert 0 < stated < len(indices)
    with pytest.raises(ValueError, match="first_statement_share=0.5 needs a TurnPool"):
        Batcher(processor, rows, ImageSet(processor, rows), first_statement_share=0.5)


def test_an_empty_image_row_shows_a_flat_colour_and_is_answered_by_one_of_its_options_at_random(world,
                                                                                               pool_and_rows):
    from mmscope.zoo.shapes_llava.batches import CATEGORY_OPTIONS, FLAT_COLOURS
    from mmscope.zoo.shapes_llava.targets import SceneTargets

    pool, rows = pool_and_rows
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]) + pool.corpus())
    model, processor = build_llava(tokenizer, SPEC, seed=0)
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    targets = SceneTargets(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, 4, SPEC.image_size)
    images = ImageSet(processor, rows)
    assert (0, 0, 0) not in FLAT_COLOURS  # black, the evaluation's blank image, is never trained on
    blanked = Batcher(processor, rows, images, targets=targets, turns=pool, extra_turns=1, statement_share=0.5,
                      seed=5, blank_share=0.5)
    frozen = Batcher(processor, rows, images, images.features(model), targets, turns=pool, extra_turns=1,
                     statement_share=0.5, seed=5, blank_share=0.5, flat_features=images.features(model, flat=True))
    indices = list(range(40))
    batch, cached = blanked(indices), frozen(indices)
    replay = random.Random(5)  # the same draws, made independently: first which rows are empty, then the turns
    empty = {}
    for index in indices:
        row = rows[index]
        options = ((row["true_option"], row["false_option"]) if row["true_option"]
                   else CATEGORY_OPTIONS.get(row["category"]))
        if replay.random() < 0.5 and options:
            empty[index] = (options, replay.choice(options), replay.randrange(len(FLAT_COLOURS)))
    for b, index in enumerate(indices):
        row = rows[index]
        kept = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][kept], batch["labels"][b][kept]
        if index in empty:
            options, answer, colour = empty[index]
            flat = processor.image_processor([Image.new("RGB", row["image"].size, FLAT_COLOURS[colour])],
                                             return_tensors="pt")["pixel_values"][0]
            assert torch.equal(batch["pixel_values"][b], flat)
            assert torch.equal(cached["image_features"][b], images.features(model, flat=True)[colour])
            assert (batch["patch_labels"][b] == IGNORE).all() and (batch["mention_positions"][b] == -1).all()
            assert ids.tolist().count(tokenizer.eos_token_id) == 1  # no turn about a scene it does not show
            assert tokenizer.decode(labels[labels != IGNORE]) == f"{answer.lower()} </s>"
            assert answer in options
        else:
            turns = pool.draw(index, row["image_id"], 1, 0.0, 0.5, replay)
            assert torch.equal(batch["pixel_values"][b], images.pixel_values[images.index[row["image_id"]]])
            assert tokenizer.decode(labels[labels != IGNORE]).startswith(f"{row['answer'].lower()} </s>")
            assert ids.tolist().count(tokenizer.eos_token_id) == 1 + len(turns)
    assert 5 < len(empty) < 35
    with pytest.raises(ValueError, match="blank_share=0.5 with cached features needs"):
        Batcher(processor, rows, images, images.features(model), blank_share=0.5)


def test_empty_image_answers_spread_evenly_over_the_options(world, pool_and_rows):
    from collections import Counter

    pool, rows = pool_and_rows
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]) + pool.corpus())
    model, processor = build_llava(tokenizer, SPEC, seed=0)
    batcher = Batcher(processor, rows, ImageSet(processor, rows), seed=1, blank_share=1.0)
    index = next(i for i, row in enumerate(rows) if row["true_option"])
    answers = Counter()
    for _ in range(20):
        batch = batcher([index] * 20)
        answers.update(tokenizer.decode(ids[mask]) for ids, mask in zip(batch["answer_ids"], batch["answer_mask"]))
    expected = {rows[index]["true_option"] + " </s>", rows[index]["false_option"] + " </s>"}
    assert set(answers) == expected and min(answers.values()) > 160  # 400 draws, each option about 200


def test_a_multi_turn_run_without_internal_losses_resumes_to_the_uninterrupted_weights(world, tmp_path):
    import mmscope.zoo.shapes_llava.train as recipe
    from safetensors.torch import load_file

    settings = dict(data=str(world), vision_steps=1, steps=4, batch_size=2, vision_batch_size=2, warmup=1,
                    eval_every=2, eval_questions=4, grounding_loss_weight=0.0, attention_loss_weight=0.0,
                    gather_loss_weight=0.0, named_loss_weight=0.0, freeze_vision=True, turns=3, caption_steps=3,
                    caption_share=0.3, statement_share=0.3, grounding_layer=1, attention_layer=1, gather_layer=2,
                    bf16=False, spec=SPEC)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **settings))
    log = json.loads((whole / "training.json").read_text())
    assert all(record["grounding_loss"] == 0 for record in log["history"] if "step" in record)

    class Stop(Exception):
        pass

    def stop(path, state):
        save(path, state)
        raise Stop

    save = recipe._save_resume
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "_save_resume", stop)
        with pytest.raises(Stop):
            train(TrainConfig(out=str(tmp_path / "killed"), **settings))
    resumed = train(TrainConfig(out=str(tmp_path / "killed"), **settings))
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = train(TrainConfig(out=str(tmp_path / "other"), **{**settings, "caption_steps": 1}))
    assert not all(torch.equal(first[name], value) for name, value in load_file(other / "model.safetensors").items())

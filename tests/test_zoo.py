"""`mmscope.zoo`: the shapes-llava training recipe's auxiliary targets, checked against the scene graphs read
independently."""

from __future__ import annotations

import json

import pytest

from mmscope.data.synthetic import load_synthetic
from mmscope.zoo.build import TinyLlavaSpec, build_llava, build_word_tokenizer
from mmscope.errors import MMScopeError
from mmscope.zoo.shapes_llava.batches import Batcher, BatchError, ImageSet
from mmscope.zoo.shapes_llava.config import TrainConfigError
from mmscope.zoo.shapes_llava.targets import IGNORE, SceneTargets


@pytest.fixture(scope="module")
def batch_and_rows(tmp_path_factory):
    from mmscope.data import synthesize

    folder = tmp_path_factory.mktemp("train-world")
    synthesize(folder, 40, seed=7, image_size=64, progress=False)
    rows = load_synthetic(folder, "train")
    tokenizer = build_word_tokenizer(list(rows["question"]) + list(rows["answer"]))
    spec = TinyLlavaSpec(image_size=64, patch_size=8, text_layers=2, vision_layers=1)
    model, processor = build_llava(tokenizer, spec)
    world = json.loads((folder / "world.json").read_text())
    graphs = json.loads((folder / "sceneGraphs" / "train_sceneGraphs.json").read_text())
    targets = SceneTargets(folder / "sceneGraphs" / "train_sceneGraphs.json", world["vocabulary"], grid=8,
                           image_size=64)
    indices = list(range(min(48, len(rows))))
    images = ImageSet(processor, rows)
    batcher = Batcher(processor, rows, images, images.features(model), targets)
    return batcher(indices), rows.select(indices), tokenizer, world["vocabulary"], graphs, model, processor, batcher


def test_mention_targets_sit_on_the_mentioned_word_and_describe_that_object(batch_and_rows):
    batch, rows, tokenizer, vocabulary, graphs, *_ = batch_and_rows
    checked = absent = 0
    for b, row in enumerate(rows):
        for m, (name, object_id) in enumerate(zip(row["object_names"], row["object_ids"])):
            position = int(batch["mention_positions"][b, m])
            token = tokenizer.convert_ids_to_tokens(int(batch["input_ids"][b, position]))
            assert token in (name, f"{name}s"), (row["question"], name, token)
            labels = batch["mention_labels"][b, m].tolist()
            if not object_id:
                assert labels[0] == 0 and all(label == IGNORE for label in labels[1:])
                absent += 1
                continue
            obj = graphs[row["image_id"]]["objects"][object_id]
            present, shape, color, size, material, column, row_bin = labels
            assert present == 1
            assert vocabulary["shapes"][shape] == obj["name"]
            assert {vocabulary["colors"][color], vocabulary["sizes"][size], vocabulary["materials"][material]} \
                == set(obj["attributes"])
            assert (column, row_bin) == (int((obj["x"] + obj["w"] / 2) // 8), int((obj["y"] + obj["h"] / 2) // 8))
            checked += 1
        for m in range(len(row["object_names"]), batch["mention_positions"].shape[1]):
            assert int(batch["mention_positions"][b, m]) == -1
    assert checked > 20 and absent > 0


def test_named_targets_say_whether_each_mentioned_object_has_the_value_the_question_names(batch_and_rows):
    batch, rows, _, vocabulary, graphs, *_ = batch_and_rows
    values = {*vocabulary["colors"], *vocabulary["sizes"], *vocabulary["materials"]}
    seen = set()
    for b, row in enumerate(rows):
        words = row["question"].lower().rstrip("?").replace(",", "").split()
        value = next((word for word in words if word in values), None)
        for m in range(batch["mention_named"].shape[1]):
            label = int(batch["mention_named"][b, m, 0])
            if m >= len(row["object_names"]) or value is None:
                assert label == IGNORE, (row["question"], m)
                continue
            object_id = row["object_ids"][m]
            expected = int(bool(object_id) and value in graphs[row["image_id"]]["objects"][object_id]["attributes"])
            assert label == expected, (row["question"], row["object_names"][m], object_id)
            seen.add((row["category"], label))
    assert {("LogicalObj", 0), ("LogicalObj", 1)} <= seen  # both outcomes occur, for present and absent objects


def test_patch_targets_mark_the_patch_under_each_object_centre(batch_and_rows):
    batch, rows, _, vocabulary, graphs, *_ = batch_and_rows
    for b, row in enumerate(rows):
        objects = list(graphs[row["image_id"]]["objects"].values())
        labels = batch["patch_labels"][b]
        for obj in objects:
            patch = int((obj["y"] + obj["h"] / 2) // 8) * 8 + int((obj["x"] + obj["w"] / 2) // 8)
            assert vocabulary["shapes"][int(labels[patch, 0]) - 1] == obj["name"]
        assert (labels[:, 0] > 0).sum() >= len(objects)  # every object covers at least its centre patch
        assert labels[:, 4].tolist() == list(range(8)) * 8  # the patch's own column and row
        assert labels[:, 5].tolist() == [row for row in range(8) for _ in range(8)]


def test_object_patches_are_image_tokens_inside_the_box_and_the_attention_loss_reads_them(batch_and_rows):
    import torch

    from mmscope.zoo.shapes_llava.objective import attention_loss

    batch, rows, tokenizer, _, graphs, *_ = batch_and_rows
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    b, m = next((b, m) for b in range(len(rows)) for m in range(2) if batch["mention_patches"][b, m].any())
    start = int(batch["image_start"][b])
    assert (batch["input_ids"][b, start : start + 64] == image_token).all()
    assert batch["input_ids"][b, start - 1] != image_token
    obj = graphs[rows[b]["image_id"]]["objects"][rows[b]["object_ids"][m]]
    for patch in batch["mention_patches"][b, m].nonzero().flatten().tolist():
        centre_x, centre_y = (patch % 8 + 0.5) * 8, (patch // 8 + 0.5) * 8
        assert obj["x"] <= centre_x < obj["x"] + obj["w"] and obj["y"] <= centre_y < obj["y"] + obj["h"]
    # Weights that put all of each mention's mass on its object's patches give loss 0; uniform weights give
    # -log(share of the image covered), averaged over valid mentions.
    length = batch["input_ids"].shape[1]
    perfect = torch.zeros(len(rows), length, length)
    uniform = torch.full((len(rows), length, length), 1 / 64)
    valid = []
    for i in range(len(rows)):
        for j in range(2):
            patches = batch["mention_patches"][i, j]
            if patches.any():
                row = int(batch["mention_positions"][i, j])
                s = int(batch["image_start"][i])
                perfect[i, row, s : s + 64] = patches / patches.sum()
                valid.append(-torch.log(patches.sum() / 64 + 1e-6))
    assert attention_loss(perfect, batch).item() < 1e-4
    assert abs(attention_loss(uniform, batch).item() - torch.stack(valid).mean().item()) < 1e-4


def test_stage_two_forward_from_cached_features_equals_the_models_own_forward(batch_and_rows):
    import torch

    from mmscope.zoo.shapes_llava.objective import answer_logits
    from mmscope.zoo.shapes_llava.prompts import prompt_of

    _, rows, _, _, _, model, processor, batcher = batch_and_rows
    model.eval()
    n = 6
    small = batcher(list(range(n)))
    ours = answer_logits(model, small)
    # The model's own path: the processor on the images and prompts, the full forward, teacher-forced answer.
    encoded = processor(images=[image.convert("RGB") for image in rows.select(range(n))["image"]],
                        text=[prompt_of(q) for q in rows.select(range(n))["question"]], return_tensors="pt",
                        padding=True)
    assert torch.equal(encoded["input_ids"], small["input_ids"][:, : encoded["input_ids"].shape[1]])
    with torch.no_grad():
        logits = model(input_ids=small["input_ids"], attention_mask=small["attention_mask"],
                       position_ids=small["position_ids"], pixel_values=encoded["pixel_values"]).logits
    start = int(small["answer_start"])
    torch.testing.assert_close(ours, logits[:, start : start + small["answer_ids"].shape[1]], atol=1e-5, rtol=1e-4)


def test_stage_two_forward_from_pixels_equals_the_one_from_cached_features(batch_and_rows):
    import torch

    from mmscope.zoo.shapes_llava.objective import answer_logits

    _, _, _, _, _, model, processor, batcher = batch_and_rows
    model.eval()
    from_pixels = Batcher(processor, batcher.dataset, batcher.images)(list(range(6)))
    assert "pixel_values" in from_pixels and "image_features" not in from_pixels
    torch.testing.assert_close(answer_logits(model, from_pixels), answer_logits(model, batcher(list(range(6)))),
                               atol=1e-5, rtol=1e-4)


def test_last_position_loss_reads_each_mention_at_the_token_before_the_answer(batch_and_rows):
    import torch

    from mmscope.zoo.shapes_llava.objective import AuxiliaryHeads, last_position_loss

    batch, rows, tokenizer, *_ = batch_and_rows
    torch.manual_seed(0)
    heads = torch.nn.ModuleList(AuxiliaryHeads(16, {"a": 2, "b": 3}) for _ in range(2))
    labels = torch.full((len(rows), 2, 2), IGNORE)
    labels[:, 0, 0] = torch.arange(len(rows)) % 2
    labels[::2, 1, 1] = 2  # the second mention only in every other row
    batch = {**batch, "mention_labels": labels}
    hidden = torch.randn(len(rows), batch["input_ids"].shape[1], 16)
    start = int(batch["answer_start"])
    assert tokenizer.convert_ids_to_tokens(int(batch["input_ids"][0, start])) == ":"  # "ASSISTANT:"
    last = hidden[:, start]
    first = torch.nn.functional.cross_entropy(heads[0].heads[0](last), labels[:, 0, 0])
    second = torch.nn.functional.cross_entropy(heads[1].heads[1](last[::2]), labels[::2, 1, 1])
    expected = (first / 2 + second / 2) / 2  # each head set averages its two heads; one of each has no labels
    torch.testing.assert_close(last_position_loss(hidden, batch, heads), expected)
    hidden[:, start - 1] += 100  # any other position is not read
    torch.testing.assert_close(last_position_loss(hidden, batch, heads), expected)


def test_category_sampler_draws_by_validation_error():
    from collections import Counter

    from mmscope.zoo.shapes_llava.schedule import CategorySampler

    categories = ["A"] * 50 + ["B"] * 30 + [None] * 20
    sampler = CategorySampler(categories, focus=0.5, seed=1)
    assert sampler.names == ["(other)", "A", "B"]
    first = Counter(categories[i] for i in sampler(3000))
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in first.values())  # uniform over categories, not rows
    sampler.update({"all": 0.7, "A": 1.0, "B": 0.4})  # errors A 0, B 0.6, other the mean 0.3
    assert sampler.weights == pytest.approx([1 / 6 + 0.5 / 3, 1 / 6, 1 / 6 + 1 / 3])
    drawn = Counter(categories[i] for i in sampler(6000))
    assert drawn["B"] / 6000 == pytest.approx(0.5, abs=0.03) and drawn["A"] / 6000 == pytest.approx(1 / 6, abs=0.03)
    with pytest.raises(TrainConfigError) as error:
        CategorySampler(categories, focus=1.5)
    assert str(error.value) == "focus 1.5 (--focus): must lie in [0, 1] (0: uniform over categories)"


def test_a_batcher_asked_for_more_turns_without_a_pool_is_refused(batch_and_rows):
    *_, processor, batcher = batch_and_rows
    with pytest.raises(BatchError) as error:
        Batcher(processor, batcher.dataset, batcher.images, extra_turns=2)
    assert str(error.value) == "extra_turns=2 needs a TurnPool to draw them from (turns=None)"
    assert isinstance(error.value, MMScopeError) and isinstance(error.value, ValueError)

"""Train the embedded LLaVA from scratch on the synthetic GQA-format world.

The recipe is LLaVA's, shrunk: a CLIP-style vision tower, a two-layer projector and a Llama decoder, trained
end to end on (image, prompt, answer) with the study's prompt template and cross-entropy on the answer tokens
(and the end-of-sequence token).

A vision tower trained from scratch on answer-only loss learns slowly: the decoder first learns the answer
priors of each question template and sits on that plateau. So, as in region-supervised VLM pre-training, each
image token also gets a dense auxiliary target during training — the shape, colour, size and material of the
object under its patch (or background), and which half of the image the patch lies in — read by small linear
heads from the projector's output, i.e. from exactly the features the decoder sees. The heads are dropped
after training; the saved model is a plain `LlavaForConditionalGeneration`.

Binding the question's words to image regions is the other slow part. So, like grounded VLM pre-training
(region-word alignment), each object the question mentions (GQA's own annotations: the word and the object
id) gets a second auxiliary target at that word's position in a middle decoder layer: whether the object is
in the image and, if it is, its shape, colour, size, material and the row and column of its centre. The
heads again are linear and dropped after training. And one attention head of an earlier layer is taught
where to look: from the object's word, its attention mass on that object's image patches is maximised.

Comparing two objects (CompareAttr) or testing them against an attribute (LogicalObj, ChooseCat's options)
happens at the last prompt position, which first has to gather what the question's words have learned. So the
same mention targets (one set of heads per mention) are also read at the last prompt position from a later
decoder layer: by then it must know both objects. These auxiliary targets shape where information flows
(image -> question words -> last position), so interventions on the shipped model find that route by
construction; the model card says so.

Training runs in LLaVA's two stages, with the roles adapted to a model trained from scratch:
1. vision pre-training: the vision tower and projector learn the per-patch targets alone (cheap: no decoder);
2. instruction tuning: the whole model learns the answers, with all three auxiliary losses. (`freeze_vision`
   keeps the tower frozen as LLaVA does, computing its features once per image — faster per step, but here
   the attention loss then falls much more slowly: the tower's keys cannot adapt to the decoder's queries.)

Everything is seeded; the same command on the same machine type gives the same checkpoint. At every validation
the whole training state is written to `OUT/resume.pt`; the same command run again after a crash continues from
there and ends with the same weights as an uninterrupted run. That file holds only tensors and plain data and is
read with `torch.load(weights_only=True)`: one swapped into a shared run folder cannot run code. The result is
an ordinary `save_pretrained` folder with a model card.

`train` checks its `TrainConfig` before it creates or writes anything: a value outside its range is refused
with a `TrainConfigError` naming the option as `mmscope train` spells it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmscope.data.scene_graphs import GraphObject, read_scene_graphs
from mmscope.errors import MMScopeError
from mmscope.prompts import LLAVA_15, QUESTION, PromptTemplate
from mmscope.zoo.build import build_llava, build_word_tokenizer, save_llava, words_of
from mmscope.zoo.shapes_llava.config import (  # declared without torch (for the command line); importable here too
    LOSSES,
    TrainConfig,
    TrainConfigError,
)
from mmscope.zoo.shapes_llava.instructions import CAPTION_REQUEST, TurnPool


class TrainingStateError(MMScopeError, ValueError):
    """`OUT/resume.pt` is not a training state this run can continue."""


def prompt_of(question: str, instruction: bool = True) -> str:
    """The study's single-turn prompt for `question`; without the short-answer instruction when `instruction` is
    False (a request for a caption)."""
    return (LLAVA_15 if instruction else _UNINSTRUCTED).render(question)[0]


_UNINSTRUCTED = PromptTemplate(tuple(part for part in LLAVA_15.parts if part[0] != "instruction"))


def _follow_up_template(instruction: bool) -> str:
    """The template from its first role marker on, without the image and the blank after it (and without the
    instruction when `instruction` is False), the question left as `{question}`."""
    parts = list(LLAVA_15.parts[next(i for i, (group, _) in enumerate(LLAVA_15.parts) if group == "roles"):])
    image = next(i for i, (group, _) in enumerate(parts) if group == "image")
    dropped = {image, image + 1} if not parts[image + 1][1].strip() else {image}
    return "".join(part for i, (group, part) in enumerate(parts)
                   if i not in dropped and (instruction or group != "instruction"))


_FOLLOW_UPS = {instruction: _follow_up_template(instruction) for instruction in (True, False)}


def follow_up_of(question: str, instruction: bool = True) -> str:
    """A later turn's prompt (`" USER: {question} \\nAnswer the question using a single word or phrase.
    ASSISTANT:"`); without the instruction when `instruction` is False (a request for a caption is no
    short-answer question)."""
    return _FOLLOW_UPS[instruction].replace(QUESTION, question)


class SceneTargets:
    """Auxiliary labels from a split's scene graphs: per image patch, and per object the question mentions."""

    def __init__(self, scene_graphs: Path, vocabulary: dict, grid: int, image_size: int) -> None:
        self.heads = {"shape": vocabulary["shapes"], "color": vocabulary["colors"], "size": vocabulary["sizes"],
                      "material": vocabulary["materials"]}
        self.grid, self.cell = grid, image_size / grid
        self.attribute_values = {value for name, values in self.heads.items() if name != "shape" for value in values}
        self.graphs = {graph.image_id: {obj.object_id: obj for obj in graph.objects}
                       for graph in read_scene_graphs(Path(scene_graphs))}

    def sizes(self) -> dict[str, int]:
        """Classes per patch head (index 0 = background), plus the patch's own column and row."""
        return {**{name: len(values) + 1 for name, values in self.heads.items()}, "column": self.grid, "row": self.grid}

    def mention_sizes(self) -> dict[str, int]:
        """Classes per mention head: present or not, then the attributes and the centre's row and column."""
        return {"present": 2, **{name: len(values) for name, values in self.heads.items()},
                "column": self.grid, "row": self.grid}

    def _values(self, obj: GraphObject) -> list[int]:
        return [values.index(obj.name if name == "shape" else next(a for a in obj.attributes if a in values))
                for name, values in self.heads.items()]

    def patches(self, image_id: str) -> torch.Tensor:
        """`[grid * grid, n_heads]` class indices, row-major like the image tokens."""
        labels = torch.zeros(self.grid, self.grid, len(self.heads) + 2, dtype=torch.long)
        labels[:, :, -2] = torch.arange(self.grid)[None, :]
        labels[:, :, -1] = torch.arange(self.grid)[:, None]
        for obj in self.graphs[image_id].values():
            cells = self._cells(obj)
            for head, value in enumerate(self._values(obj)):
                labels[:, :, head][cells] = value + 1
        return labels.reshape(self.grid * self.grid, -1)

    def _cells(self, obj: GraphObject) -> torch.Tensor:
        """`[grid, grid]`: the patches whose centre lies inside the object's box."""
        centres = (torch.arange(self.grid) + 0.5) * self.cell
        x, y, w, h = obj.box
        inside_x = (centres >= x) & (centres < x + w)
        inside_y = (centres >= y) & (centres < y + h)
        return inside_y[:, None] & inside_x[None, :]

    def object_patches(self, image_id: str, object_id: str) -> torch.Tensor:
        """`[grid * grid]` bool: the image tokens showing the object (none for an empty id)."""
        if not object_id:
            return torch.zeros(self.grid * self.grid, dtype=torch.bool)
        return self._cells(self.graphs[image_id][object_id]).flatten()

    def mention(self, image_id: str, object_id: str) -> list[int]:
        """Labels of one mentioned object (an empty id: not in the image; its other heads are ignored)."""
        if not object_id:
            return [0] + [IGNORE] * (len(self.heads) + 2)
        obj = self.graphs[image_id][object_id]
        x, y, w, h = obj.box
        column = min(self.grid - 1, int((x + w / 2) / self.cell))
        row = min(self.grid - 1, int((y + h / 2) / self.cell))
        return [1, *self._values(obj), column, row]

    def named(self, image_id: str, object_id: str, words: list[str]) -> int:
        """1 if the object has the first attribute value among the question's `words` ("Is there a cube or a cone
        that is *green*?"), 0 if it lacks it or is not in the image; `IGNORE` when the question names no value.

        Only the last prompt position can be asked this: at the object's own word the value may not be read yet."""
        value = next((word for word in words if word in self.attribute_values), None)
        if value is None:
            return IGNORE
        if not object_id:
            return 0
        return int(value in self.graphs[image_id][object_id].attributes)


IGNORE = -100  # cross-entropy's ignore_index
MAX_MENTIONS = 2  # objects a question names (CompareAttr, ChooseRel, LogicalObj name two)


def mention_positions(words: list[str], mentions: list[str]) -> list[int]:
    """Index in `words` of each mentioned word (or its plural), first occurrence, as GQA's annotations count."""
    positions = []
    for mention in mentions:
        hits = [i for i, word in enumerate(words) if word in (mention, f"{mention}s")]
        positions.append(hits[0] if hits else -1)
    return positions


class ImageSet:
    """The distinct images of a GQA-format split, preprocessed once by the real image processor.

    `features(model)` runs the vision tower once over all of them and keeps the projector's input, so that a
    stage 2 with a frozen tower never repeats that work."""

    def __init__(self, processor, dataset, batch_size: int = 512) -> None:
        first: dict[str, int] = {}
        for index, image_id in enumerate(dataset["image_id"]):
            first.setdefault(image_id, index)
        self.ids = list(first)
        self.index = {image_id: i for i, image_id in enumerate(self.ids)}
        chunks = []
        for start in tqdm(range(0, len(self.ids), batch_size), desc="preprocessing images", unit="batch",
                          leave=False):
            rows = dataset.select([first[i] for i in self.ids[start : start + batch_size]])
            images = [image.convert("RGB") for image in rows["image"]]
            chunks.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
        self.pixel_values = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def features(self, model, batch_size: int = 256) -> torch.Tensor:
        """`[n_images, P, D_vision]`: the vision features the projector reads (its input)."""
        captured = []
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            for start in range(0, len(self), batch_size):
                image_features(model, self.pixel_values[start : start + batch_size])
        finally:
            hook.remove()
        return torch.cat(captured)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output `[B, P, D]` for `pixel_values`, as `LlavaForConditionalGeneration` computes it."""
    config = model.config
    output = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                            vision_feature_select_strategy=config.vision_feature_select_strategy)
    return torch.stack(list(output.pooler_output))


class Batcher:
    """Turns rows of a GQA-format `datasets.Dataset` into stage-2 batches: the tokenized prompt and answer, each
    row's preprocessed image (or, given `features`, its cached vision features) and, with `targets`, the
    auxiliary labels.

    The prompt is tokenized as the processor does it: `<image>` expanded to as many image tokens as the
    processor produces for one image (measured once)."""

    def __init__(self, processor, dataset, images: ImageSet, features: torch.Tensor | None = None,
                 targets: SceneTargets | None = None, max_mentions: int = MAX_MENTIONS,
                 turns: TurnPool | None = None, extra_turns: int = 0, caption_share: float = 0.0,
                 statement_share: float = 0.0, description_share: float = 0.0, seed: int = 0) -> None:
        self.tokenizer = processor.tokenizer
        self.dataset = dataset
        self.images, self.features = images, features
        self.targets = targets
        self.max_mentions = max_mentions
        if extra_turns and turns is None:
            raise ValueError(f"extra_turns={extra_turns} needs a TurnPool to draw them from (turns=None)")
        self.turns, self.extra_turns = turns, extra_turns
        self.caption_share, self.statement_share = caption_share, statement_share
        self.description_share = description_share
        self.random = random.Random(seed)  # which extra turns each sequence gets (part of the training state)
        self.image_token = self.tokenizer.image_token
        # The columns a batch needs, read once: `Dataset.select` per batch costs more than the batch's forward pass.
        names = ["question", "answer", "image_id"] + (["object_names", "object_ids"] if targets is not None else [])
        self.columns = {name: list(dataset[name]) for name in names}
        self.patch_labels = (torch.stack([targets.patches(image_id) for image_id in images.ids])
                             if targets is not None else None)
        probe = processor(images=[dataset[0]["image"].convert("RGB")], text=[self.image_token], return_tensors="pt")
        self.n_image_tokens = int((probe["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).sum())

    def __call__(self, indices: list[int], captions: bool = False) -> dict[str, torch.Tensor]:
        """The batch of rows `indices`; with `captions`, each row's image with one request for its caption
        instead (`TurnPool.caption`) and no more turns."""
        rows = {name: [column[i] for i in indices] for name, column in self.columns.items()}
        if captions:
            described = [self.turns.caption(image_id, self.random) for image_id in rows["image_id"]]
            rows["question"], rows["answer"] = [q for q, _ in described], [a for _, a in described]
        prompts = [prompt_of(q, instruction=not captions).replace(self.image_token,
                                                                   self.image_token * self.n_image_tokens)
                   for q in rows["question"]]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        answers = [self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                   for a in rows["answer"]]
        width = max(len(a) for a in answers)
        pad = self.tokenizer.pad_token_id
        answer_ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers])
        answer_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
        input_ids = torch.cat([encoded["input_ids"], answer_ids], dim=1)
        attention_mask = torch.cat([encoded["attention_mask"], answer_mask], dim=1)
        prompt_len = encoded["input_ids"].shape[1]
        labels = torch.cat([torch.full_like(encoded["input_ids"], IGNORE), answer_ids.masked_fill(answer_mask == 0,
                                                                                                 IGNORE)], dim=1)
        if self.extra_turns and not captions:
            input_ids, attention_mask, labels = self._more_turns(indices, rows, input_ids, attention_mask, labels)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask.bool(),
            "answer_start": torch.tensor(prompt_len - 1),
        }
        which = [self.images.index[i] for i in rows["image_id"]]
        if self.features is not None:
            batch["image_features"] = self.features[which]
        else:
            batch["pixel_values"] = self.images.pixel_values[which]
        if self.targets is not None:
            batch["patch_labels"] = self.patch_labels[which]
            if not captions:
                batch.update(self._mentions(rows, encoded["input_ids"]))
        return batch

    def _more_turns(self, indices: list[int], rows: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append `extra_turns` turns about the same image to each row (`TurnPool.draw`), in the template's
        multi-turn form `… ASSISTANT: answer</s> USER: question … ASSISTANT: answer</s>`; right-padded."""
        tails_ids, tails_labels = [], []
        for index, image_id in zip(indices, rows["image_id"]):
            ids, targets = [], []
            for question, answer in self.turns.draw(index, image_id, self.extra_turns, self.caption_share,
                                                    self.statement_share, self.random, self.description_share):
                prompt = self.tokenizer(follow_up_of(question, instruction=question != CAPTION_REQUEST),
                                        add_special_tokens=False)["input_ids"]
                reply = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                ids += prompt + reply
                targets += [IGNORE] * len(prompt) + reply
            tails_ids.append(ids)
            tails_labels.append(targets)
        width = max(len(ids) for ids in tails_ids)
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([ids + [pad] * (width - len(ids)) for ids in tails_ids])
        tail_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in tails_ids])
        tail_labels = torch.tensor([targets + [IGNORE] * (width - len(targets)) for targets in tails_labels])
        return (torch.cat([input_ids, tail], 1), torch.cat([attention_mask, tail_mask], 1),
                torch.cat([labels, tail_labels], 1))

    def _mentions(self, rows, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompt positions `[B, M]` (-1: none) and labels `[B, M, heads]` of the objects each question mentions,
        and whether each has the attribute value the question names (`[B, M, 1]`, `SceneTargets.named`).

        Also which image tokens show each mentioned object (`[B, M, P]`) and where the image starts (`[B]`). The
        question's words directly follow the last image token (the template puts it right after `<image>\n`)."""
        image_token = self.tokenizer.convert_tokens_to_ids(self.tokenizer.image_token)
        first_word = (prompt_ids == image_token).int().cumsum(-1).argmax(-1) + 1
        n = len(rows["question"])
        positions = torch.full((n, self.max_mentions), -1)
        labels = torch.full((n, self.max_mentions, len(self.targets.mention_sizes())), IGNORE)
        named = torch.full((n, self.max_mentions, 1), IGNORE)
        patches = torch.zeros(n, self.max_mentions, self.targets.grid ** 2, dtype=torch.bool)
        for b, (question, names, ids, image_id) in enumerate(
            zip(rows["question"], rows["object_names"], rows["object_ids"], rows["image_id"])
        ):
            words = words_of(question)
            for m, (index, object_id) in enumerate(zip(mention_positions(words, names), ids)):
                if index >= 0 and m < self.max_mentions:
                    positions[b, m] = first_word[b] + index
                    labels[b, m] = torch.tensor(self.targets.mention(image_id, object_id))
                    named[b, m, 0] = self.targets.named(image_id, object_id, words)
                    patches[b, m] = self.targets.object_patches(image_id, object_id)
        return {"mention_positions": positions, "mention_labels": labels, "mention_named": named,
                "mention_patches": patches,
                "image_start": first_word - self.targets.grid ** 2}


class AuxiliaryHeads(torch.nn.Module):
    """Linear heads reading auxiliary targets from features (training only); `IGNORE` labels are skipped."""

    def __init__(self, dim: int, sizes: dict[str, int]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in sizes.values())

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over heads; `features [B, P, D]`, `labels [B, P, n_heads]`."""
        losses = [torch.nn.functional.cross_entropy(head(features).flatten(0, 1), labels[..., i].flatten(),
                                                    reduction="sum") / (labels[..., i] != IGNORE).sum().clamp(min=1)
                  for i, head in enumerate(self.heads)]
        return torch.stack(losses).mean()


def forward(model, batch: dict[str, torch.Tensor], internals: bool = False):
    """The decoder's output on `batch` and the projected image features. The image features (from the batch's
    pixels, or its cached vision features) are projected and scattered into the image-token positions exactly
    as the model's forward does. With `internals`, the output also has every layer's hidden states and (under
    eager attention) attention weights."""
    if "image_features" in batch:
        projected = model.model.multi_modal_projector(batch["image_features"])
    else:
        projected = image_features(model, batch["pixel_values"])
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    image_positions = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image_positions, projected.to(embeds.dtype))
    output = model.model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=internals,
        output_attentions=internals and model.config.text_config._attn_implementation == "eager",
    )
    return output, projected


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits `[B, A, V]` predicting each token of the first turn's answer (from the position before it)."""
    output, _ = forward(model, batch)
    start = int(batch["answer_start"])
    width = batch["answer_ids"].shape[1]
    return model.lm_head(output.last_hidden_state[:, start : start + width])


def labelled_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (every turn's answer and end-of-sequence token;
    `IGNORE` elsewhere): the language-model head runs only at the positions that predict one."""
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), targets[where])


def attention_loss(weights: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-log of the attention mass (`weights [B, T, T]`, one head) from each mentioned object's word onto that
    object's image tokens, averaged over mentions of objects in the image."""
    patches = batch["mention_patches"]  # [B, M, P]
    rows = weights.gather(1, batch["mention_positions"].clamp(min=0)[..., None].expand(-1, -1, weights.shape[-1]))
    image = batch["image_start"][:, None, None] + torch.arange(patches.shape[-1])  # [B, 1, P]
    on_image = rows.gather(2, image.expand(-1, rows.shape[1], -1))  # [B, M, P]
    mass = (on_image * patches).sum(-1)
    valid = patches.any(-1) & (batch["mention_positions"] >= 0)
    return -(mass[valid] + 1e-6).log().mean() if valid.any() else weights.sum() * 0


def at_mentions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden [B, T, D]` at `positions [B, M]` (-1 rows give position 0; their labels are ignored)."""
    index = positions.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def last_position_loss(hidden: torch.Tensor, batch: dict[str, torch.Tensor], heads: torch.nn.ModuleList,
                       labels: str = "mention_labels") -> torch.Tensor:
    """The mentioned objects' targets (`batch[labels]`, `[B, M, heads]`) read from `hidden [B, T, D]` at the last
    prompt position (the one that predicts the answer's first token): heads `m` read mention `m`; mean over
    mentions."""
    last = hidden[:, int(batch["answer_start"])][:, None]  # [B, 1, D]
    return torch.stack([head.loss(last, batch[labels][:, m, None]) for m, head in enumerate(heads)]).mean()


def validation_accuracy(model, batcher: Batcher, indices: list[int], batch_size: int = 128) -> dict[str, float]:
    """Share of questions whose whole answer is predicted greedily under teacher forcing (a fast proxy for
    generation): `{"all": …, category: …}` over `indices` of the batcher's dataset."""
    model.eval()
    right: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = batcher(indices[start : start + batch_size])
            predicted = answer_logits(model, batch).argmax(-1)
            right += (((predicted == batch["answer_ids"]) | ~batch["answer_mask"]).all(-1)).tolist()
    model.train()
    categories = batcher.dataset.select(indices)["category"]
    scores = {"all": sum(right) / max(1, len(right))}
    for category in sorted({c for c in categories if c}):
        hits = [r for r, c in zip(right, categories) if c == category]
        scores[category] = sum(hits) / len(hits)
    return scores


class CategorySampler:
    """Draws training rows category by category (with replacement): a share `1 - focus` of the draws is uniform
    over the categories, the share `focus` in proportion to each category's last validation error, so that
    steps go where the model is still wrong. Rows outside the six categories form one more category, which
    gets the mean error. Before the first `update` all categories are equally likely."""

    OTHER = "(other)"

    def __init__(self, categories: list[str | None], focus: float = 0.5, seed: int = 0) -> None:
        if not 0 <= focus <= 1:
            raise ValueError(f"focus must lie in [0, 1], got {focus}")
        self.rows: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            self.rows.setdefault(category or self.OTHER, []).append(index)
        self.names = sorted(self.rows)
        self.focus = focus
        self.weights = [1 / len(self.names)] * len(self.names)
        self.random = random.Random(seed)

    def update(self, scores: dict[str, float]) -> None:
        """Reweight from validation accuracies per category (`validation_accuracy`'s dict)."""
        known = [1 - scores[name] for name in self.names if name in scores]
        mean = sum(known) / len(known) if known else 1.0
        errors = [1 - scores[name] if name in scores else mean for name in self.names]
        total = sum(errors)
        share = [e / total for e in errors] if total > 0 else [1 / len(errors)] * len(errors)
        self.weights = [(1 - self.focus) / len(self.names) + self.focus * w for w in share]

    def __call__(self, n: int) -> list[int]:
        chosen = self.random.choices(self.names, weights=self.weights, k=n)
        return [self.random.choice(self.rows[name]) for name in chosen]


def native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX)? There autocast is about twice as fast as
    float32; elsewhere bfloat16 is emulated and an order of magnitude slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def uses_bf16(config: TrainConfig) -> bool:
    """`config.bf16`, with None resolved for this machine (`native_bf16`)."""
    return native_bf16() if config.bf16 is None else config.bf16


def autocast(config: TrainConfig):
    """bfloat16 autocast on CPU (weights and optimizer state stay float32), or a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(config))


def cosine(warmup: int, steps: int):
    """Linear warm-up then cosine decay to 0, as a `LambdaLR` factor."""
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def pretrain_vision(model, images: ImageSet, targets: SceneTargets, heads: "AuxiliaryHeads", config: TrainConfig,
                    run=None) -> list[dict]:
    """Stage 1: the vision tower and projector learn the per-patch targets; returns the loss history."""
    parameters = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
                  *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(config.warmup, config.vision_steps))
    labels = torch.stack([targets.patches(image_id) for image_id in images.ids])
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    progress = tqdm(range(config.vision_steps), desc="stage 1: vision", unit="step")
    for step in progress:
        chosen = torch.randint(len(images), (config.vision_batch_size,), generator=generator)
        with autocast(config):
            features = image_features(model, images.pixel_values[chosen])
        loss = heads.loss(features.float(), labels[chosen])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(patches=f"{loss.item():.3f}")
        history.append({"vision_step": step + 1, "vision_patch_loss": loss.item()})
        if run is not None:
            run.log(history[-1])
    return history


RESUME = "resume.pt"  # in the output folder while a run is under way


def _settings(config: TrainConfig) -> dict:
    """What a resumed run must share with the one that wrote the state (everything but where and how it logs)."""
    return {k: v for k, v in asdict(config).items() if k not in ("out", "wandb")}


# What `OUT/resume.pt` holds, with the type of each entry: tensors and plain data only.
_STATE = {"settings": dict, "step": int, "history": list, "minutes": float, "modules": dict, "optimizer": dict,
          "schedule": dict, "sampler_weights": list, "sampler_random": tuple, "turn_random": tuple,
          "torch_rng": torch.Tensor}


def _load_resume(path: Path, config: TrainConfig) -> dict | None:
    """The training state a crashed run left in `path`, or None; a `TrainingStateError` if the file is not one
    (it is read with `weights_only=True`: nothing in it is executed) or was made with other settings."""
    if not path.exists():
        return None

    def refused(reason: str) -> TrainingStateError:
        return TrainingStateError(f"{path} is not an mmscope training state ({reason}); delete it to start over")

    if not path.is_file():
        raise refused("not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except OSError as error:
        raise refused(f"unreadable: {error.strerror or error}") from error
    except pickle.UnpicklingError as error:
        raise refused("it holds something other than tensors and plain data, which mmscope never unpickles, or is "
                      "corrupt") from error
    except EOFError as error:
        raise refused("empty or cut short") from error
    except Exception as error:  # torch's zip reader and unpickler raise many kinds
        raise refused(f"corrupt or cut short: {_gist(error)}") from error
    if not isinstance(state, dict):
        raise refused(f"it holds a {type(state).__name__}, not a training state")
    wrong = [f"{key} missing" if key not in state else f"{key} is a {type(state[key]).__name__}"
             for key, kind in _STATE.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise refused(", ".join(wrong))
    different = _differences(state["settings"], _settings(config))
    if different:
        raise TrainingStateError(f"{path} holds an unfinished run with other settings ({'; '.join(different)}); "
                                 "rerun with those, or delete the file to start over")
    return state


def _differences(there: dict, now: dict, prefix: str = "") -> list[str]:
    """`steps: 3000 there, 2000 now` for each setting that differs (nested ones as `spec.text_layers`)."""
    unset = object()
    lines = []
    for key in [*now, *(key for key in there if key not in now)]:
        old, new = there.get(key, unset), now.get(key, unset)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            shown = ["not set" if value is unset else repr(value) for value in (old, new)]
            lines.append(f"{prefix}{key}: {shown[0]} there, {shown[1]} now")
    return lines


def _gist(error: BaseException) -> str:
    """An error's message on one line: its first sentence, at most 160 characters (or the error's type)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text.split(". ")[0] if text else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextmanager
def _restoring(path: Path) -> Iterator[None]:
    """Turn a loaded state that does not fit the run's modules, optimizer or samplers into a
    `TrainingStateError` naming the file."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise TrainingStateError(f"{path} is not an mmscope training state this run can continue "
                                 f"({_gist(error)}); delete it to start over") from error


def _save_resume(path: Path, state: dict) -> None:
    """Write atomically: a crash while saving leaves the previous state intact."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def _generated_world(world: Path, config: TrainConfig) -> None:
    """The world `train` generates next to `out` when no `--data` is given: reused when a complete one of the
    same settings is there (a rerun, or a resumed run), regenerated when one was cut short (world.json, written
    last, is missing), refused when it was made with other settings."""
    from mmscope.data.synthetic import synthesize

    wanted = {"seed": config.seed, "n_scenes": config.n_scenes, "image_size": config.spec.image_size}
    try:
        recorded = json.loads((world / "world.json").read_text())
    except FileNotFoundError:
        synthesize(world, config.n_scenes, seed=config.seed, image_size=config.spec.image_size, overwrite=True)
        return
    except (OSError, ValueError):
        recorded = {}
    recorded = {key: recorded.get(key) for key in wanted} if isinstance(recorded, dict) else {}
    if recorded != wanted:
        different = "; ".join(f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in wanted.items()
                              if recorded.get(key) != value)
        raise TrainConfigError(f"{world} holds a generated world of other settings ({different}); delete it to "
                               "generate this one, or pass it as --data to train on it")


def train(config: TrainConfig) -> Path:
    """Train and save the model to `config.out`; returns the folder. Continues a crashed run found in it."""
    from mmscope.data.synthetic import load_synthetic

    config.check()
    out = Path(config.out)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    started = time.time()
    resumed = _load_resume(out / RESUME, config)
    world = Path(config.data) if config.data else out.parent / f"{out.name}-world"
    if not config.data:
        _generated_world(world, config)
    train_rows = load_synthetic(world, "train")
    val_rows = load_synthetic(world, "val")
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    questions, answers = list(train_rows["question"]), list(train_rows["answer"])
    pool = (TurnPool(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, list(train_rows["image_id"]),
                     questions, answers, seed=config.seed, positions=config.caption_positions)
            if config.turns > 1 or config.caption_steps else None)
    corpus = questions + answers + (pool.corpus() if pool else [])
    tokenizer = build_word_tokenizer(corpus)
    model, processor = build_llava(tokenizer, config.spec, seed=config.seed)
    internals = any(getattr(config, f"{loss}_loss_weight") for loss in LOSSES if loss != "patch")
    if config.attention_loss_weight:
        model.set_attn_implementation("eager")  # the attention loss needs the weights
    model.train()
    grid = config.spec.image_size // config.spec.patch_size
    targets = SceneTargets(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, grid, config.spec.image_size)
    train_images, val_images = ImageSet(processor, train_rows), ImageSet(processor, val_rows)
    auxiliary = AuxiliaryHeads(config.spec.text_hidden, targets.sizes())
    grounding = AuxiliaryHeads(config.spec.text_hidden, targets.mention_sizes())
    gathering = torch.nn.ModuleList(AuxiliaryHeads(config.spec.text_hidden, targets.mention_sizes())
                                    for _ in range(MAX_MENTIONS))
    naming = torch.nn.ModuleList(AuxiliaryHeads(config.spec.text_hidden, {"named": 2}) for _ in range(MAX_MENTIONS))
    modules = {"model": model, "auxiliary": auxiliary, "grounding": grounding, "gathering": gathering,
               "naming": naming}
    out.mkdir(parents=True, exist_ok=True)
    run = _wandb_run(config) if config.wandb else None

    if resumed is None:
        history = pretrain_vision(model, train_images, targets, auxiliary, config, run) if config.vision_steps else []
    else:
        with _restoring(out / RESUME):
            for name, module in modules.items():
                module.load_state_dict(resumed["modules"][name])
        history = resumed["history"]
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        model.model.vision_tower.eval()
    batcher = Batcher(processor, train_rows, train_images,
                      train_images.features(model) if config.freeze_vision else None, targets,
                      turns=pool, extra_turns=config.turns - 1, caption_share=config.caption_share,
                      statement_share=config.statement_share, description_share=config.description_share,
                      seed=config.seed)
    val_batcher = Batcher(processor, val_rows, val_images)
    val_indices = random.Random(config.seed).sample(range(len(val_rows)), min(config.eval_questions, len(val_rows)))

    trained = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(config.warmup, config.steps))
    sampler = CategorySampler(train_rows["category"], config.focus, config.seed)
    first, before = 0, 0.0  # stage-2 steps and minutes already done
    if resumed is not None:
        with _restoring(out / RESUME):
            optimizer.load_state_dict(resumed["optimizer"])
            schedule.load_state_dict(resumed["schedule"])
            if not 0 < resumed["step"] < config.steps:
                raise ValueError(f"it stopped at step {resumed['step']} of {config.steps}")
            if len(resumed["sampler_weights"]) != len(sampler.names):
                raise ValueError(f"{len(resumed['sampler_weights'])} sampling weights for {len(sampler.names)} "
                                 "categories")
            sampler.weights = resumed["sampler_weights"]
            sampler.random.setstate(resumed["sampler_random"])
            batcher.random.setstate(resumed["turn_random"])
            torch.set_rng_state(resumed["torch_rng"])
        first, before = resumed["step"], resumed["minutes"]
    progress = tqdm(range(first, config.steps), desc="stage 2: answers", unit="step", initial=first,
                    total=config.steps)
    if first:
        progress.write(f"resuming {out / RESUME} at step {first}")
    for step in progress:
        captioning = step < config.caption_steps  # the internal losses (if any) wait for the questions
        batch = batcher(sampler(config.batch_size), captions=captioning)
        with autocast(config):
            output, projected = forward(model, batch, internals and not captioning)
            answer_loss = labelled_loss(model, output.last_hidden_state, batch["labels"])
        zero = answer_loss * 0
        patch_loss = auxiliary.loss(projected.float(), batch["patch_labels"]) if config.patch_loss_weight else zero
        if internals and not captioning:
            grounding_loss = grounding.loss(at_mentions(output.hidden_states[config.grounding_layer].float(),
                                                        batch["mention_positions"]), batch["mention_labels"])
            gathered = output.hidden_states[config.gather_layer].float()
            gather_loss = last_position_loss(gathered, batch, gathering)
            named_loss = last_position_loss(gathered, batch, naming, "mention_named")
            look_loss = (attention_loss(output.attentions[config.attention_layer][:, config.attention_head].float(),
                                        batch) if config.attention_loss_weight else zero)
        else:
            grounding_loss = gather_loss = named_loss = look_loss = zero
        loss = (answer_loss + config.patch_loss_weight * patch_loss + config.grounding_loss_weight * grounding_loss
                + config.attention_loss_weight * look_loss + config.gather_loss_weight * gather_loss
                + config.named_loss_weight * named_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(answer=f"{answer_loss.item():.3f}", patches=f"{patch_loss.item():.3f}",
                             grounding=f"{grounding_loss.item():.3f}", look=f"{look_loss.item():.3f}",
                             gather=f"{gather_loss.item():.3f}", named=f"{named_loss.item():.3f}")
        record = {"step": step + 1, "loss": answer_loss.item(), "patch_loss": patch_loss.item(),
                  "grounding_loss": grounding_loss.item(), "attention_loss": look_loss.item(),
                  "gather_loss": gather_loss.item(), "named_loss": named_loss.item(),
                  "lr": schedule.get_last_lr()[0]}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            with autocast(config):
                scores = validation_accuracy(model, val_batcher, val_indices)
            sampler.update(scores)
            record.update({f"sampling/{name}": weight for name, weight in zip(sampler.names, sampler.weights)})
            record["val_accuracy"] = scores.pop("all")
            record.update({f"val_accuracy/{category}": score for category, score in scores.items()})
            progress.write(f"step {step + 1}: answer loss {answer_loss.item():.4f}  val accuracy "
                           f"{record['val_accuracy']:.3f} (" + ", ".join(f"{c} {v:.2f}" for c, v in scores.items()) + ")")
        history.append(record)
        if run is not None:
            run.log(record)
        if "val_accuracy" in record and step + 1 < config.steps:
            _save_resume(out / RESUME, {
                "settings": _settings(config), "step": step + 1, "history": history,
                "minutes": before + (time.time() - started) / 60,
                "modules": {name: module.state_dict() for name, module in modules.items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "sampler_weights": sampler.weights, "sampler_random": sampler.random.getstate(),
                "turn_random": batcher.random.getstate(),
                "torch_rng": torch.get_rng_state(),
            })
    model.eval()
    model.requires_grad_(True)
    model.set_attn_implementation("sdpa")
    save_llava(model, processor, out)
    shutil.copy(world / "world.json", out / "world.json")  # how to regenerate the data, held-out split included
    summary = {
        "config": {**asdict(config), "spec": asdict(config.spec)},
        "minutes": before + (time.time() - started) / 60,
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in model.parameters()),
        "bf16": uses_bf16(config),
        "final_val_accuracy": history[-1].get("val_accuracy"),
        "world": str(world),
    }
    (out / "training.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    (out / RESUME).unlink(missing_ok=True)
    if run is not None:
        run.summary.update({k: v for k, v in summary.items() if k != "config"})
        run.finish()
    return out


def _wandb_run(config: TrainConfig):
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
    return wandb.init(project="mmscope", job_type="train", config={**asdict(config), "spec": asdict(config.spec)},
                      dir=config.out)

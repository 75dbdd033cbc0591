"""Stage-2 batches: the images of a split preprocessed once (`ImageSet`, and the vision features a frozen tower
gives them), and rows of a GQA-format dataset turned into the decoder's input (`Batcher`): the study's prompt
with the answer and end-of-sequence token after it (the loss's labels), more turns about the same image for a
multi-turn run (`mmscope.zoo.shapes_llava.instructions.TurnPool`), and the auxiliary targets
(`mmscope.zoo.shapes_llava.targets`).

Empty images: a share (`blank_share`) of the sequences whose question offers options show a flat colour instead
of their scene (the world's background, or one of `FLAT_COLOURS`) and keep only their first question, answered by one of the options the
question allows, drawn at random each time (the two a choose question names; yes or no; left or right; the three
attribute kinds CompareAttr asks for). Cross-entropy against a random option is, in expectation, cross-entropy
against the uniform distribution over them: with no evidence, every option equally likely. Black, the blank image
`mmscope evaluate` shows, is not among the colours.
"""

from __future__ import annotations

import random

import torch
from PIL import Image
from tqdm.auto import tqdm

from mmscope.data.render import BACKGROUND
from mmscope.data.synthetic.questions import BUCKETS, OTHER
from mmscope.errors import MMScopeError
from mmscope.zoo.build import words_of
from mmscope.zoo.shapes_llava.instructions import CAPTION_REQUEST, TurnPool
from mmscope.zoo.shapes_llava.prompts import follow_up_of, prompt_of
from mmscope.zoo.shapes_llava.targets import IGNORE, MAX_MENTIONS, SceneTargets, mention_positions


class BatchError(MMScopeError, ValueError):
    """A `Batcher` asked for what its arguments cannot give (more turns with no pool to draw them from)."""


def flat_colours(n: int = 16, seed: int = 0) -> list[tuple[int, int, int]]:
    """The colours of the empty images: the world's background, then `n - 1` drawn uniformly per channel."""
    rng = random.Random(seed)
    return [BACKGROUND, *(tuple(rng.randrange(256) for _ in range(3)) for _ in range(n - 1))]


FLAT_COLOURS = flat_colours()
# What a question without a choose step's two options can be answered by, per category (not the extra questions,
# whose answer set mixes attribute kinds): yes/no, left/right, the attribute kinds.
CATEGORY_OPTIONS = {bucket.name: bucket.answers for bucket in BUCKETS if not bucket.choose and bucket.name != OTHER}


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
        size = dataset[first[self.ids[0]]]["image"].size
        flat = [Image.new("RGB", size, colour) for colour in FLAT_COLOURS]
        self.flat_pixel_values = processor.image_processor(flat, return_tensors="pt")["pixel_values"]

    def __len__(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def features(self, model, batch_size: int = 256, flat: bool = False) -> torch.Tensor:
        """`[n_images, P, D_vision]`: the vision features the projector reads (its input); with `flat`, those of
        the empty images (`FLAT_COLOURS`)."""
        pixel_values = self.flat_pixel_values if flat else self.pixel_values
        captured = []
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            for start in range(0, len(pixel_values), batch_size):
                image_features(model, pixel_values[start : start + batch_size])
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
    processor produces for one image (measured once). With `blank_share`, a share of the rows show an empty
    image (see the module's docstring); `flat_features` are then the empty images' cached vision features,
    needed with `features`."""

    def __init__(self, processor, dataset, images: ImageSet, features: torch.Tensor | None = None,
                 targets: SceneTargets | None = None, max_mentions: int = MAX_MENTIONS,
                 turns: TurnPool | None = None, extra_turns: int = 0, caption_share: float = 0.0,
                 statement_share: float = 0.0, description_share: float = 0.0, seed: int = 0,
                 first_statement_share: float = 0.0, blank_share: float = 0.0,
                 flat_features: torch.Tensor | None = None) -> None:
        if (extra_turns or first_statement_share) and turns is None:
            given = [f"{name}={value}" for name, value in (("extra_turns", extra_turns),
                                                            ("first_statement_share", first_statement_share)) if value]
            raise BatchError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} a TurnPool to draw them from "
                             "(turns=None)")
        if blank_share and features is not None and flat_features is None:
            raise BatchError(f"blank_share={blank_share} with cached features needs the empty images' features "
                             "(flat_features=None)")
        self.first_statement_share, self.blank_share = first_statement_share, blank_share
        self.flat_features = flat_features
        self.tokenizer = processor.tokenizer
        self.dataset = dataset
        self.images, self.features = images, features
        self.targets = targets
        self.max_mentions = max_mentions
        self.turns, self.extra_turns = turns, extra_turns
        self.caption_share, self.statement_share = caption_share, statement_share
        self.description_share = description_share
        self.random = random.Random(seed)  # which extra turns each sequence gets (part of the training state)
        self.image_token = self.tokenizer.image_token
        # The columns a batch needs, read once: `Dataset.select` per batch costs more than the batch's forward pass.
        names = ["question", "answer", "image_id"] + (["object_names", "object_ids"] if targets is not None else [])
        names += ["category", "true_option", "false_option"] if blank_share else []
        self.columns = {name: list(dataset[name]) for name in names}
        self.patch_labels = (torch.stack([targets.patches(image_id) for image_id in images.ids])
                             if targets is not None else None)
        probe = processor(images=[dataset[0]["image"].convert("RGB")], text=[self.image_token], return_tensors="pt")
        self.n_image_tokens = int((probe["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).sum())

    def __call__(self, indices: list[int], captions: bool = False) -> dict[str, torch.Tensor]:
        """The batch of rows `indices`; with `captions`, each row's image with one request for its caption
        instead (`TurnPool.caption`) and no more turns."""
        rows = {name: [column[i] for i in indices] for name, column in self.columns.items()}
        blank = self._blanks(rows) if self.blank_share and not captions else {}
        if self.first_statement_share and not captions:
            self._first_statements(rows, blank)
        if captions:
            described = [self.turns.caption(image_id, self.random) for image_id in rows["image_id"]]
            rows["question"], rows["answer"] = [q for q, _ in described], [a for _, a in described]
        prompt_ids, prompt_mask, answer_ids, answer_mask = self._first_turn(rows, captions)
        input_ids = torch.cat([prompt_ids, answer_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids.masked_fill(answer_mask == 0, IGNORE)],
                           dim=1)
        if self.extra_turns and not captions:
            input_ids, attention_mask, labels = self._more_turns(indices, rows, input_ids, attention_mask, labels,
                                                                 blank)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask.bool(),
            "answer_start": torch.tensor(prompt_ids.shape[1] - 1),
        }
        return {**batch, **self._pictures(rows, prompt_ids, captions, blank)}

    def _blanks(self, rows: dict) -> dict[int, int]:
        """With probability `blank_share` per row whose question offers options (a choose question's two, or its
        category's answers: `CATEGORY_OPTIONS`), the row shows an empty image: its answer becomes one of the
        options at random and it mentions no object. Returns which rows, and the colour (an index into
        `FLAT_COLOURS`) each shows."""
        blank = {}
        for b, (category, true, false) in enumerate(zip(rows["category"], rows["true_option"], rows["false_option"],
                                                        strict=True)):
            if self.random.random() >= self.blank_share:
                continue
            options = (true, false) if true and false else CATEGORY_OPTIONS.get(category)
            if options:
                rows["answer"][b] = self.random.choice(options)
                blank[b] = self.random.randrange(len(FLAT_COLOURS))
                if "object_names" in rows:
                    rows["object_names"][b], rows["object_ids"][b] = [], []
        return blank

    def _first_statements(self, rows: dict, blank: dict[int, int]) -> None:
        """With probability `first_statement_share` per row (not one showing an empty image), its first turn
        becomes a true/false statement about its image (`TurnPool.statements`) instead of its question; such a
        turn mentions no object (no auxiliary targets)."""
        for b, image_id in enumerate(rows["image_id"]):
            if b in blank:
                continue
            statements = self.turns.statements.get(image_id, [])
            if self.random.random() < self.first_statement_share and statements:
                rows["question"][b], rows["answer"][b] = self.random.choice(statements)
                if "object_names" in rows:
                    rows["object_names"][b], rows["object_ids"][b] = [], []

    def _first_turn(self, rows: dict, captions: bool) -> tuple[torch.Tensor, ...]:
        """The prompts' ids and attention mask (`<image>` expanded), and the answers' ids (each with the
        end-of-sequence token; right-padded) and mask."""
        prompts = [prompt_of(q, instruction=not captions).replace(self.image_token,
                                                                   self.image_token * self.n_image_tokens)
                   for q in rows["question"]]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        answers = [self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                   for a in rows["answer"]]
        answer_ids, answer_mask = self._padded(answers, self.tokenizer.pad_token_id)
        return encoded["input_ids"], encoded["attention_mask"], answer_ids, answer_mask

    @staticmethod
    def _padded(sequences: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequences` right-padded with `fill` to the longest, and the mask of what is not padding."""
        width = max(len(sequence) for sequence in sequences)
        return (torch.tensor([sequence + [fill] * (width - len(sequence)) for sequence in sequences], dtype=torch.long),
                torch.tensor([[1] * len(sequence) + [0] * (width - len(sequence)) for sequence in sequences],
                             dtype=torch.long))

    def _more_turns(self, indices: list[int], rows: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, blank: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append `extra_turns` turns about the same image to each row (`TurnPool.draw`), in the template's
        multi-turn form `… ASSISTANT: answer</s> USER: question … ASSISTANT: answer</s>`; right-padded. A row
        showing an empty image gets none (the pool's turns are about its scene)."""
        tails_ids, tails_labels = [], []
        for b, (index, image_id) in enumerate(zip(indices, rows["image_id"])):
            ids, targets = [], []
            drawn = [] if b in blank else self.turns.draw(index, image_id, self.extra_turns, self.caption_share,
                                                          self.statement_share, self.random, self.description_share)
            for question, answer in drawn:
                prompt = self.tokenizer(follow_up_of(question, instruction=question != CAPTION_REQUEST),
                                        add_special_tokens=False)["input_ids"]
                reply = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                ids += prompt + reply
                targets += [IGNORE] * len(prompt) + reply
            tails_ids.append(ids)
            tails_labels.append(targets)
        tail, tail_mask = self._padded(tails_ids, self.tokenizer.pad_token_id)
        tail_labels, _ = self._padded(tails_labels, IGNORE)
        return (torch.cat([input_ids, tail], 1), torch.cat([attention_mask, tail_mask], 1),
                torch.cat([labels, tail_labels], 1))

    def _pictures(self, rows: dict, prompt_ids: torch.Tensor, captions: bool,
                  blank: dict[int, int]) -> dict[str, torch.Tensor]:
        """Each row's image (its pixels, or its cached vision features; the empty image's for a `blank` row)
        and, with targets, its patch labels (none for an empty image) and (unless it asks for captions) the
        labels of the objects its question mentions."""
        which = [self.images.index[i] for i in rows["image_id"]]
        blank_rows, colours = list(blank), list(blank.values())
        if self.features is not None:
            found = {"image_features": self.features[which]}
            if blank:
                found["image_features"][blank_rows] = self.flat_features[colours]
        else:
            found = {"pixel_values": self.images.pixel_values[which]}
            if blank:
                found["pixel_values"][blank_rows] = self.images.flat_pixel_values[colours]
        if self.targets is not None:
            found["patch_labels"] = self.patch_labels[which]
            if blank:
                found["patch_labels"][blank_rows] = IGNORE
            if not captions:
                found.update(self._mentions(rows, prompt_ids))
        return found

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

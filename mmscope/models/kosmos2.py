"""Kosmos-2 (`Kosmos2ForConditionalGeneration`): latent-query image tokens placed by a position mask.

The processor writes `<s><image> <image>×n </image> ` before the prompt, then swaps the n fake `<image>` ids for
arbitrary vocabulary ids and marks their positions in `image_embeds_position_mask`; the model overwrites the
embeddings there with n latent queries that a resampler read from the whole image. So the image tokens are
found between the real `<image>` and `</image>` tokens (which are `image_markers`), not by an id, and they have
no patch of their own: boxes cannot select image tokens. Positions are the model's own (counted from the
first non-padding token, so left padding is ignored).
"""

from __future__ import annotations

import functools

import torch

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter, register
from mmscope.models.encoding import Encoding, token_origins
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

KOSMOS2_VQA = PromptTemplate(
    (("image", IMAGE), ("roles", "Question:"), (None, " "), ("question", QUESTION), ("roles", " Answer:"))
)


@register("kosmos-2")
class Kosmos2Adapter(Adapter):
    family: str = "kosmos2"
    layers: str = "text_model.model.layers"
    final_norm: str = "text_model.model.layer_norm"
    lm_head: str = "text_model.lm_head"
    mlp: str = "ffn"
    template: PromptTemplate = KOSMOS2_VQA
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "image_embeds_position_mask")
    image_in_input_embeddings: bool = False  # the text model writes the image features in itself

    def placeholder(self) -> str:
        return ""  # the processor puts the image before the prompt

    @functools.cached_property
    def image_token_id(self) -> int:
        """The real `<image>` (begin-of-image) token; the image tokens themselves have no single id."""
        return self.processor.tokenizer.convert_tokens_to_ids(self.processor.boi_token)

    def image_positions(self, input_ids) -> torch.Tensor:
        """The `latent_query_num` positions after the first `<image>` (their ids are arbitrary vocabulary ids)."""
        begin = int(torch.nonzero(input_ids == self.image_token_id).flatten()[0])
        return torch.arange(begin + 1, begin + 1 + self.model.config.latent_query_num)

    def encode(self, image, text) -> Encoding:
        if text != text.strip():
            raise InputError(f"Kosmos-2's processor strips the prompt; give it without outer spaces: {text!r}")
        output = dict(self.processor(images=[image], text=[text], return_tensors="pt", return_offsets_mapping=True))
        offsets = torch.as_tensor(output.pop("offset_mapping"))[0]
        n_image = int(output["image_embeds_position_mask"].sum())
        prefix = " ".join([self.processor.boi_token] * (n_image + 1) + [self.processor.eoi_token])
        prepared = f"{self.processor.tokenizer.bos_token}{prefix} {text}"
        spans, _ = token_origins(text, prepared, offsets, [], list(self.processor.tokenizer.added_tokens_encoder))
        image = output["image_embeds_position_mask"][0].bool()
        expanded = image | image.roll(1) | image.roll(-1)  # with the enclosing <image> and </image>
        return Encoding(output, spans, expanded)

    def position_ids(self, attention_mask: torch.Tensor) -> None:
        return None

    def forward_position_ids(self, inputs: dict) -> torch.Tensor:
        """The positions the model counts from `input_ids`: from `padding_idx + 1` at the first non-padding token,
        padding tokens kept at `padding_idx` (so a cached decode continues each row's own count)."""
        embed = self.model.text_model.model.embed_positions
        return embed.create_position_ids_from_input_ids(inputs["input_ids"], embed.padding_idx)

    def decode_forward(self, inputs: dict):
        """Through the text model, as Kosmos-2's own `generate` decodes: the whole model's forward insists on image
        inputs, which its text model drops once the cache holds the prompt."""
        return self.model.text_model(**inputs)

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        raise InputError(
            "Kosmos-2's image tokens are latent queries over the whole image, not patches; boxes cannot select them"
        )

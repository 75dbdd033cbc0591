"""Adapters: the only place that knows how architecture families differ.

An `Adapter` says where a family keeps its decoder layers, final norm and lm_head, which token ids are image
tokens, how its prompt looks, how its processor is called and how image tokens map onto the image. Everything
else in mmscope talks to models through an adapter, so supporting a new family is one file that subclasses
`Adapter` (or, for a one-off model, an `Adapter(...)` instance with the right paths) and registers it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from PIL import Image

from transformers import AutoProcessor

from mmscope.errors import InputError, UnsupportedModelError, known
from mmscope.models.encoding import Encoding, encode_with_origins
from mmscope.models.geometry import patch_rectangles
from mmscope.prompts import LLAVA_15, PromptTemplate

_REGISTRY: dict[str, Adapter] = {}


def attribute_path(root, path: str):
    """`root.a.b.c` for `path` "a.b.c" (works on torch modules and nnsight envoys alike)."""
    return functools.reduce(getattr, path.split("."), root)


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its parts (dotted paths on the Hugging Face model) and how it builds inputs.

    The defaults describe the transformers LLaVA layout; a family whose model differs overrides fields or
    methods. A user can run mmscope on an unregistered model by passing such an instance to `mmscope.load`.
    """

    family: str = "generic"
    layers: str = "model.language_model.layers"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    image_token: str | None = None
    template: PromptTemplate = LLAVA_15
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def text_config(self, config):
        """The language model's config (where the attention implementation is recorded)."""
        return getattr(config, "text_config", config)

    def placeholder(self, processor) -> str:
        """The string the prompt carries where the image goes (expanded to image tokens by the processor)."""
        return self.image_token or processor.image_token

    def image_token_id(self, model, processor) -> int:
        """The id of the image-feature token in `input_ids`."""
        config_id = getattr(model.config, "image_token_id", None)
        if config_id is None:
            config_id = getattr(model.config, "image_token_index", None)
        return config_id if config_id is not None else processor.tokenizer.convert_tokens_to_ids(self.placeholder(processor))

    def image_positions(self, input_ids: torch.Tensor, model, processor) -> torch.Tensor:
        """Positions `[n]` of image-feature tokens in one unpadded `input_ids [T]`."""
        return torch.nonzero(input_ids == self.image_token_id(model, processor)).flatten()

    def load_processor(self, source: str):
        """The family's processor from a hub id or a `save_pretrained` folder."""
        return AutoProcessor.from_pretrained(source)

    def encode(self, processor, image: Image.Image, text: str) -> Encoding:
        """Run the family's processor on one image and one prompt: batch-1 model inputs and token origins."""
        return encode_with_origins(processor, image, text)

    def image_groups(self, input_ids: torch.Tensor, inputs: dict, model, processor) -> dict[str, torch.Tensor]:
        """Extra named groups `name -> positions [n]` within the image tokens (e.g. tiles, row newlines)."""
        return {}

    def appended_value(self, key: str) -> int:
        """Value of the `[B, T]` input `key` (one of `sequence_keys`) at tokens appended after the prompt, such as
        a teacher-forced answer: 1 in the attention mask, 0 (text) in token types and image-position masks."""
        return int(key == "attention_mask")

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for a left-padded batch, so padding does not shift positions (None: the model's own)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def patch_rectangles(self, processor, model, image: Image.Image, inputs: dict) -> torch.Tensor:
        """`[n_image_tokens, 4]` rectangles `(x0, y0, x1, y1)` in original pixels, in image-token order.

        A row of NaN marks an image token that shows no patch (e.g. a row-end newline feature); it belongs to
        neither `object` nor `other_patches`.
        """
        patch_size = model.config.vision_config.patch_size
        return patch_rectangles(image.width, image.height, processor.image_processor, patch_size)


def register(*model_types: str):
    """Class decorator: register an adapter (instantiated with its defaults) for these `config.model_type`s."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            _REGISTRY[model_type] = cls()
        return cls

    return decorate


def adapter_for(model) -> Adapter:
    """The registered adapter of `model`'s family, or an error listing the supported families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"no adapter for model type {model_type!r} ({type(model).__name__}); supported: {known(sorted(_REGISTRY))}. "
            "Pass `adapter=mmscope.models.GenericAdapter(layers=..., final_norm=..., lm_head=...)` to use another model."
        )
    return _REGISTRY[model_type]


def supported_families() -> dict[str, str]:
    """`config.model_type` → adapter family, for every registered adapter."""
    return {model_type: adapter.family for model_type, adapter in sorted(_REGISTRY.items())}


def check_image(image) -> Image.Image:
    """`image` as an RGB PIL image, or an InputError naming what was given instead."""
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL.Image.Image; got {type(image).__name__}: {str(image)[:60]!r}")
    return image if image.mode == "RGB" else image.convert("RGB")

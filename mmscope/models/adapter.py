"""Adapters: the only place that knows how architecture families differ.

An adapter is bound at load to one Hugging Face model and its processor (`LlavaAdapter(hf_model, processor)`).
It says where the family keeps its decoder layers, final norm and lm_head, which positions are image tokens, how
its prompt looks, how its processor is called and how image tokens map onto the image. Everything else in
mmscope talks to models through an adapter, so supporting a new family is one file that subclasses `Adapter`
and registers it — or, for a one-off model, a `GenericAdapter` configured by fields.
"""

from __future__ import annotations

import functools
import inspect

import torch
from PIL import Image
from transformers import AutoProcessor

from mmscope.errors import InputError, UnsupportedModelError, known
from mmscope.models.encoding import Encoding, chunk_tokenised, encode_with_origins
from mmscope.models.geometry import patch_rectangles
from mmscope.models.preprocessing import Preprocessing
from mmscope.prompts import LLAVA_15, PromptTemplate

_REGISTRY: dict[str, type[Adapter]] = {}


def attribute_path(root, path: str):
    """`root.a.b.c` for `path` "a.b.c" (works on torch modules and nnsight envoys alike)."""
    return functools.reduce(getattr, path.split("."), root)


class Adapter:
    """One model of a family and its processor; class attributes say where the family keeps its parts.

    The defaults describe the transformers LLaVA layout; a family whose model differs overrides attributes or
    methods. Paths are dotted attribute paths on the Hugging Face model (`layers`, `final_norm`, `lm_head`) or
    on one decoder layer (`attention`, `mlp`).
    """

    family: str = "generic"
    layers: str = "model.language_model.layers"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    image_token: str | None = None  # the prompt's image placeholder (default: the processor's image token)
    template: PromptTemplate = LLAVA_15
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    # Whether the decoder's input embeddings carry all the image information (no features are added inside the
    # decoder), so a sweep engine may recompute image positions from them and a cached layer input.
    image_in_input_embeddings: bool = True
    # Sites inside the vision tower (`ctx.vision_residual(layer)` …). None: mmscope has none for the family, and
    # every vision site is refused naming it. Paths as above: `vision_layers` and `projector` on the model,
    # `vision_attention` and `vision_mlp` on one vision layer.
    vision_layers: str | None = None
    vision_attention: str = "self_attn"
    vision_mlp: str = "mlp"
    projector: str | None = None  # the multimodal projector: its output is the image features the decoder reads
    # Which knobs of `Preprocessing` the family can do as the study's code did (see `check_preprocessing`).
    square_pads: bool = False
    chunks_prompts: bool = False
    object_patch_rules: tuple[str, ...] = ("overlap",)
    preprocessing: Preprocessing = Preprocessing()  # the setting in use (`set_preprocessing` changes it)

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = processor
        self.loaded_processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"

    @classmethod
    def load_processor(cls, source: str):
        """The family's processor from a hub id or a `save_pretrained` folder."""
        return AutoProcessor.from_pretrained(source)

    @property
    def text_config(self):
        """The language model's config (where the attention implementation is recorded)."""
        return getattr(self.model.config, "text_config", self.model.config)

    @functools.cached_property
    def cache_keyword(self) -> str:
        """The forward's keyword for a key/value cache: `cache` where the model's forward takes it (newer
        transformers, which deprecate the old name), else `past_key_values`."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def check_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Refuse, in one line naming the knob and the family, a `Preprocessing` this family cannot do."""
        if not isinstance(preprocessing, Preprocessing):
            raise InputError(f"preprocessing must be a mmscope.Preprocessing; got {type(preprocessing).__name__}")
        if preprocessing.square_pad and not self.square_pads:
            raise UnsupportedModelError(f"Preprocessing.square_pad is not supported for the {self.family} family "
                                        "(LLaVA-1.5's expand2square pads before a fixed-size resize)")
        if preprocessing.prompt_chunks and not self.chunks_prompts:
            raise UnsupportedModelError(f"Preprocessing.prompt_chunks is not supported for the {self.family} family "
                                        "(its processor, not LLaVA's tokenizer_image_token, builds the prompt)")
        if preprocessing.object_patches not in self.object_patch_rules:
            raise UnsupportedModelError(
                f"Preprocessing.object_patches={preprocessing.object_patches!r} is not supported for the "
                f"{self.family} family; it places boxes by: {known(self.object_patch_rules)}")

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Use `preprocessing` from now on (checked first): `processor` becomes `processor_for(preprocessing)`."""
        self.check_preprocessing(preprocessing)
        self.processor = self.processor_for(preprocessing)
        self.preprocessing = preprocessing

    def processor_for(self, preprocessing: Preprocessing):
        """The processor to run under `preprocessing`: the loaded one, or a family's copy of it configured for the
        setting (the loaded processor is never changed)."""
        return self.loaded_processor

    def placeholder(self) -> str:
        """The string the prompt carries where the image goes (expanded to image tokens by the processor)."""
        return self.image_token or self.processor.image_token

    def placeholder_tokens(self) -> tuple[str, ...]:
        """The strings a question must not hold: the placeholder and the processor's image tokens (begin- and
        end-of-image included), which the processor would read as another image."""
        found = [self.placeholder(), self.image_token]
        for name in ("image_token", "boi_token", "eoi_token", "video_token"):
            try:
                found.append(getattr(self.processor, name, None))
            except (AttributeError, ValueError):  # a bare tokenizer without that special token
                pass
        return tuple(dict.fromkeys(marker for marker in found if isinstance(marker, str) and marker.strip()))

    @functools.cached_property
    def image_token_id(self) -> int | None:
        """The id of the image-feature token in `input_ids`."""
        config = self.model.config
        config_id = getattr(config, "image_token_id", None)
        if config_id is None:
            config_id = getattr(config, "image_token_index", None)
        return config_id if config_id is not None else self.tokenizer.convert_tokens_to_ids(self.placeholder())

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions `[n]` of image-feature tokens in one unpadded `input_ids [T]`."""
        return torch.nonzero(input_ids == self.image_token_id).flatten()

    def encode(self, image: Image.Image, text: str) -> Encoding:
        """Run the family's processor on one image and one prompt: batch-1 model inputs and token origins (with
        `preprocessing.prompt_chunks`, the text re-tokenised around the image as `chunk_tokenised` does)."""
        encoding = encode_with_origins(self.processor, image, text)
        if not self.preprocessing.prompt_chunks:
            return encoding
        return chunk_tokenised(encoding, text, self.placeholder(), self.tokenizer,
                               self.image_positions(encoding.inputs["input_ids"][0]), self.sequence_keys,
                               self.appended_value)

    def image_groups(self, input_ids: torch.Tensor, inputs: dict) -> dict[str, torch.Tensor]:
        """Extra named groups `name -> positions [n]` within the image tokens (e.g. tiles, row newlines)."""
        return {}

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from its lm_head output `[..., V]`: what its forward does after the lm_head."""
        return logits

    def appended_value(self, key: str) -> int:
        """Value of the `[B, T]` input `key` (one of `sequence_keys`) at tokens appended after the prompt, such as
        a teacher-forced answer: 1 in the attention mask, 0 (text) in token types and image-position masks."""
        return int(key == "attention_mask")

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for a left-padded batch, so padding does not shift positions (None: the model's own)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward_position_ids(self, inputs: dict) -> torch.Tensor | None:
        """The position ids `[..., B, T]` a forward over an example's `inputs` uses: `position_ids` of its
        attention mask, or where the adapter passes none, those the model computes (None: not known — a cached
        decode then cannot continue them, and greedy answers run uncached)."""
        return self.position_ids(inputs["attention_mask"])

    def decode_forward(self, inputs: dict):
        """The forward of one cached decode step over `inputs` — the new tokens' columns, the whole attention
        mask, position ids and the cache, no image inputs (the cache holds what the image did): the model's own."""
        return self.model(**inputs)

    def no_vision_sites(self, asked: str) -> UnsupportedModelError:
        """The error for `asked` (e.g. "ctx.vision_residual(0)") in a family without vision-tower sites."""
        return UnsupportedModelError(
            f"{asked}: the {self.family} family has no vision-tower sites in mmscope; families with them: "
            f"{known(vision_families())}"
        )

    def vision_mask_refusal(self) -> str | None:
        """Why the vision attention's additive mask cannot be edited faithfully (None: it can — as the
        `attention_mask` keyword of every vision layer's attention, or through `vision_attention_mask` and
        `masked_vision_attention` where the family's attention takes no mask)."""
        return "its vision attention takes no attention mask"

    def vision_attention_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The additive mask a vision attention called with `args, kwargs` applies, for a family whose attention
        takes no `attention_mask` keyword (None: read it from that keyword)."""
        return None

    def masked_vision_attention(self, layer: int, args: tuple, kwargs: dict, mask: torch.Tensor):
        """Vision layer `layer`'s attention output recomputed under the additive `mask`, for a family whose
        attention takes no `attention_mask` keyword (None: the mask is passed as that keyword)."""
        return None

    def vision_edges(self, targets, sources, inputs: dict, keep_self: bool) -> torch.Tensor:
        """Boolean `[B_images or 1, N, N]` over the vision attention's (query, key) pairs: True where a `targets`
        token of an image reads a `sources` token of the same image (the diagonal kept unless not `keep_self`)."""
        raise self.no_vision_sites(f"vision tokens {targets!r}")

    def vision_index(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False):
        """An index into any vision site (`site[index]`; the projector's output where `projected`) selecting
        `tokens` of every image: "patches", "cls", or positions within each image's sequence there (see
        `Context.vision_residual` and `Context.projector_output` for the layouts)."""
        raise self.no_vision_sites(f"vision tokens {tokens!r}")

    def vision_positions(self, tokens: str | tuple[int, ...], inputs: dict, projected: bool = False) -> torch.Tensor:
        """Positions `[n]` of `tokens` within one image's vision sequence (its projected features where
        `projected`), the same in every image (what a vision knockout blocks in each image's attention)."""
        raise self.no_vision_sites(f"vision tokens {tokens!r}")

    def patch_rectangles(self, image: Image.Image, inputs: dict) -> torch.Tensor:
        """`[n_image_tokens, 4]` rectangles `(x0, y0, x1, y1)` in original pixels, in image-token order.

        A row of NaN marks an image token that shows no patch (e.g. a row-end newline feature); it belongs to
        neither `object` nor `other_patches`.
        """
        patch_size = self.model.config.vision_config.patch_size
        return patch_rectangles(image.width, image.height, self.processor.image_processor, patch_size)

    def red_mask_patches(self, image: Image.Image, inputs: dict, boxes) -> torch.Tensor:
        """Boolean `[n_image_tokens]`, in image-token order: which tokens' patches hold a red pixel of the boxes'
        red mask (`Preprocessing.object_patches="red-mask"`), for a family listing "red-mask" in
        `object_patch_rules`."""
        raise UnsupportedModelError(f"Preprocessing.object_patches='red-mask' is not supported for the "
                                    f"{self.family} family")


def register(*model_types: str):
    """Class decorator: register an adapter class for these `config.model_type`s."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            _REGISTRY[model_type] = cls
        return cls

    return decorate


def adapter_for(model) -> type[Adapter]:
    """The registered adapter class of `model`'s family, or an error listing the supported families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"no adapter for model type {model_type!r} ({type(model).__name__}); supported: {known(sorted(_REGISTRY))}. "
            "Pass `adapter=functools.partial(mmscope.models.GenericAdapter, layers=..., final_norm=..., lm_head=...)` "
            "to use another model."
        )
    return _REGISTRY[model_type]


def vision_families() -> list[str]:
    """The families whose adapters have vision-tower sites."""
    return sorted({adapter.family for adapter in _REGISTRY.values() if adapter.vision_layers is not None})


def supported_families() -> dict[str, str]:
    """`config.model_type` → adapter family, for every registered adapter."""
    return {model_type: adapter.family for model_type, adapter in sorted(_REGISTRY.items())}

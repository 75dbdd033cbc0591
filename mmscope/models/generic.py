"""`GenericAdapter`: run mmscope on a model no registered family covers, configured by a few arguments.

For a `trust_remote_code` model (the original Qwen-VL, LaVIT or Emu-1 ports …) mmscope needs to know where the
decoder layers, final norm and lm_head are, which positions hold the image, and how an image enters the
prompt. Everything else — token groups, knockout, patching, truncation, the lens — follows. For example the
original Qwen-VL-Chat has only a tokenizer: the image's path goes into the prompt between `<img>` and
`</img>`, which the tokenizer pads to 256 tokens that the model replaces by image features:

    hf = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-VL-Chat", trust_remote_code=True, fp32=True).eval()
    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-VL-Chat", trust_remote_code=True)
    start = hf.config.visual["image_start_id"]  # <img>; </img> is the next id
    adapter = GenericAdapter(
        hf, tokenizer,
        layers="transformer.h", final_norm="transformer.ln_f", lm_head="lm_head", attention="attn", mlp="mlp",
        template=PromptTemplate.from_string("Picture 1: <image>\n{question}"),
        image_text=lambda image: f"<img>{image.filename}</img>",
        find_image=lambda ids: torch.arange(int(torch.nonzero(ids == start)[0]) + 1,
                                            int(torch.nonzero(ids == start + 1)[0])),
    )
    model = mmscope.Model(adapter)

Requirements: each chosen layer's attention module receives its additive mask as the `attention_mask`
keyword (as transformers' own models do), and the model runs eager or sdpa attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter
from mmscope.models.encoding import Encoding, token_origins
from mmscope.prompts import PromptTemplate


def decoded_offsets(tokenizer, input_ids: torch.Tensor, text: str) -> torch.Tensor:
    """`[T, 2]` character spans of tokens in `text`, from decoding ever longer prefixes of `input_ids`.

    For tokenizers without offsets; needs decoding to give `text` back (byte-level BPE such as tiktoken does).
    """
    decoded = tokenizer.decode(input_ids.tolist())
    if not decoded.endswith(text):
        raise InputError(
            f"{type(tokenizer).__name__} has no character offsets and does not decode {text[:60]!r}… back to itself; "
            "give GenericAdapter a fast tokenizer"
        )
    added = len(decoded) - len(text)  # a BOS the tokenizer put in front
    ends = [max(len(tokenizer.decode(input_ids[: i + 1].tolist())) - added, 0) for i in range(len(input_ids))]
    starts = [0, *ends[:-1]]
    return torch.tensor(list(zip(starts, ends, strict=True)), dtype=torch.long).view(-1, 2)


class GenericAdapter(Adapter):
    """An `Adapter` whose differences are arguments rather than a subclass.

    Args (beyond the model and its processor or bare tokenizer):
        layers, final_norm, lm_head: dotted paths on the model; attention, mlp: on one decoder layer.
        template: the prompt template; image_token: the prompt's image placeholder.
        sequence_keys: the `[B, T]` inputs to pad in a batch.
        image_id: id of the image-feature token in `input_ids`.
        find_image: `input_ids [T] -> positions [n]` of the image tokens, when no single id marks them.
        image_text: `image -> str`, the text that stands for the image where the prompt has its placeholder,
            when the model's tokenizer (not a multimodal processor) reads images from the text.
        image_inputs: `(processor, image) -> dict` of the model's image tensors (e.g. `pixel_values`) to add to
            the tokenized text.
        rectangles: `(processor, model, image, inputs) -> [n, 4]` patch rectangles, for boxes.
        model_positions: let the model compute position ids (e.g. multimodal rotary positions).
        image_in_input_embeddings: the decoder's input embeddings carry all the image information (nothing is
            added inside the decoder), so the sweep engine may recompute image positions from them (default
            False: suffix passes start only after the image).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        layers: str = Adapter.layers,
        final_norm: str = Adapter.final_norm,
        lm_head: str = Adapter.lm_head,
        attention: str = Adapter.attention,
        mlp: str = Adapter.mlp,
        template: PromptTemplate = Adapter.template,
        image_token: str | None = "<image>",
        sequence_keys: tuple[str, ...] = Adapter.sequence_keys,
        image_id: int | None = None,
        find_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_text: Callable | None = None,
        image_inputs: Callable | None = None,
        rectangles: Callable | None = None,
        model_positions: bool = False,
        image_in_input_embeddings: bool = False,
    ) -> None:
        super().__init__(model, processor)
        self.layers, self.final_norm, self.lm_head = layers, final_norm, lm_head
        self.attention, self.mlp, self.template = attention, mlp, template
        self.image_token, self.sequence_keys = image_token, tuple(sequence_keys)
        self.image_id, self.find_image, self.image_text = image_id, find_image, image_text
        self.image_inputs, self.rectangles, self.model_positions = image_inputs, rectangles, model_positions
        self.image_in_input_embeddings = image_in_input_embeddings

    @functools.cached_property
    def image_token_id(self) -> int | None:
        if self.image_id is not None or self.find_image is not None:
            return self.image_id
        return super().image_token_id

    def image_positions(self, input_ids) -> torch.Tensor:
        if self.find_image is not None:
            return torch.as_tensor(self.find_image(input_ids), dtype=torch.long)
        return super().image_positions(input_ids)

    def encode(self, image, text) -> Encoding:
        """The processor's own encoding, or — with `image_text` — the tokenizer on the prompt with the
        placeholder replaced by the image's text, plus `image_inputs`."""
        if self.image_text is None:
            return super().encode(image, text)
        tokenizer = self.tokenizer
        placeholder, replacement = self.placeholder(), self.image_text(image)
        start = text.index(placeholder)
        expanded = text[:start] + replacement + text[start + len(placeholder) :]
        try:
            tokenized = dict(tokenizer(expanded, return_tensors="pt", return_offsets_mapping=True))
            offsets = tokenized.pop("offset_mapping")[0]
        except NotImplementedError:  # a slow tokenizer (e.g. remote code): offsets from incremental decoding
            tokenized = dict(tokenizer(expanded, return_tensors="pt"))
            offsets = decoded_offsets(tokenizer, tokenized["input_ids"][0], expanded)
        replaced = {"span": (start, start + len(placeholder)), "new_span": (start, start + len(replacement))}
        spans, from_image = token_origins(text, text, offsets, [replaced], list(tokenizer.added_tokens_encoder))
        extra = dict(self.image_inputs(self.processor, image)) if self.image_inputs else {}
        return Encoding({**tokenized, **extra}, spans, from_image)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return None if self.model_positions else super().position_ids(attention_mask)

    def patch_rectangles(self, image, inputs) -> torch.Tensor:
        if self.rectangles is not None:
            return self.rectangles(self.processor, self.model, image, inputs)
        return super().patch_rectangles(image, inputs)

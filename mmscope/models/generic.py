"""`GenericAdapter`: run mmscope on a model no registered family covers, configured by a few fields.

For a `trust_remote_code` model (the original Qwen-VL, LaVIT or Emu-1 ports …) mmscope needs to know where the
decoder layers, final norm and lm_head are, which positions hold the image, and how an image enters the
prompt. Everything else — token groups, knockout, patching, truncation, the lens — follows. For example the
original Qwen-VL-Chat has only a tokenizer: the image's path goes into the prompt between `<img>` and
`</img>`, which the tokenizer pads to 256 tokens that the model replaces by image features:

    hf = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-VL-Chat", trust_remote_code=True, fp32=True).eval()
    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-VL-Chat", trust_remote_code=True)
    start = hf.config.visual["image_start_id"]  # <img>; </img> is the next id
    adapter = GenericAdapter(
        layers="transformer.h", final_norm="transformer.ln_f", lm_head="lm_head", attention="attn", mlp="mlp",
        template=PromptTemplate.from_string("Picture 1: <image>\n{question}"),
        image_text=lambda image: f"<img>{image.filename}</img>",
        find_image=lambda ids: torch.arange(int(torch.nonzero(ids == start)[0]) + 1,
                                            int(torch.nonzero(ids == start + 1)[0])),
    )
    model = mmscope.Model(hf, tokenizer, adapter)

Requirements: each chosen layer's attention module receives its additive mask as the `attention_mask`
keyword (as transformers' own models do), and the model runs eager or sdpa attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmscope.errors import InputError
from mmscope.models.adapter import Adapter
from mmscope.models.encoding import Encoding, token_origins


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


@dataclass(frozen=True)
class GenericAdapter(Adapter):
    """An `Adapter` whose differences are fields rather than a subclass.

    Attributes (beyond `Adapter`'s paths, template, placeholder `image_token` and sequence keys):
        image_id: id of the image-feature token in `input_ids`.
        find_image: `input_ids [T] -> positions [n]` of the image tokens, when no single id marks them.
        image_text: `image -> str`, the text that stands for the image where the prompt has its placeholder,
            when the model's tokenizer (not a multimodal processor) reads images from the text.
        image_inputs: `(processor, image) -> dict` of the model's image tensors (e.g. `pixel_values`) to add to
            the tokenized text.
        rectangles: `(processor, model, image, inputs) -> [n, 4]` patch rectangles, for boxes.
        model_positions: let the model compute position ids (e.g. multimodal rotary positions).
    """

    family: str = "generic"
    image_token: str | None = "<image>"
    image_id: int | None = None
    find_image: Callable[[torch.Tensor], torch.Tensor] | None = None
    image_text: Callable | None = None
    image_inputs: Callable | None = None
    rectangles: Callable | None = None
    model_positions: bool = False

    def image_token_id(self, model, processor) -> int | None:
        if self.image_id is not None or self.find_image is not None:
            return self.image_id
        return super().image_token_id(model, processor)

    def image_positions(self, input_ids, model, processor) -> torch.Tensor:
        if self.find_image is not None:
            return torch.as_tensor(self.find_image(input_ids), dtype=torch.long)
        return super().image_positions(input_ids, model, processor)

    def encode(self, processor, image, text) -> Encoding:
        """The processor's own encoding, or — with `image_text` — the tokenizer on the prompt with the
        placeholder replaced by the image's text, plus `image_inputs`."""
        if self.image_text is None:
            return super().encode(processor, image, text)
        tokenizer = getattr(processor, "tokenizer", processor)
        placeholder, replacement = self.placeholder(processor), self.image_text(image)
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
        inputs = {**tokenized, **(dict(self.image_inputs(processor, image)) if self.image_inputs else {})}
        return Encoding(inputs, spans, from_image)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return None if self.model_positions else super().position_ids(attention_mask)

    def patch_rectangles(self, processor, model, image, inputs) -> torch.Tensor:
        if self.rectangles is not None:
            return self.rectangles(processor, model, image, inputs)
        return super().patch_rectangles(processor, model, image, inputs)

"""Build small LLaVA-1.5-family checkpoints from configs: real HF classes, a real tokenizer, a real processor.

No pretrained VLM can be fetched everywhere mmscope runs, so tests, benchmarks and the embedded model's training
all start here: a `LlavaForConditionalGeneration` (CLIP vision tower + projector + Llama decoder), a word-level
`tokenizers` tokenizer wrapped as a `PreTrainedTokenizerFast`, and a `LlavaProcessor` around a CLIP-style image
processor. `save_llava` writes them with `save_pretrained`, so they load through exactly the same path as any
Hugging Face checkpoint folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmscope.prompts import LLAVA_SYSTEM_PROMPT, LLAVA_TEMPLATE
from mmscope.zoo.spec import TinyLlavaSpec  # declared without torch (a training config holds one); importable here too

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Words and punctuation become separate tokens; the regex keeps character offsets exact.
WORD_PATTERN = r"[A-Za-z0-9]+|[^\sA-Za-z0-9]"


def words_of(text: str) -> list[str]:
    """The word-level pieces the built tokenizer splits `text` into (lower-cased)."""
    return re.findall(WORD_PATTERN, text.lower())


def build_word_tokenizer(corpus: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer whose vocabulary is every word of `corpus` and `extra_words`.

    The template's own words are always included, `<image>` is a special token and a BOS `<s>` is prepended,
    as in LLaVA-1.5's Llama tokenizer.
    """
    words = set(extra_words)
    for text in (LLAVA_SYSTEM_PROMPT, LLAVA_TEMPLATE.replace("{question}", ""), *corpus):
        words.update(words_of(text.replace("<image>", " ")))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


def build_llava(
    tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec = TinyLlavaSpec(), seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised `LlavaForConditionalGeneration` and its `LlavaProcessor`, built from `spec`."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.kv_heads or spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec.extra,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1 if spec.vision_layers == 1 else -2,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_pad=spec.do_pad,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, folder: str | Path) -> Path:
    """Write model and processor with `save_pretrained` into `folder` (a standard HF checkpoint folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

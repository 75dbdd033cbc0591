"""Tiny random checkpoints of every supported family, loaded once per session, and family-agnostic oracles.

Each builder makes the family's real model class from a small config, its real processor class (PIL image
processor + a word-level `tokenizers` tokenizer carrying the family's special tokens), and writes both with
`save_pretrained`, so `mmscope.load` reads them exactly like a hub checkpoint.

The oracles are plain PyTorch on the plain HF model (no nnsight, no mmscope):
- knockout: forward pre-hooks on the chosen layers' attention modules that edit the `attention_mask` keyword on
  top of whatever mask the model itself built (causal, padding, bidirectional image blocks, sliding windows);
- truncation: forward hooks reading each decoder layer's output, to which the family's final norm and lm_head
  are applied;
- patching: forward hooks copying one row's output of a decoder layer, its self-attention or its MLP into
  another row.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import WORDS, scene
from oracle import Family, plain_model
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3ImageProcessor,
    Emu3Processor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    Gemma2Config,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2Processor,
    LlamaConfig,
    LlamaTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

import mmscope
from mmscope.models.emu3 import EMU3_CHAT
from mmscope.models.gemma3 import GEMMA3_CHAT
from mmscope.models.idefics3 import IDEFICS3_CHAT
from mmscope.models.kosmos2 import KOSMOS2_VQA
from mmscope.models.paligemma import PALIGEMMA_VQA
from mmscope.models.qwen2_vl import QWEN_CHAT
from mmscope.prompts import IMAGE, QUESTION
from mmscope.zoo.build import WORD_PATTERN, TinyLlavaSpec, build_llava, build_word_tokenizer

QUESTIONS = ("Is the cube red or blue?", "What color is this object of the cube left of the sphere?")


def word_tokenizer(
    texts: Iterable[str],
    special_tokens: Iterable[str],
    *,
    bos: str | None = None,
    add_bos: bool = False,
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    extra_special_tokens: dict[str, str] | None = None,
    lowercase: bool = True,
    newlines: bool = False,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the words of `texts` (special tokens removed first), plus `WORDS`.

    `special_tokens` are matched whole in text (as a family's added tokens are); `add_bos` prepends `bos`;
    with `newlines` every "\n" is a token of its own (as in Gemma's and Idefics3's prompts).
    """
    specials = list(dict.fromkeys([*([bos] if bos else []), pad, eos, unk, *special_tokens]))  # fairseq's order
    pattern = "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True))
    word_pattern = r"\n|" + WORD_PATTERN if newlines else WORD_PATTERN
    words = set(WORDS)
    for text in texts:
        plain = re.sub(pattern, " ", text)
        words.update(re.findall(word_pattern, plain.lower() if lowercase else plain))
    vocab = {token: i for i, token in enumerate(specials)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    spaces = pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed") if newlines else pre_tokenizers.WhitespaceSplit()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [spaces, pre_tokenizers.Split(Regex(word_pattern), behavior="isolated")]
    )
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in (unk, pad, eos, bos)]})
    return fast


def save(model, processor, folder: Path) -> Path:
    """Write model and processor with `save_pretrained`, as a hub checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def llama_config(tokenizer, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


# --- LLaVA-NeXT ------------------------------------------------------------------------------------------------
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]


def build_llava_next(folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """LLaVA-NeXT: 16-px tiles of 4-px patches (4x4 per tile), pinpoints up to 3 tiles, CLIP + Llama (`tokenizer`:
    a word-level one unless given)."""
    tokenizer = tokenizer or build_word_tokenizer(QUESTIONS, WORDS)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=4, projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=llama_config(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return save(model, processor, folder)


# --- Qwen2-VL, Qwen2.5-VL, Qwen3-VL -------------------------------------------------------------------------------
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_MODELS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor),
}


def qwen_vision_config(kind: str) -> dict:
    """4-px patches merged 2x2; 32-wide, 2-block vision towers (windowed / deepstack variants kept)."""
    common = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        return dict(common, embed_dim=32, hidden_size=32, mlp_ratio=2)
    if kind == "qwen2_5_vl":
        return dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16,
                    fullatt_block_indexes=[1])
    return dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=64,
                deepstack_visual_indexes=[0])


def build_qwen(kind: str, folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """A Qwen-VL model of `kind`, its PIL image processor and tokenizer (the processor class is built from them
    when loaded; without torchvision it is built without its video processor)."""
    config_class, model_class, _ = QWEN_MODELS[kind]
    tokenizer = tokenizer or word_tokenizer([template_text(QWEN_CHAT), *QUESTIONS], QWEN_SPECIALS, eos="<|im_end|>",
                                            pad="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    if kind == "qwen3_vl":
        text["head_dim"] = 8
    config = config_class(
        text_config=text, vision_config=qwen_vision_config(kind), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- Gemma 3 and PaliGemma ---------------------------------------------------------------------------------------
def siglip_config(image_size: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=4,
    )


def template_text(template) -> str:
    """The template's own text (placeholders left out), for the tokenizer's vocabulary."""
    return " ".join(text for _, text in template.parts if text not in (IMAGE, QUESTION))


GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_ROLES = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def build_gemma3(folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """Gemma 3: 32-px SigLIP input, 8x8 patches pooled to 4x4 soft tokens; local layers with a 24-token window
    alternate with global ones."""
    specials = GEMMA3_SPECIALS
    tokenizer = tokenizer or word_tokenizer(
        [template_text(GEMMA3_CHAT), *QUESTIONS], specials, bos="<bos>", add_bos=True, eos="<eos>", newlines=True,
        extra_special_tokens=GEMMA3_ROLES,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=24,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Gemma3Config(
        text_config=text, vision_config=siglip_config(32), mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zeros, which would make every image token the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        image_seq_length=16,
    )
    return save(model, processor, folder)


def build_paligemma(folder: Path, seed: int = 0, softcap: float | None = None) -> Path:
    """PaliGemma: 16-px SigLIP input of 4-px patches (16 image tokens) and a Gemma decoder — or, with `softcap`,
    PaliGemma 2's Gemma 2 decoder, whose logits are soft-capped at that value."""
    tokenizer = word_tokenizer(
        [template_text(PALIGEMMA_VQA) + "\n", *QUESTIONS], ["<image>"], bos="<bos>", eos="<eos>", newlines=True,
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds location tokens
    sizes = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
    )
    text = GemmaConfig(**sizes) if softcap is None else Gemma2Config(**sizes, final_logit_softcapping=softcap)
    config = PaliGemmaConfig(
        vision_config=siglip_config(16), text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32, hidden_size=32,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    return save(model, processor, folder)


# --- Idefics3 and SmolVLM --------------------------------------------------------------------------------------
IDEFICS3_SPECIALS = (
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)


def build_idefics3(folder: Path, seed: int = 0, smolvlm: bool = False, tokenizer=None) -> Path:
    """Idefics3 (or SmolVLM): longest edge 32 px, 16-px tiles of 2-px patches pixel-shuffled 2x2 to 16 tokens.

    Weights are drawn with std 0.2, not 0.02: at 0.02 what a decoder MLP adds to an image token (norm ~0.006) is
    lost next to the token itself (~1.2), and patching it moves the next-token probabilities by ~1e-6, too little
    to tell from no patch at the tests' tolerance."""
    tokenizer = tokenizer or word_tokenizer(
        [template_text(IDEFICS3_CHAT), *QUESTIONS], IDEFICS3_SPECIALS, bos="<|begin_of_text|>", add_bos=True,
        eos="<|end_of_text|>", newlines=True,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=2)
    config_class, vision_class, model_class = (
        (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration) if smolvlm
        else (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration)
    )
    config = config_class(
        vision_config=vision_class(**vision), text_config=llama_config(tokenizer, initializer_range=0.2),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    image_processor_class = SmolVLMImageProcessorPil if smolvlm else Idefics3ImageProcessorPil
    image_processor = image_processor_class(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    if smolvlm:  # its processor class needs a video processor (torchvision); the folder holds what it reads
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "processor_config.json").write_text('{"image_seq_len": 16, "processor_class": "SmolVLMProcessor"}')
        return folder
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)
    return save(model, processor, folder)


# --- Kosmos-2 ---------------------------------------------------------------------------------------------------
def build_kosmos2(folder: Path, seed: int = 0) -> Path:
    """Kosmos-2: 16-px CLIP-style tower of 4-px patches read by 64 latent queries, a 4-layer Magneto decoder."""
    tokenizer = word_tokenizer([template_text(KOSMOS2_VQA), *QUESTIONS], [], bos="<s>", eos="</s>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = Kosmos2Processor(image_processor=image_processor, tokenizer=tokenizer)  # adds tag and patch tokens
    config = Kosmos2Config(
        text_config=dict(
            vocab_size=len(tokenizer), embed_dim=32, layers=4, ffn_dim=64, attention_heads=4, dropout=0.0,
            attention_dropout=0.0, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, init_std=0.2,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        latent_query_num=64,
    )
    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(config).eval()
    return save(model, processor, folder)


# --- Emu3 ---------------------------------------------------------------------------------------------------------
EMU3_SPECIALS = ("<image>", "<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>")
EMU3_CODES = 32


def build_emu3(folder: Path, seed: int = 3) -> Path:
    """Emu3: a VQ-VAE with 8x downsampling and 32 codes (visual tokens in the vocabulary), a Llama-like decoder.

    The seed is one whose greedy answers do not emit the `<image>` placeholder, which a random model may and
    which Emu3 then rejects as an image without pixels."""
    visual = [f"<|visual token {code:06d}|>" for code in range(EMU3_CODES)]
    tokenizer = word_tokenizer(
        [template_text(EMU3_CHAT), *QUESTIONS, "0 1 2 3 4 5 6 7 8 9 *"], [*EMU3_SPECIALS, *visual],
        bos="<|extra_203|>", eos="<|extra_204|>", pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"},
    )
    vq = dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
              channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=2,
              hidden_size=32, num_attention_heads=1)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=tokenizer.get_vocab())
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    image_processor = Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    return save(model, processor, folder)


# --- a byte-level tokenizer (tiktoken-like: decodes back to the text exactly) -------------------------------------
def byte_tokenizer(special_tokens: Iterable[str] = ("<image>",)) -> PreTrainedTokenizerFast:
    """One token per byte plus special tokens, BOS `<s>` in front; decoding gives the text back exactly."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<pad>", *special_tokens]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(alphabet)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return fast


# --- real tokenizers (tests/data/tokenizers: a byte-level BPE and a SentencePiece model) ---------------------------
TOKENIZERS = Path(__file__).parent / "data" / "tokenizers"
REAL_TOKENIZERS = ("bpe", "sentencepiece")


def real_tokenizer(kind: str, special_tokens: Iterable[str] = ("<image>",), *,
                   extra_special_tokens: dict[str, str] | None = None, **roles: str):
    """A real tokenizer with a family's special tokens added: `bpe`, SmolLM2's byte-level BPE (no BOS, pad = eos
    `<|im_end|>`), or `sentencepiece`, Mistral-7B's Llama-family model (BOS `<s>`, pad = `<unk>`, as LLaVA-1.6-Mistral
    pads). `roles` set or replace `bos_token`, `eos_token`, `pad_token`; padding is on the left."""
    extra = {"image_token": "<image>"} if extra_special_tokens is None else extra_special_tokens
    if kind == "bpe":
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2", extra_special_tokens=extra,
                                                  padding_side="left", **roles)
    elif kind == "sentencepiece":
        tokenizer = LlamaTokenizer.from_pretrained(
            TOKENIZERS / "mistral", legacy=False, add_bos_token=True, extra_special_tokens=extra,
            padding_side="left", **{"pad_token": "<unk>", **roles})
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {REAL_TOKENIZERS}")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


def build_llava_real(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random LLaVA-1.5 (its own Vicuna template) over a real tokenizer. Weights are drawn with std 0.5 so
    that over ~50k words an edit still moves the answer's probability measurably."""
    model, processor = build_llava(real_tokenizer(kind), TinyLlavaSpec(extra={"initializer_range": 0.5}), seed=seed)
    return save(model, processor, folder)


FAMILIES = {  # how the oracles reach each family's parts on the plain model
    "llava_next": Family("llava_next", decoder="model.language_model"),
    **{kind: Family("qwen_vl", decoder="model.language_model", first_position=None)
       for kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
    "gemma3": Family("gemma3", decoder="model.language_model"),
    "paligemma": Family("paligemma", decoder="model.language_model", first_position=1),
    "idefics3": Family("idefics3", decoder="model.text_model", count_includes_markers=True),
    "kosmos2": Family("kosmos2", decoder="text_model.model", final_norm="layer_norm", lm_head="text_model.lm_head",
                      mlp="ffn", first_position=None),
    "emu3": Family("emu3", decoder="model.text_model"),
    "smolvlm": Family("idefics3", decoder="model.text_model", count_includes_markers=True),
}
BUILDERS = {  # each family's tiny checkpoint, written into a folder
    "llava_next": build_llava_next,
    **{kind: functools.partial(build_qwen, kind) for kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "idefics3": build_idefics3,
    "kosmos2": build_kosmos2,
    "emu3": build_emu3,
    "smolvlm": functools.partial(build_idefics3, smolvlm=True),
}
REAL_BUILDERS = {  # each family's tiny checkpoint over a real tokenizer, with the family's own prompt template
    "llava-bpe": functools.partial(build_llava_real, "bpe"),
    "llava-sentencepiece": functools.partial(build_llava_real, "sentencepiece"),
    "llava_next-sentencepiece": lambda folder: build_llava_next(folder, tokenizer=real_tokenizer("sentencepiece")),
    "qwen2_vl-bpe": lambda folder: build_qwen("qwen2_vl", folder, tokenizer=real_tokenizer(
        "bpe", QWEN_SPECIALS, extra_special_tokens={}, eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "idefics3-bpe": lambda folder: build_idefics3(folder, tokenizer=real_tokenizer(
        "bpe", IDEFICS3_SPECIALS, extra_special_tokens={}, eos_token="<end_of_utterance>")),
    "gemma3-bpe": lambda folder: build_gemma3(folder, tokenizer=real_tokenizer(
        "bpe", ("<bos>", *GEMMA3_SPECIALS), extra_special_tokens=GEMMA3_ROLES, bos_token="<bos>", eos_token="<eos>")),
}
NEEDS = {"smolvlm": "num2words"}  # the SmolVLM processor needs num2words


def family_params(names):
    """Fixture params, skipping families whose processor needs a package that is not installed."""
    return [
        pytest.param(name, marks=pytest.mark.skipif(
            name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None, reason=f"needs {NEEDS.get(name)}"))
        for name in names
    ]


# --- every family loaded once per session --------------------------------------------------------------------------
IMAGES = ((40, 30), (30, 50))  # landscape and portrait: padding rows, then padding columns

@dataclass
class Loaded:
    family: Family
    folder: object
    model: mmscope.Model
    examples: tuple  # first, second, left-padded batch of both

    @property
    def plain(self):
        return plain_model(self.folder)


_loaded: dict[str, Loaded] = {}


def load_family(name: str, tmp_path_factory) -> Loaded:
    """The family's tiny checkpoint, built and loaded through mmscope once per session, with its examples."""
    if name not in _loaded:
        family = FAMILIES[name]
        folder = BUILDERS[name](tmp_path_factory.mktemp(name))
        model = mmscope.load(folder)
        first = model.prepare(scene(*IMAGES[0], seed=1), QUESTIONS[0])
        second = model.prepare(scene(*IMAGES[1], seed=2), QUESTIONS[1])
        _loaded[name] = Loaded(family, folder, model, (first, second, model.batch([first, second])))
    return _loaded[name]

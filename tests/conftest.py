"""Session fixtures: tiny random LLaVA checkpoints built from configs and saved with save_pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

import mmscope
from mmscope.zoo.build import TinyLlavaSpec, build_llava, build_word_tokenizer, save_llava

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

WORDS = "is the cube sphere cylinder red blue green yes no left right what color of object this".split()


def tiny_llava_folder(folder, spec: TinyLlavaSpec, seed: int = 0):
    tokenizer = build_word_tokenizer(["Is the cube red or blue?"], WORDS)
    model, processor = build_llava(tokenizer, spec, seed=seed)
    return save_llava(model, processor, folder)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 4-layer LLaVA, 32x32 images, 8-px patches (16 image tokens), center-crop processor."""
    return tiny_llava_folder(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec())


@pytest.fixture(scope="session")
def padded_folder(tmp_path_factory):
    """A LLaVA whose processor pads to a square before resizing (as the original LLaVA-1.5 did)."""
    spec = TinyLlavaSpec(image_size=32, patch_size=8, do_pad=True, text_layers=3, kv_heads=2)
    return tiny_llava_folder(tmp_path_factory.mktemp("padded-llava"), spec, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    return mmscope.load(tiny_folder)


@pytest.fixture(scope="session")
def tiny_sdpa(tiny_folder):
    return mmscope.load(tiny_folder, attn_implementation="sdpa")


def scene(width=40, height=30, seed=0) -> Image.Image:
    """A small non-square test picture with some structure."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).rectangle([width // 4, height // 4, width // 2, height // 2], fill=(255, 0, 0))
    return image


@pytest.fixture(scope="session")
def examples(tiny):
    """Two prompts of different lengths, prepared one by one and as a left-padded batch."""
    first = tiny.prepare(scene(seed=1), "Is the cube red or blue?", boxes=[(5, 5, 10, 8)])
    second = tiny.prepare(scene(48, 36, seed=2), "What color is this object of the cube left of the sphere?",
                          boxes=[(30, 20, 12, 10)])
    return first, second, tiny.batch([first, second])


# The geometry of the training tests' runs of seconds: the embedded model's images, a decoder of two layers.
TINY_TRAINING_SPEC = TinyLlavaSpec(image_size=64, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32,
                                   text_layers=2, text_heads=2, intermediate=64)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world in the embedded model's geometry (scenes it never saw: a different seed), shared by
    the experiment and validation tests."""
    from mmscope.data import synthesize

    folder = tmp_path_factory.mktemp("world")
    synthesize(folder, 60, seed=123, image_size=64, progress=False)
    return folder


@pytest.fixture(scope="session")
def embedded():
    """The shipped demo model, loaded once."""
    return mmscope.load("shapes-llava")

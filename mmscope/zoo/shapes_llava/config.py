"""What determines a training run of the embedded model (`TrainConfig`) and the geometry it is trained at
(`embedded_spec`), with the checks `train` runs before it creates or writes anything
(`mmscope.zoo.shapes_llava.train`): a value outside its range is refused with a `TrainConfigError` naming the
option as `mmscope train` spells it. The command line is generated from `TrainConfig`'s `option()` fields.

Importing no heavy library, so that `mmscope train --help` and a refused option are answered without torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mmscope.declare import flag_of, option
from mmscope.errors import MMScopeError
from mmscope.zoo.spec import TinyLlavaSpec


def embedded_spec() -> TinyLlavaSpec:
    """Geometry of the shipped model: 64x64 images in 8-px patches (64 image tokens), 8 decoder layers."""
    return TinyLlavaSpec(
        image_size=64,
        patch_size=8,
        vision_hidden=128,
        vision_layers=3,
        vision_heads=4,
        text_hidden=128,
        text_layers=8,
        text_heads=4,
        intermediate=384,
        max_positions=512,
    )


@dataclass
class TrainConfig:
    """Everything that determines a training run; `check()` refuses a value outside its range (`train` calls it
    before it writes anything).

    A field declared with `option()` is an option of `mmscope train`, its help beside it (`mmscope.declare`);
    the others (batch and step sizes of lesser note, the layers the internal losses read) are set from Python."""

    out: str = option(help="Folder to write the trained checkpoint (save_pretrained) to.")
    data: str | None = option(None, "A synthetic-world folder; generated next to OUT when omitted.")
    n_scenes: int = option(16000, "Scenes to synthesize when --data is omitted.")
    vision_steps: int = option(600, "Stage 1 (vision pre-training) optimizer steps.")
    freeze_vision: bool = option(False, "Keep the vision tower frozen in stage 2.")
    vision_batch_size: int = 128  # stage 1
    steps: int = option(4500, "Stage 2 (answers) optimizer steps.")
    batch_size: int = option(32)
    lr: float = option(1.5e-3)
    warmup: int = 100  # steps of linear warm-up, in each stage
    weight_decay: float = 0.05
    seed: int = option(0)
    eval_every: int = option(300, "Validate every N steps.")
    eval_questions: int = 600  # validation questions (at most the split's)
    patch_loss_weight: float = option(0.5, "Weight of the per-patch attribute loss (0 turns it off).")
    grounding_loss_weight: float = option(0.5, "Weight of the mentioned-object loss (0 turns it off).")
    grounding_layer: int = 4  # decoder layer whose output carries the mentioned objects' attributes
    attention_loss_weight: float = option(0.5, "Weight of the word-to-object attention loss (0: off).")
    attention_layer: int = 2  # decoder layer (0-based) one of whose heads learns to look at mentioned objects
    attention_head: int = 0
    gather_loss_weight: float = option(0.5, "Weight of the last-position mentioned-object loss (0: off).")
    named_loss_weight: float = option(1.0, "Weight of the last-position named-value loss (0: off).")
    gather_layer: int = 6  # decoder layer whose output at the last prompt position carries the mentioned objects
    turns: int = option(2, "Conversation turns per training sequence, all about its image.")  # LLaVA's multi-turn data
    caption_share: float = option(0.0, "Share of the turns after the first asking for a caption.")
    caption_positions: bool = option(True, "Captions name the third of the image each object lies in.")
    caption_steps: int = option(0, "Stage 2 opens with this many steps on captions alone.")  # as LLaVA's alignment
    statement_share: float = option(0.5, "Share of the turns after the first asking true or false.")  # entailment
    description_share: float = option(0.0, "Share of the turns after the first asking to describe one object.")
    first_statement_share: float = option(0.3, "Share of the sequences whose first turn is a true/false statement "
                                               "about the image instead of its question.")
    blank_share: float = option(0.05, "Share of the sequences whose question offers options that show an empty "
                                      "image (a flat colour), the question answered by one of them at random.")
    focus: float = option(0.8, "Share of each batch drawn by categories' validation error (0: uniform).")
    bf16: bool | None = option(None, "bfloat16 autocast (float32 weights); default: where the CPU has bf16 "
                                     "instructions.")  # None: `mmscope.zoo.shapes_llava.objective.native_bf16`
    spec: TinyLlavaSpec = field(default_factory=embedded_spec)  # `mmscope train` takes its --text-layers
    wandb: bool = option(False, "Log the run to Weights & Biases (offline without a key).", flag="--wandb")

    def __post_init__(self) -> None:
        # Folders are kept as strings (the config is saved as JSON); a `Path` is accepted and converted.
        self.out = os.fspath(self.out) if isinstance(self.out, os.PathLike) else self.out
        self.data = os.fspath(self.data) if isinstance(self.data, os.PathLike) else self.data

    def check(self) -> None:
        """Refuse the first value outside its valid range (`TrainConfigError`, named as the `mmscope train`
        option); reads the file system but writes nothing."""
        self._check_numbers()
        self._check_turns()
        self._check_kinds()
        self._check_layers()
        self._check_folders()

    def _check_numbers(self) -> None:
        """Counts, the seed, the learning rate, weight decay and the loss weights."""
        for name, minimum, note in _COUNTS:
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                refuse(name, value, f"must be {'at least' if _is_int(value) else 'a whole number, at least'} "
                                    f"{minimum}{note}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            refuse("seed", self.seed, "must be a whole number from 0 to 2**63 - 1")
        if not _is_real(self.lr) or not self.lr > 0:
            refuse("lr", self.lr, "must be a finite number above 0")
        for name in ("weight_decay", *(f"{loss}_loss_weight" for loss in LOSSES)):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                refuse(name, value, "must be a finite number, at least 0" + (" (0 turns that loss off)"
                                                                              if name != "weight_decay" else ""))

    def _check_turns(self) -> None:
        """The shares of the turns after the first, and the caption-only steps."""
        for name in _SHARES:
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                refuse(name, value, "must lie in [0, 1]")
            if value and self.turns == 1:
                refuse(name, value, "needs --turns above 1: it is the share of the turns after the first")
        for name in ("first_statement_share", "blank_share"):  # of the sequences
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                refuse(name, value, "must lie in [0, 1]")
        if _is_int(self.steps) and _is_int(self.caption_steps) and self.caption_steps >= self.steps:
            refuse("caption_steps", self.caption_steps, f"must be below --steps {self.steps}: they are its first steps")
        given = [name for name in _SHARES if getattr(self, name)]
        if sum(getattr(self, name) for name in given) > 1:  # named: the last share given, beside the others
            *others, last = given
            refuse(last, getattr(self, last), "plus " + " and ".join(f"{flag_of(name)} {getattr(self, name)}"
                                                                     for name in others) + " must be at most 1")

    def _check_kinds(self) -> None:
        """The sampling focus, the switches and the spec's type."""
        if not _is_real(self.focus) or not 0 <= self.focus <= 1:
            refuse("focus", self.focus, FOCUS_RULE)
        for name in ("freeze_vision", "caption_positions", "wandb"):
            if not isinstance(getattr(self, name), bool):
                refuse(name, getattr(self, name), "must be True or False")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            refuse("bf16", self.bf16, "must be True or False (or None: where the CPU has bf16 instructions)")
        if not isinstance(self.spec, TinyLlavaSpec):
            refuse("spec", self.spec, "must be a TinyLlavaSpec")

    def _check_layers(self) -> None:
        """The spec's decoder layers, and the layers and head the internal losses read."""
        layers, heads = self.spec.text_layers, self.spec.text_heads
        if not _is_int(layers) or layers < 1:
            refuse("text_layers", layers, "must be a whole number, at least 1 (the spec's decoder layers)")
        # A layer option matters only while a loss reads that layer.
        read = {"grounding_layer": self.grounding_loss_weight, "gather_layer": self.gather_loss_weight
                or self.named_loss_weight}
        for name in ("grounding_layer", "gather_layer"):
            value = getattr(self, name)
            if read[name] and (not _is_int(value) or not 1 <= value <= layers):
                refuse(name, value, f"must be 1..{layers}: the output of that many decoder layers (the spec has "
                                    f"{layers})")
        if self.attention_loss_weight:
            if not _is_int(self.attention_layer) or not 0 <= self.attention_layer < layers:
                refuse("attention_layer", self.attention_layer, f"must be 0..{layers - 1}: a 0-based decoder "
                                                                f"layer (the spec has {layers})")
            if not _is_int(self.attention_head) or not 0 <= self.attention_head < heads:
                refuse("attention_head", self.attention_head, f"must be 0..{heads - 1}: the spec's decoder layers "
                                                              f"have {heads} heads")

    def _check_folders(self) -> None:
        """`out` names a folder (or one to create) and `data`, when given, another one holding a world."""
        if not isinstance(self.out, str):
            refuse("out", self.out, "must be a string: the folder's path")
        if not self.out:
            refuse("out", self.out, "must name a folder (it is created if missing)")
        out = Path(self.out).absolute()
        existing = next(path for path in (out, *out.parents) if path.exists())
        if not existing.is_dir():
            where = "is" if existing == out else f"lies under {str(existing)!r}, which is"
            refuse("out", self.out, f"{where} a file, not a folder; give a folder (it is created if missing)")
        if self.data is not None:
            if not isinstance(self.data, str):
                refuse("data", self.data, "must be a string (the folder's path) or None")
            if not self.data or not (Path(self.data) / "world.json").is_file():
                refuse("data", self.data, "is not a synthetic-world folder (it has no world.json); make one with "
                                          "`mmscope data synth`, or omit --data to generate one next to --out")
            if out.resolve() == Path(self.data).resolve():
                refuse("out", self.out, "is the --data folder; give another folder for the trained model")


class TrainConfigError(MMScopeError, ValueError):
    """A `TrainConfig` value outside its valid range."""


# Whole-number options: (name, minimum, what the minimum means).
_COUNTS = (("steps", 1, ""), ("vision_steps", 0, " (0 skips stage 1, vision pre-training)"), ("batch_size", 1, ""),
           ("vision_batch_size", 1, ""), ("n_scenes", 10, " (every split, 80/10/10 train/val/test, needs a scene)"),
           ("eval_every", 1, ""), ("eval_questions", 1, ""), ("warmup", 1, ""), ("turns", 1, ""),
           ("caption_steps", 0, " (0: no caption-only steps)"))
LOSSES = ("patch", "grounding", "attention", "gather", "named")
_SHARES = ("caption_share", "statement_share", "description_share")  # of the turns after the first
FOCUS_RULE = "must lie in [0, 1] (0: uniform over categories)"  # `--focus`, and a `CategorySampler`'s focus


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def refuse(name: str, value: Any, rule: str) -> NoReturn:
    """Raise `TrainConfigError` for option `name`: `steps -1 (--steps): must be at least 1`."""
    raise TrainConfigError(f"{name} {value!r} ({flag_of(name)}): {rule}")

"""Protocols: every knob where mmscope's defaults and a study's own code differ, named once.

mmscope's defaults are the geometric, documented choices; the cross-modal information-flow study (Zhang et al.,
CVPR 2025) made other ones in its code. `--protocol study` sets every knob the study's way, so that a run
reproduces the paper; each knob is also its own option, which wins over the protocol:

    knob              default                                  study
    object patches    overlap: a patch a box overlaps          red-mask: the box drawn red (inclusive edges) on a
                                                               mask sent through the image processor; a patch
                                                               with one pure-red pixel
    image padding     processor: as the processor is saved     square: pad to a square of the mean colour first
                                                               (LLaVA's expand2square; LLaVA-1.5 family only —
                                                               other families keep their processor's)
    tokenisation      joint: the processor tokenises the       chunks: the text around <image> tokenised chunk by
                      whole prompt                             chunk (LLaVA's tokenizer_image_token)
    answer tokens     8 greedy tokens                          128 greedy tokens
    answer match      lenient: strip, lower case, no final     lower: strip().lower()
                      full stop
    ci                normal: mean ± 1.96 standard errors      bootstrap: 95% percentile bootstrap of the mean
                                                               (seaborn's default, the study's figures)
    lens              raw (no final norm)                      raw
    lens axis         layers: 0..L-1 = after decoder layer ℓ   hidden-states: the embeddings (layer −1), then
                                                               0..L-1, the last through the final norm
                                                               (transformers' hidden_states)

A knob left unset (None) takes its protocol's value when the run starts (`configure`), against the loaded model;
config.yaml records the values the run used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmscope.model import Model
    from mmscope.models.preprocessing import Preprocessing

CHOICES = {
    "object_patches": ("overlap", "red-mask"),
    "image_padding": ("processor", "square"),
    "tokenisation": ("joint", "chunks"),
    "answer_match": ("lenient", "lower"),
    "ci": ("normal", "bootstrap"),
    "lens": ("raw", "normed"),
    "lens_axis": ("layers", "hidden-states"),
}


@dataclass(frozen=True)
class Protocol:
    """One value per knob (the names of the options that take them)."""

    object_patches: str
    image_padding: str
    tokenisation: str
    answer_tokens: int
    answer_match: str
    ci: str
    lens: str
    lens_axis: str


PROTOCOLS = {
    "default": Protocol(object_patches="overlap", image_padding="processor", tokenisation="joint", answer_tokens=8, answer_match="lenient", ci="normal", lens="raw", lens_axis="layers"),
    "study": Protocol(object_patches="red-mask", image_padding="square", tokenisation="chunks", answer_tokens=128, answer_match="lower", ci="bootstrap", lens="raw", lens_axis="hidden-states"),
}
KNOBS = tuple(field.name for field in dataclasses.fields(Protocol))


def preprocessing_of(options) -> Preprocessing:
    """How the model prepares inputs under the options' knobs."""
    from mmscope.models.preprocessing import Preprocessing  # torch: imported when a run starts, not for --help

    return Preprocessing(square_pad=options.image_padding == "square", prompt_chunks=options.tokenisation == "chunks",
                         object_patches=options.object_patches)


def configure(options, model: Model):
    """`options` with every knob left unset taken from its protocol, and `model` set to prepare inputs as they
    say; returns the options and the run header's lines naming the value of every knob.

    Square padding, chunked tokenisation and red-mask object patches are what the study's code did for
    LLaVA-1.5: left to the study protocol on a family that cannot do one, it keeps mmscope's way (the header
    says so); asked for explicitly there, it is refused (`Model.set_preprocessing`).
    """
    protocol = PROTOCOLS[options.protocol]
    unset = {knob for knob in KNOBS if hasattr(options, knob) and getattr(options, knob) is None}
    options = dataclasses.replace(options, **{knob: getattr(protocol, knob) for knob in unset})
    notes: list[str] = []
    adapter = model.adapter
    for knob, ours, able in (("image_padding", "processor", adapter.square_pads),
                             ("tokenisation", "joint", adapter.chunks_prompts),
                             ("object_patches", "overlap", options.object_patches in adapter.object_patch_rules)):
        value = getattr(options, knob)
        if knob in unset and value != ours and not able:
            options = dataclasses.replace(options, **{knob: ours})
            notes.append(f"{knob.replace('_', ' ')}: {ours} (the {adapter.family} family cannot do the protocol's "
                         f"{value}; it is what the study's code did for LLaVA-1.5)")
    model.set_preprocessing(preprocessing_of(options))  # an explicit knob the family cannot do is refused
    chosen = ", ".join(f"{knob.replace('_', ' ')} {getattr(options, knob)}" for knob in KNOBS
                       if hasattr(options, knob))
    return options, [f"protocol {options.protocol}: {chosen}", *notes]

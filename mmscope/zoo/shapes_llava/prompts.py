"""The prompts the embedded model is trained on: the study's prompt template (`mmscope.prompts.LLAVA_15`) for a
sequence's first turn, and its multi-turn continuation for each later turn — with the short-answer instruction,
or without it for a request for a caption.
"""

from __future__ import annotations

from mmscope.prompts import LLAVA_15, QUESTION, PromptTemplate


def prompt_of(question: str, instruction: bool = True) -> str:
    """The study's single-turn prompt for `question`; without the short-answer instruction when `instruction` is
    False (a request for a caption)."""
    return (LLAVA_15 if instruction else _UNINSTRUCTED).render(question)[0]


_UNINSTRUCTED = PromptTemplate(tuple(part for part in LLAVA_15.parts if part[0] != "instruction"))


def _follow_up_template(instruction: bool) -> str:
    """The template from its first role marker on, without the image and the blank after it (and without the
    instruction when `instruction` is False), the question left as `{question}`."""
    parts = list(LLAVA_15.parts[next(i for i, (group, _) in enumerate(LLAVA_15.parts) if group == "roles"):])
    image = next(i for i, (group, _) in enumerate(parts) if group == "image")
    dropped = {image, image + 1} if not parts[image + 1][1].strip() else {image}
    return "".join(part for i, (group, part) in enumerate(parts)
                   if i not in dropped and (instruction or group != "instruction"))


_FOLLOW_UPS = {instruction: _follow_up_template(instruction) for instruction in (True, False)}


def follow_up_of(question: str, instruction: bool = True) -> str:
    """A later turn's prompt (`" USER: {question} \\nAnswer the question using a single word or phrase.
    ASSISTANT:"`); without the instruction when `instruction` is False (a request for a caption is no
    short-answer question)."""
    return _FOLLOW_UPS[instruction].replace(QUESTION, question)

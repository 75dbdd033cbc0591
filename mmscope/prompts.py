"""Prompt templates: a prompt is a sequence of named parts, so every token knows which group it belongs to.

A `PromptTemplate` renders a question into the prompt text *and* the character span of each named part
(system prompt, image placeholder, question, instruction …). The token layout is then derived from the
tokenizer's character offsets against these spans — never by matching token strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmscope.errors import InputError

IMAGE = "<image>"
QUESTION = "{question}"

LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_INSTRUCTION = " \nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt as `(group, text)` parts; `group` None means the part belongs to no named group.

    The part whose text is `"<image>"` is replaced by the adapter's image placeholder; the part whose text is
    `"{question}"` by the question. Group names become token-group names of the layout.
    """

    parts: tuple[tuple[str | None, str], ...]

    def __post_init__(self) -> None:
        texts = [text for _, text in self.parts]
        for required in (IMAGE, QUESTION):
            if texts.count(required) != 1:
                raise InputError(f"a prompt template needs exactly one {required!r} part; got parts {texts}")

    @classmethod
    def from_string(cls, text: str) -> PromptTemplate:
        """A template from a plain string with one `<image>` and one `{question}`; other text is ungrouped."""
        if text.count(IMAGE) != 1 or text.count(QUESTION) != 1:
            raise InputError(f"template {text!r} must contain exactly one {IMAGE!r} and one {QUESTION!r}")
        head, tail = text.split(IMAGE)
        parts: list[tuple[str | None, str]] = [(None, head), ("image", IMAGE)]
        if QUESTION in head:
            raise InputError(f"template {text!r}: {QUESTION!r} must come after {IMAGE!r}")
        between, after = tail.split(QUESTION)
        parts += [(None, between), ("question", QUESTION), (None, after)]
        return cls(tuple((group, part) for group, part in parts if part))

    def render(self, question: str, image_placeholder: str = IMAGE) -> tuple[str, dict[str, list[tuple[int, int]]]]:
        """The prompt text and, per group, the character spans `[start, end)` of its parts."""
        text, spans = "", {}
        for group, part in self.parts:
            part = image_placeholder if part == IMAGE else question if part == QUESTION else part
            if group is not None:
                spans.setdefault(group, []).append((len(text), len(text) + len(part)))
            text += part
        return text, spans


# The Vicuna-v1 template used by LLaVA-1.5 and by the cross-modal information-flow study.
LLAVA_15 = PromptTemplate(
    (
        ("system", LLAVA_SYSTEM_PROMPT),
        ("roles", " USER:"),
        (None, " "),
        ("image", IMAGE),
        (None, "\n"),
        ("question", QUESTION),
        ("instruction", LLAVA_INSTRUCTION),
        ("roles", " ASSISTANT:"),
    )
)
LLAVA_TEMPLATE = "".join(text for _, text in LLAVA_15.parts)

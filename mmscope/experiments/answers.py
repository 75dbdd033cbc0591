"""The model's answers and when they count as correct: greedy decoding through the path every experiment uses.

A question counts as answered correctly when the greedy answer, stripped, lower-cased and without a final
full stop, equals the label — the filter for which questions enter a sweep, and what `mmscope evaluate`
counts. The study's own filter (`--answer-match lower`) keeps a final full stop, and decoded 128 tokens. With `blank=True` the image is replaced by a blank one of the same size: a model that really
reads the image falls to chance on binary choices.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from PIL import Image
from tqdm.auto import tqdm

from mmscope.errors import known, suggest
from mmscope.experiments.options import OptionError
from mmscope.layout import Example
from mmscope.model import Model


MATCHES = ("lenient", "lower")


def normalise(answer: str, match: str = "lenient") -> str:
    """The form in which an answer is compared with its label: `lenient` strips, lower-cases and drops a final
    full stop; `lower` only strips and lower-cases (the study's `answer.strip().lower()`)."""
    if match not in MATCHES:
        raise OptionError(f"unknown answer match {match!r}; known: {known(MATCHES)}{suggest(match, MATCHES)}")
    text = answer.strip().lower()
    return text.rstrip(".") if match == "lenient" else text


@dataclass(frozen=True)
class CleanAnswer:
    """The model's greedy answer: its text, whether it matches the label, the ids it wrote (the stop token that
    ended it included) and the first of them, the token every sweep scores."""

    text: str
    correct: bool
    tokens: tuple[int, ...]

    @property
    def first_token(self) -> int:
        """The first id the model wrote: what the study's protocol scores, whatever its text (a leading space, a
        word piece, or the end of the answer)."""
        return self.tokens[0]


def clean_answer(model: Model, example: Example, label: str, *, max_new_tokens: int | None = None,
                 match: str | None = None) -> CleanAnswer:
    """The greedy answer (up to `max_new_tokens`, default 8) to one example without interventions, correct when
    it matches the label under `match` (`normalise`; default lenient). The ids are kept as generated: no
    decode → re-tokenise round trip decides which token is scored."""
    tokens = model.generate_tokens(example, max_new_tokens=max_new_tokens or 8)[0]
    text = model.decode_answer(tokens)
    correct = normalise(text, match or "lenient") == normalise(label, match or "lenient")
    return CleanAnswer(text, correct, tuple(tokens))


@dataclass(frozen=True)
class Accuracy:
    """Correct / total per category, and overall."""

    correct: dict[str, int]
    total: dict[str, int]

    def of(self, category: str) -> float:
        """The share answered correctly in `category` (NaN when it has no questions)."""
        return self.correct[category] / self.total[category] if self.total[category] else float("nan")

    @property
    def overall(self) -> float:
        """The share answered correctly over every category."""
        total = sum(self.total.values())
        return sum(self.correct.values()) / total if total else float("nan")


def greedy_answers(model: Model, dataset, *, batch_size: int = 32, blank: bool = False, progress: bool = True,
                   desc: str = "answering") -> list[str]:
    """The model's greedy answer to every row (`image`, `question`) of a GQA-format dataset, in batches."""
    answers: list[str] = []
    bar = tqdm(total=len(dataset), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        examples = []
        for image, question in zip(rows["image"], rows["question"], strict=True):
            image = image.convert("RGB")
            if blank:
                image = Image.new("RGB", image.size, (0, 0, 0))
            examples.append(model.prepare(image, question))
        batch = model.batch(examples)
        generated = model.generate_answer(batch, max_new_tokens=4)
        answers += [generated] if isinstance(generated, str) else generated
        bar.update(len(examples))
    bar.close()
    return answers


def chance(dataset) -> Accuracy:
    """The accuracy of a uniform guess, per category: over the two options a choose question names
    (`true_option`, `false_option`), or else over the distinct answers its category has among `dataset`'s
    questions (yes/no: 1/2; three attribute kinds: 1/3). The expected share right, not a count."""
    categories = [category or "Other" for category in dataset["category"]]
    answers = [normalise(answer) for answer in dataset["answer"]]
    options: dict[str, set[str]] = defaultdict(set)
    for category, answer in zip(categories, answers, strict=True):
        options[category].add(answer)
    named = zip(*(dataset[c] if c in dataset.column_names else [None] * len(dataset)
                  for c in ("true_option", "false_option")), strict=True)
    expected: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    for category, (true, false) in zip(categories, named, strict=True):
        total[category] += 1
        expected[category] += 1 / 2 if true and false else 1 / len(options[category])
    return Accuracy(dict(expected), dict(total))


def accuracy(dataset, answers: list[str]) -> Accuracy:
    """Per-category accuracy of `answers` against the dataset's labels."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for category, label, answer in zip(dataset["category"], dataset["answer"], answers, strict=True):
        category = category or "Other"
        total[category] += 1
        correct[category] += int(normalise(answer) == normalise(label))
    return Accuracy(dict(correct), dict(total))

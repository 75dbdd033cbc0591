"""What a GQA semantic program says about its question: the central objects and the two options.

A GQA question comes with the functional program that answers it over the scene graph, e.g. for
"Is the surfer to the left or to the right of the surfboard?":

    0  select      surfboard (429134)
    1  choose rel  surfer,to the right of|to the left of,s (429128)     dependencies [0]

Object references are the ids in parentheses ("-" when the named object is not in the image, several ids
comma-separated). Each step refers to the objects in its own argument (`select`, `relate`, `choose rel`) or, if
it names none, to the objects of the steps it depends on (`filter`, `exist`, `query` …). The question's
central objects are those the final step works on: its dependencies' objects plus any its own argument
names. This recovers the study's "central object" columns for all six categories (select → choose/query,
two selects → common, two filtered selects → exist/or).

Choose steps list their options as `true|false` in some phrasing ("to the right of|to the left of"); the
answer is in answer form ("right"), so relation options are reduced to their key word ("in front of" ->
"front") and, for other phrasings, the false option is rewritten the way the true one differs from the answer
(the words around the answer in the true option are stripped from the false one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmscope.data.errors import MalformedFileError

# "name (id)" / "name (id1,id2)" / "name (-)": ids are word characters after a space ("not(white)" is no id).
_IDS_AT_END = re.compile(r"^(?P<head>.*\S)\s+\((?P<ids>\s*[\w-]+(?:\s*,\s*[\w-]+)*\s*)\)\s*$")
# GQA answers relation choices with the relation's key word: "to the left of" -> "left", "in front of" -> "front".
_RELATION_PHRASE = re.compile(r"^(?:to the|in|on)\s+(?P<word>.+?)\s+of$")


@dataclass(frozen=True)
class ProgramObject:
    """An object a program step refers to: the word the question uses for it and its scene-graph id.

    `object_id` is "" when GQA marks the object as absent from the image ("-").
    """

    name: str
    object_id: str


def argument_objects(argument: str) -> list[ProgramObject]:
    """The objects a step's argument names: `"jar (496168)"`, `"mud (-)"`, `"surfer,to the left of,s (12)"`."""
    match = _IDS_AT_END.match(argument)
    if match is None:
        return []
    name = match["head"].split(",")[0].strip()
    ids = [part.strip() for part in match["ids"].split(",") if part.strip()]
    return [ProgramObject(name, "" if object_id == "-" else object_id) for object_id in ids]


def central_objects(program: list[dict]) -> list[ProgramObject]:
    """The objects the final step of `program` (GQA `semantic` list) works on, in program order, no repeats.

    Raises `MalformedFileError` (a `ValueError`) for a step whose dependencies point outside the steps before it.
    """
    refs: list[list[ProgramObject]] = []
    for index, step in enumerate(program):
        dependencies = step.get("dependencies") or []
        if any(not isinstance(d, int) or not 0 <= d < index for d in dependencies):
            raise MalformedFileError(f"step {index} ({step.get('operation')!r}) has dependencies {dependencies}, "
                                     f"which must be indices of earlier steps (0..{index - 1})")
        own = argument_objects(str(step.get("argument", "")))
        inherited = [obj for d in dependencies for obj in refs[d]]
        refs.append(own or inherited)
        if index == len(program) - 1:
            return list(dict.fromkeys(inherited + own))
    return []


def choice_options(program: list[dict], answer: str) -> tuple[str | None, str | None]:
    """`(true_option, false_option)` of a choose question in answer form, or `(None, None)` for others.

    Also `(None, None)` when neither option matches the answer.
    """
    if not program or not str(program[-1].get("operation", "")).startswith("choose"):
        return None, None
    argument = str(program[-1].get("argument", ""))
    match = _IDS_AT_END.match(argument)
    fields = (match["head"] if match else argument).split(",")
    options = next((f.split("|") for f in fields if "|" in f), [])
    options = [option.strip().lower() for option in options]
    if program[-1].get("operation") == "choose rel":
        options = [relation_answer(option) for option in options]
    answer = answer.strip().lower()
    if len(options) != 2 or not answer:
        return None, None
    for true, false in (options, options[::-1]):
        if true == answer:
            return answer, false
    for true, false in (options, options[::-1]):
        found = re.search(rf"\b{re.escape(answer)}\b", true)
        if found:
            prefix, suffix = true[: found.start()], true[found.end() :]
            if false.startswith(prefix) and false.endswith(suffix) and len(false) > len(prefix) + len(suffix):
                false = false[len(prefix) : len(false) - len(suffix)]
            return answer, false
    return None, None


def relation_answer(relation: str) -> str:
    """The answer form GQA uses for a relation: `"to the left of"` -> `"left"`, `"behind"` -> `"behind"`."""
    match = _RELATION_PHRASE.match(relation)
    return match["word"] if match else relation


def order_by_question(objects: list, names: list[str], question: str) -> list:
    """`objects` reordered by where their `names` first occur in `question` (a plural -s/-es also counts).

    If some name does not occur (e.g. a synonym), the given order is kept: a guess would be worse.
    """
    text = question.lower()
    positions = []
    for name in names:
        found = re.search(rf"\b{re.escape(name.lower())}(?:s|es)?\b", text)
        if found is None:
            return list(objects)
        positions.append(found.start())
    order = sorted(range(len(objects)), key=positions.__getitem__)
    return [objects[i] for i in order]

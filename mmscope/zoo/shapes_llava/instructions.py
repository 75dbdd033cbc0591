"""The instruction-tuning mix beyond the study's questions: captions, true/false statements, multi-turn turns.

LLaVA's instruction data is multi-turn: several questions about one image in one sequence, the loss on every
answer. `TurnPool` holds, per training image, what can be asked about it:

- the GQA-format questions of that image (the training split's rows);
- a caption read off its scene graph, object by object, name first — "cube large red metal left top and sphere
  small blue rubber right middle" (objects in a fresh random order at every draw; the position is the third of
  the image the object's centre lies in, column then row; none with `positions=False`);
- object descriptions, one object named by its shape ("Describe the cone." -> "large red metal left top"): the
  caption's phrase for that object after its name, asked as a question is, in the study's template;
- true/false statements, the image-text entailment pairs of `mmscope.data.probing.entailment_dataset` on the
  training split ("True or false: There is a red cube." -> "true"), so the model meets entailment.

`TurnPool.draw` picks the extra turns of one sequence: each is a caption with probability `caption_share`, a
statement with probability `statement_share`, an object description with probability `description_share`, and
otherwise another of the image's questions (without repeats; a caption once they run out, or where the image
has no statement). The questions come first, then the statements, then the descriptions and captions, so that
no question is answerable from text earlier in its sequence: each must be answered from the image. All answers
are supervised as answer tokens; nothing here touches the model's inside.
"""

from __future__ import annotations

import random
from pathlib import Path

from mmscope.data.probing import STATEMENT_REQUEST, entailment_dataset
from mmscope.data.scene_graphs import GraphObject, read_scene_graphs

CAPTION_REQUEST = "Describe the image."
DESCRIPTION_REQUEST = "Describe the {name}."
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")


def object_phrase(obj: GraphObject, width: float, height: float, groups: list[list[str]],
                  positions: bool = True) -> str:
    """`cube large red metal left top`: the name, its attributes in the order of `groups` (the world's sizes,
    colours, materials; others last), and (when `positions`) the thirds of the image its centre lies in (column,
    row)."""
    x, y, w, h = obj.box
    column = COLUMNS[min(2, int(3 * (x + w / 2) / width))]
    row = ROWS[min(2, int(3 * (y + h / 2) / height))]

    def order(attribute: str) -> tuple[int, str]:
        return next((i for i, group in enumerate(groups) if attribute in group), len(groups)), attribute

    return " ".join([obj.name, *sorted(obj.attributes, key=order), *([column, row] if positions else [])])


class TurnPool:
    """What can be asked about each training image besides its first question (module docstring)."""

    def __init__(self, scene_graphs: Path, vocabulary: dict, image_ids: list[str], questions: list[str],
                 answers: list[str], seed: int = 0, statements_per_image: int = 4, positions: bool = True) -> None:
        groups = [vocabulary["sizes"], vocabulary["colors"], vocabulary["materials"]]
        self.objects: dict[str, list[str]] = {}
        for graph in read_scene_graphs(Path(scene_graphs)):
            self.objects[graph.image_id] = [object_phrase(obj, graph.width, graph.height, groups, positions)
                                            for obj in graph.objects]
        self.rows: dict[str, list[int]] = {}
        for index, image_id in enumerate(image_ids):
            self.rows.setdefault(image_id, []).append(index)
        self.questions, self.answers = questions, answers
        pairs = entailment_dataset(scene_graphs, None, seed=seed, pairs_per_image=statements_per_image)
        self.statements: dict[str, list[tuple[str, str]]] = {}
        for image_id, statement, label in zip(pairs["image_id"], pairs["statement"], pairs["label"]):
            self.statements.setdefault(image_id, []).append(
                (STATEMENT_REQUEST.format(statement=statement), "true" if label else "false"))

    def corpus(self) -> list[str]:
        """Every text a turn can hold (for the tokenizer's vocabulary)."""
        # The objects' names come with their phrases: the description request adds no word of its own.
        texts = [CAPTION_REQUEST, DESCRIPTION_REQUEST.format(name=""), *COLUMNS, *ROWS, "and", "true", "false"]
        texts += [phrase for phrases in self.objects.values() for phrase in phrases]
        texts += [text for turns in self.statements.values() for turn in turns for text in turn]
        return texts

    def caption(self, image_id: str, rng: random.Random) -> tuple[str, str]:
        phrases = list(self.objects[image_id])
        rng.shuffle(phrases)
        return CAPTION_REQUEST, " and ".join(phrases)

    def description(self, image_id: str, rng: random.Random) -> tuple[str, str]:
        """One of the image's objects, named by its shape, and the rest of its caption phrase."""
        name, *rest = rng.choice(self.objects[image_id]).split()
        return DESCRIPTION_REQUEST.format(name=name), " ".join(rest)

    def draw(self, first_row: int, image_id: str, n: int, caption_share: float, statement_share: float,
             rng: random.Random, description_share: float = 0.0) -> list[tuple[str, str]]:
        """`n` more (question, answer) turns about the image of row `first_row`."""
        others = [row for row in self.rows[image_id] if row != first_row]
        rng.shuffle(others)
        statements = self.statements.get(image_id, [])
        asked, stated, described = [], [], []
        for _ in range(n):
            pick = rng.random()
            if pick < statement_share and statements:
                stated.append(rng.choice(statements))
            elif statement_share <= pick < statement_share + description_share:
                described.append(self.description(image_id, rng))
            elif pick < statement_share + description_share + caption_share or not others:
                described.append(self.caption(image_id, rng))
            else:
                row = others.pop()
                asked.append((self.questions[row], self.answers[row]))
        # Questions first: no question can be answered from a caption, description or statement earlier in its
        # sequence.
        return asked + stated + described

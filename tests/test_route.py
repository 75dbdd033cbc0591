"""The embedded model's planted route, recovered by mmscope's own tools — each step against a control, and each
check failing on a deliberately damaged copy (so a check that passed could have failed).

The route (the model card's table, from the training config): head 0 of decoder layer 2 is trained to look from
each mentioned object's word at that object's patches; the residual stream after layer 3 at that word is trained
to carry the object's attributes; after layer 5 the last position is trained to carry each mentioned object's.
The checks, on correctly answered held-out questions whose first object is in the image:

- attention: the attention map (`mmscope map --kind attention --target object_word --head H`) of each head of
  each layer, one region per patch: the planted head's share of the object words' image attention on their
  objects' patches, against the share those patches hold of the image, and against every head of layers 4–7;
- object → question knockout in layer 2 alone against the same knockout in each layer 4–7 (Δp% of the answer);
- a probe (`mmscope.probes.layerwise`, controls on) on the residual stream at the word: the object's colour after
  layer 3 well above the shuffled-label baseline, and not in the embeddings;
- question → last knockout in layer 4 (the gather is read after layer 5) drops p(answer); it also drops in layer 0,
  where the last position reads what the question asks, not yet anything about the image.

Damaged copies: head 0 of layer 2 without its query (uniform attention); layer 2's attention output zeroed;
the attention outputs of layers 0–3 zeroed; those of layers 4–5 zeroed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mmscope
import mmscope.zoo.shapes_llava as shapes_llava
from mmscope.data.scene_graphs import read_scene_graphs
from mmscope.experiments.answers import clean_answer
from mmscope.experiments.maps import MapOptions, map_rows
from mmscope.experiments.runner import Question, Sweep, example_of
from mmscope.experiments.workspace import load_questions
from mmscope.interventions import Knockout
from mmscope.probes.train import layerwise

CONFIG = json.loads((Path(shapes_llava.__file__).parent / "checkpoint" / "training.json").read_text())["summary"][
    "config"]
LAYER, HEAD = CONFIG["attention_layer"], CONFIG["attention_head"]  # 2, 0
GROUNDED = CONFIG["grounding_layer"] - 1  # the residual after this layer carries the word's object (3)
GATHERED = CONFIG["gather_layer"] - 1  # ... and after this one the last position's (5)
UNPLANTED = range(GATHERED - 1, 8)  # layers 4-7: nothing planted on object -> question


@dataclass
class Mention:
    """A correctly answered question (as a sweep holds it), its example, its first object's word position and
    colour, its answer's first token."""

    question: Question | None
    example: object
    word: int
    name: str
    colour: str
    image_id: str
    token: int


@pytest.fixture(scope="module")
def mentions(embedded) -> list[Mention]:
    return mentions_of(embedded)


def mentions_of(model, limit: int = 12, correct_only: bool = True) -> list[Mention]:
    """The questions whose first object is in the image and named by one word of the question (answered
    correctly, with `correct_only`; a probe of what the word position holds needs no correct answer)."""
    questions = load_questions(None, "test", limit=limit)
    world = Path(questions[0]["image_path"]).parents[1]
    colours = set(json.loads((world / "world.json").read_text())["vocabulary"]["colors"])
    graphs = {graph.image_id: {obj.object_id: obj for obj in graph.objects}
              for graph in read_scene_graphs(world / "sceneGraphs" / "test_sceneGraphs.json")}
    found = []
    for row in questions:
        names, ids = row["object_names"] or [], row["object_ids"] or []
        example = example_of(model, row)
        if not names or not ids or not ids[0] or not example.layout.get("object"):
            continue  # the question's first object must be in the image
        tokens = example.inputs["input_ids"][0].tolist()
        words = [(p, model.processor.tokenizer.convert_ids_to_tokens(tokens[p])) for p in example.layout["question"]]
        hits = [p for p, word in words if word in (names[0], names[0] + "s")]
        colour = next(value for value in graphs[row["image_id"]][ids[0]].attributes if value in colours)
        answer = clean_answer(model, example, row["answer"]) if correct_only else None
        if hits and (answer is None or answer.correct):
            question = Question(len(found), row, example, answer) if answer else None
            found.append(Mention(question, example, hits[0], names[0], colour, row["image_id"],
                                 answer.first_token if answer else -1))
    return found


def attention_shares(model, mentions: list[Mention]) -> tuple[np.ndarray, float]:
    """`[layers, heads]`: the mean share of the object words' attention on image tokens that falls on their
    objects' patches, read off each head's attention map (`map --kind attention --target object_word --head H
    --region 1`); and the share the objects' patches hold of the image tokens (what uniform attention gives)."""
    shares = np.zeros((model.n_layers, model.n_heads))
    for head in range(model.n_heads):
        options = MapOptions(kinds=["attention"], targets=["object_word"], layers=list(range(model.n_layers)),
                             head=head, model="shapes-llava")
        table = pd.DataFrame([{**row, "example": i} for i, mention in enumerate(mentions)
                              for row in map_rows(Sweep(model, None, options), mention.question)])
        on_object = table[table["on_object"]].groupby(["example", "layer"])["attention"].sum()
        shares[:, head] = (on_object / table.groupby(["example", "layer"])["attention"].sum()).groupby("layer").mean()
    uniform = np.mean([len(m.example.layout["object"]) / len(m.example.layout["image"]) for m in mentions])
    return shares, float(uniform)


def knockout_drops(model, mentions: list[Mention], source: str, target: str) -> np.ndarray:
    """Per layer, the mean Δp% of the answer when `target` → `source` attention is blocked in that layer alone."""
    drops = []
    for mention in mentions:
        p = model.next_token_probs(mention.example)[mention.token].item()
        drops.append([(model.next_token_probs(mention.example, [Knockout(source, target, [layer])])[
            mention.token].item() - p) / p * 100 for layer in range(model.n_layers)])
    return np.mean(drops, 0)


def word_probe(model, mentions: list[Mention]) -> dict[int, dict]:
    """Per depth (−1: the embeddings), the colour probe at the word, with its shuffled-label baseline and
    interval. (The control task would give each object word a colour; with four words it is learnt from the word
    alone, so the shuffled labels are the control here, and the embeddings, where the word cannot know its
    object's colour yet.)"""
    states = torch.stack([model.hidden_states(mention.example)[:, 0, mention.word].float() for mention in mentions])
    labels = sorted({mention.colour for mention in mentions})
    rows = layerwise(states, torch.tensor([labels.index(mention.colour) for mention in mentions]), False,
                     groups=[mention.image_id for mention in mentions], controls=True, first_layer=-1)
    return {int(row["layer"]): row for row in rows}


def attention_check(model, mentions) -> tuple[bool, str]:
    shares, uniform = attention_shares(model, mentions)
    planted, later = shares[LAYER, HEAD], shares[list(UNPLANTED)].max()
    said = f"layer {LAYER} head {HEAD}: {planted:.2f} of the words' image attention on their objects (uniform " \
           f"{uniform:.2f}, layers 4-7 at most {later:.2f})"
    return planted >= 0.8 and planted >= 3 * uniform and planted >= later + 0.4, said


def object_knockout_check(model, mentions) -> tuple[bool, str]:
    drops = knockout_drops(model, mentions, "object", "question")
    control = np.abs(drops[list(UNPLANTED)]).max()
    said = f"object -> question knockout, Δp%: layer {LAYER} {drops[LAYER]:+.1f}, layers 4-7 at most {control:.1f} in size"
    return drops[LAYER] <= -25 and abs(drops[LAYER]) >= 5 * control, said


def probe_check(model, mentions) -> tuple[bool, str]:
    rows = word_probe(model, mentions_of(model, limit=40, correct_only=False))
    planted, embedded = rows[GROUNDED], rows[-1]
    said = (f"colour at the word after layer {GROUNDED}: accuracy {planted['accuracy']:.2f} "
            f"[{planted['accuracy_low']:.2f}, {planted['accuracy_high']:.2f}], shuffled labels "
            f"{planted['shuffled_accuracy']:.2f}; in the embeddings {embedded['accuracy']:.2f} (shuffled "
            f"{embedded['shuffled_accuracy']:.2f})")
    return (planted["accuracy_low"] >= planted["shuffled_accuracy"] + 0.3
            and embedded["accuracy"] <= embedded["shuffled_accuracy"] + 0.15), said


def question_knockout_check(model, mentions) -> tuple[bool, str]:
    drops = knockout_drops(model, mentions, "question", "last")
    gather = min(drops[GATHERED - 1], drops[GATHERED])
    said = "question -> last knockout, Δp% per layer: " + ", ".join(f"{d:+.0f}" for d in drops)
    return gather <= -25, said


CHECKS = {"attention": attention_check, "object knockout": object_knockout_check, "probe": probe_check,
          "question knockout": question_knockout_check}


@pytest.mark.parametrize("check", list(CHECKS))
def test_the_shipped_model_shows_each_planted_step(embedded, mentions, check):
    assert len(mentions) >= 30
    passed, said = CHECKS[check](embedded, mentions)
    print(f"{check}: {said}")
    assert passed, said


def damaged(name: str):
    """A fresh copy of the embedded model with one planted step broken (module docstring)."""
    model = mmscope.load("shapes-llava")
    layers = model.hf.model.language_model.layers
    with torch.no_grad():
        if name == "attention":  # head HEAD of layer LAYER gets no query: its attention is uniform
            head_dim = layers[LAYER].self_attn.head_dim
            layers[LAYER].self_attn.q_proj.weight[HEAD * head_dim:(HEAD + 1) * head_dim] = 0
        if name == "object knockout":
            layers[LAYER].self_attn.o_proj.weight.zero_()
        if name == "probe":
            for layer in range(GROUNDED + 1):
                layers[layer].self_attn.o_proj.weight.zero_()
        if name == "question knockout":
            for layer in (GATHERED - 1, GATHERED):
                layers[layer].self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("check", list(CHECKS))
def test_each_check_fails_on_a_copy_with_that_step_damaged(mentions, check):
    model = damaged(check)
    passed, said = CHECKS[check](model, mentions)
    print(f"{check}, damaged: {said}")
    assert not passed, said

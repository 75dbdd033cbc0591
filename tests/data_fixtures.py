"""Shared data for the data tests: an excerpt of the study's CSV folder, a hand-written GQA folder, one synthetic world per
session (built on first use), and the check that an error is one clear line naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmscope.data import SyntheticFiles, synthesize
from mmscope.errors import MMScopeError

# 40 rows of each of the study's six question-set CSVs, unchanged (tests/data/gqa_cmif/README.md names the source)
STUDY_FOLDER = Path(__file__).resolve().parent / "data" / "gqa_cmif"

_WORLDS: dict[tuple, SyntheticFiles] = {}


def synthetic_world(tmp_path_factory, n_scenes: int = 240, seed: int = 3) -> SyntheticFiles:
    """A synthetic world of `n_scenes` scenes, written once per test session and shared by all data tests."""
    key = (n_scenes, seed)
    if key not in _WORLDS:
        folder = tmp_path_factory.mktemp(f"world-{n_scenes}-{seed}")
        _WORLDS[key] = synthesize(folder, n_scenes, seed=seed, workers=2, progress=False)
    return _WORLDS[key]


def step(operation, argument, dependencies=()):
    return {"operation": operation, "dependencies": list(dependencies), "argument": argument}


def question(image_id, text, answer, detailed, program, full_answer=""):
    return {
        "imageId": image_id, "question": text, "answer": answer, "fullAnswer": full_answer, "isBalanced": True,
        "groups": {"global": None, "local": "x"}, "entailed": [], "equivalent": [],
        "types": {"structural": "s", "semantic": "t", "detailed": detailed},
        "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}, "semantic": program, "semanticStr": "",
    }


QUESTIONS = {
    "05451384": question("2354786", "Is the jar full or empty?", "empty", "chooseAttr",
                         [step("select", "jar (496168)"), step("choose", "empty|full", [0])], "The jar is empty."),
    "201307251": question("2354786", "Is the surfer to the left or to the right of the surfboard?", "right",
                          "relChooser", [step("select", "surfboard (429134)"),
                                         step("choose rel", "surfer,to the right of|to the left of,s (429128)", [0])]),
    "0123": question("2375429", "Which kind of animal is this, a cat or a bird?", "bird", "categoryThisChoose",
                     [step("select", "animal (2489116)"), step("choose name", "bird|cat", [0])]),
    "777": question("2375429", "What do the marker and the post have in common?", "color", "twoCommon",
                    [step("select", "marker (177848)"), step("select", "post (177850) "), step("common", "", [0, 1])]),
    "0888": question("2375429", "Is there any grass or mud that is not brown?", "no", "existThatOrC",
                     [step("select", "grass (3899215)"), step("filter color", "not(brown)", [0]),
                      step("exist", "?", [1]), step("select", "mud (-) "), step("filter color", "not(brown)", [3]),
                      step("exist", "?", [4]), step("or", "", [2, 5])]),
    "02452198": question("2354786", "On which side of the photo is the curtain?", "Right", "positionQuery",
                         [step("select", "curtain (681425)"), step("query", "hposition", [0])]),
    "999": question("2354786", "What color is the jar?", "brown", "directOf",
                    [step("select", "jar (496168)"), step("query", "color", [0])]),
}

SCENE_GRAPHS = {
    "2354786": {"width": 500, "height": 375, "objects": {
        "496168": {"name": "jar", "x": 253, "y": 291, "w": 60, "h": 105, "attributes": ["empty"], "relations": []},
        "429134": {"name": "surfboard", "x": 258, "y": 157, "w": 43, "h": 22, "attributes": [], "relations": []},
        "429128": {"name": "surfer", "x": 290, "y": 77, "w": 74, "h": 110, "attributes": [],
                   "relations": [{"name": "to the right of", "object": "429134"}]},
        "681425": {"name": "curtain", "x": 337, "y": 23, "w": 162, "h": 310, "attributes": [], "relations": []},
    }},
    "2375429": {"width": 405, "height": 500, "objects": {
        "2489116": {"name": "bird", "x": 111, "y": 71, "w": 198, "h": 323, "attributes": [], "relations": []},
        "177848": {"name": "marker", "x": 10, "y": 20, "w": 30, "h": 40, "attributes": ["white"], "relations": []},
        "177850": {"name": "post", "x": 50, "y": 60, "w": 70, "h": 80, "attributes": ["white"], "relations": []},
        "3899215": {"name": "grass", "x": 32, "y": 312, "w": 214, "h": 147, "attributes": [], "relations": []},
    }},
}


def write_gqa(root: Path, questions=QUESTIONS, graphs=SCENE_GRAPHS, images=("2354786", "2375429")) -> Path:
    """A GQA folder in the official layout: questions/, sceneGraphs/, images/."""
    for folder in ("questions", "sceneGraphs", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "questions" / "val_balanced_questions.json").write_text(json.dumps(questions))
    (root / "sceneGraphs" / "val_sceneGraphs.json").write_text(json.dumps(graphs))
    for image_id in images:
        Image.new("RGB", (graphs[image_id]["width"], graphs[image_id]["height"]), "white").save(
            root / "images" / f"{image_id}.jpg")
    return root


def clear_error(excinfo, *names) -> str:
    """The message of an error `pytest.raises` caught, checked to be one line of an `MMScopeError` that names each
    of `names` (a file, a question id …)."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, MMScopeError), repr(excinfo.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message

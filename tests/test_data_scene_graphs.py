"""The one scene-graph reader: a hand-written GQA-format file read into records, and broken copies of it."""

from __future__ import annotations

import json
import re

import pytest

from mmscope.data.errors import MalformedFileError
from mmscope.data.scene_graphs import GraphObject, Relation, SceneGraph, read_scene_graphs

# Written out by hand in GQA's layout; the object of image "07" has no attributes or relations fields.
GRAPHS_JSON = """{
  "2354786": {"width": 500, "height": 375, "objects": {
    "429134": {"name": "surfboard", "x": 258, "y": 157, "w": 43, "h": 22, "attributes": ["white", "wet"],
               "relations": []},
    "429128": {"name": "surfer", "x": 290.5, "y": 77, "w": 74, "h": 110, "attributes": [],
               "relations": [{"name": "to the right of", "object": "429134"}, {"name": "on", "object": "429134"}]}
  }},
  "07": {"width": 64, "height": 48, "objects": {"1": {"name": "cube", "x": 0, "y": 2, "w": 16, "h": 16}}},
  "empty": {"width": 10, "height": 10, "objects": {}}
}"""


@pytest.fixture
def graphs_file(tmp_path):
    path = tmp_path / "val_sceneGraphs.json"
    path.write_text(GRAPHS_JSON)
    return path


def test_a_file_reads_into_one_record_per_image_in_file_order(graphs_file):
    assert list(read_scene_graphs(graphs_file)) == [
        SceneGraph("2354786", 500, 375, (
            GraphObject("429134", "surfboard", ("white", "wet"), (), (258.0, 157.0, 43.0, 22.0)),
            GraphObject("429128", "surfer", (), (Relation("to the right of", "429134"), Relation("on", "429134")),
                        (290.5, 77.0, 74.0, 110.0)),
        )),
        SceneGraph("07", 64, 48, (GraphObject("1", "cube", (), (), (0.0, 2.0, 16.0, 16.0)),)),
        SceneGraph("empty", 10, 10, ()),
    ]


def broken(edit):
    graphs = json.loads(GRAPHS_JSON)
    edit(graphs)
    return graphs


@pytest.mark.parametrize(("graphs", "message"), [
    (broken(lambda g: g["07"].pop("height")), "image '07': needs width, height and objects; found ['objects', "
                                              "'width']"),
    (broken(lambda g: g["07"].update(objects=[])), "image '07': 'objects' must map object ids to records"),
    (broken(lambda g: g["07"]["objects"].update({"2": "cube"})), "image '07', object '2': expected a record, "
                                                                 "found 'cube'"),
    (broken(lambda g: g["07"]["objects"]["1"].pop("name")), "image '07', object '1': needs a 'name'"),
    (broken(lambda g: g["07"]["objects"]["1"].update(w="16")), "image '07', object '1', field 'w': expected a "
                                                               "number, found '16'"),
    (broken(lambda g: g["07"].update(width=True)), "image '07', field 'width': expected a number, found True"),
    (broken(lambda g: g["07"]["objects"]["1"].update(attributes="red")), "image '07', object '1': 'attributes' "
                                                                         "must be a list of names, found 'red'"),
    (broken(lambda g: g["2354786"]["objects"]["429128"]["relations"][1].pop("object")),
     "image '2354786', object '429128': every relation needs 'name' and 'object'"),
    (broken(lambda g: g["2354786"]["objects"].pop("429134")),
     "image '2354786', object '429128': relations point to object(s) ['429134', '429134'] that the image does "
     "not have"),
])
def test_a_malformed_image_is_named_with_its_file_and_what_is_wrong(tmp_path, graphs, message):
    path = tmp_path / "val_sceneGraphs.json"
    path.write_text(json.dumps(graphs))
    with pytest.raises(MalformedFileError, match=re.escape(f"scene-graph file {path}, {message}")):
        list(read_scene_graphs(path))


def test_a_file_that_is_not_one_json_object_or_is_cut_off_is_named(tmp_path):
    path = tmp_path / "val_sceneGraphs.json"
    path.write_text(json.dumps([json.loads(GRAPHS_JSON)]))
    with pytest.raises(MalformedFileError, match=re.escape(f"scene-graph file {path}: expected a JSON object")):
        list(read_scene_graphs(path))
    path.write_text(GRAPHS_JSON[:-30])
    with pytest.raises(MalformedFileError, match=re.escape(f"scene-graph file {path} is not valid JSON")):
        list(read_scene_graphs(path))

"""GQA scene-graph files, streamed and checked in one place for every reader (question boxes, probing datasets).

A scene-graph file (`{split}_sceneGraphs.json`, GQA's or the synthetic world's) is one JSON object:

    imageId -> {width, height, objects: {objectId: {name, x, y, w, h, attributes: [...],
                                                    relations: [{name, object}, ...]}}}

GQA's train file is large, so `read_scene_graphs` streams it one image at a time and turns each image into a
`SceneGraph` record, checked as it goes: a missing field, a box that is not numbers or a relation to an object
the image does not have is an error naming the file, the image and the object. An object without
`attributes` or `relations` has none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmscope.data.errors import MalformedFileError
from mmscope.data.rows import iter_json_object


@dataclass(frozen=True)
class Relation:
    """A relation from its object to another of the same image: `name` ("to the left of" …) and that object's id."""

    name: str
    object_id: str


@dataclass(frozen=True)
class GraphObject:
    """One object of a scene graph; `box` is `(x, y, w, h)` in original image pixels."""

    object_id: str
    name: str
    attributes: tuple[str, ...]
    relations: tuple[Relation, ...]
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneGraph:
    """One image's scene graph: its id, size in pixels and objects (in file order)."""

    image_id: str
    width: int
    height: int
    objects: tuple[GraphObject, ...]


def read_scene_graphs(path: Path) -> Iterator[SceneGraph]:
    """The scene graphs of a GQA-format scene-graph file, one image at a time, in file order.

    Raises `MalformedFileError` naming the file, the image (and the object) for invalid JSON, a missing or
    mistyped field, or a relation pointing to an object the image does not have.
    """
    for image_id, graph in iter_json_object(path, "scene-graph file"):
        yield _scene_graph(image_id, graph, f"scene-graph file {path}, image {image_id!r}")


def _scene_graph(image_id: str, graph: object, where: str) -> SceneGraph:
    if not isinstance(graph, dict) or not {"width", "height", "objects"} <= graph.keys():
        fields = sorted(graph) if isinstance(graph, dict) else type(graph).__name__
        raise MalformedFileError(f"{where}: needs width, height and objects; found {fields}")
    if not isinstance(graph["objects"], dict):
        raise MalformedFileError(f"{where}: 'objects' must map object ids to records")
    objects = tuple(_graph_object(object_id, obj, f"{where}, object {object_id!r}")
                    for object_id, obj in graph["objects"].items())
    ids = {obj.object_id for obj in objects}
    for obj in objects:
        strays = [r.object_id for r in obj.relations if r.object_id not in ids]
        if strays:
            raise MalformedFileError(f"{where}, object {obj.object_id!r}: relations point to object(s) {strays} "
                                     "that the image does not have")
    return SceneGraph(image_id, int(_number(graph["width"], f"{where}, field 'width'")),
                      int(_number(graph["height"], f"{where}, field 'height'")), objects)


def _graph_object(object_id: str, obj: object, where: str) -> GraphObject:
    if not isinstance(obj, dict):
        raise MalformedFileError(f"{where}: expected a record, found {obj!r}")
    if not isinstance(obj.get("name"), str):
        raise MalformedFileError(f"{where}: needs a 'name'")
    box = tuple(_number(obj.get(k), f"{where}, field {k!r}") for k in ("x", "y", "w", "h"))
    attributes = obj.get("attributes") or []
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        raise MalformedFileError(f"{where}: 'attributes' must be a list of names, found {attributes!r}")
    relations = obj.get("relations") or []
    if not isinstance(relations, list) or not all(isinstance(r, dict) and {"name", "object"} <= r.keys()
                                                  for r in relations):
        raise MalformedFileError(f"{where}: every relation needs 'name' and 'object'")
    return GraphObject(object_id, obj["name"], tuple(attributes),
                       tuple(Relation(str(r["name"]), str(r["object"])) for r in relations), box)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedFileError(f"{where}: expected a number, found {value!r}")
    return float(value)

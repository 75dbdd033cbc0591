"""The auxiliary targets: what the small training-only heads must read, taken from a split's scene graphs
(`SceneTargets`).

A vision tower trained from scratch on answer-only loss learns slowly: the decoder first learns the answer
priors of each question template and sits on that plateau. So, as in region-supervised VLM pre-training, each
image token also gets a dense auxiliary target during training — the shape, colour, size and material of the
object under its patch (or background), and the patch's own column and row — read by small linear heads from
the projector's output, i.e. from exactly the features the decoder sees (`SceneTargets.patches`).

Binding the question's words to image regions is the other slow part. So, like grounded VLM pre-training
(region-word alignment), each object the question mentions (GQA's own annotations: the word and the object
id, found in the question by `mention_positions`) gets a second auxiliary target at that word's position:
whether the object is in the image and, if it is, its shape, colour, size, material and the row and column of
its centre (`SceneTargets.mention`); the image tokens that show it (`SceneTargets.object_patches`), which the
attention loss is taught to look at; and, read at the last prompt position only, whether it has the attribute
value the question names (`SceneTargets.named`). How the heads read them is `mmscope.zoo.shapes_llava.objective`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmscope.data.scene_graphs import GraphObject, read_scene_graphs

IGNORE = -100  # cross-entropy's ignore_index
MAX_MENTIONS = 2  # objects a question names (CompareAttr, ChooseRel, LogicalObj name two)


def mention_positions(words: list[str], mentions: list[str]) -> list[int]:
    """Index in `words` of each mentioned word (or its plural), first occurrence, as GQA's annotations count."""
    positions = []
    for mention in mentions:
        hits = [i for i, word in enumerate(words) if word in (mention, f"{mention}s")]
        positions.append(hits[0] if hits else -1)
    return positions


class SceneTargets:
    """Auxiliary labels from a split's scene graphs: per image patch, and per object the question mentions."""

    def __init__(self, scene_graphs: Path, vocabulary: dict, grid: int, image_size: int) -> None:
        self.heads = {"shape": vocabulary["shapes"], "color": vocabulary["colors"], "size": vocabulary["sizes"],
                      "material": vocabulary["materials"]}
        self.grid, self.cell = grid, image_size / grid
        self.attribute_values = {value for name, values in self.heads.items() if name != "shape" for value in values}
        self.graphs = {graph.image_id: {obj.object_id: obj for obj in graph.objects}
                       for graph in read_scene_graphs(Path(scene_graphs))}

    def sizes(self) -> dict[str, int]:
        """Classes per patch head (index 0 = background), plus the patch's own column and row."""
        return {**{name: len(values) + 1 for name, values in self.heads.items()}, "column": self.grid, "row": self.grid}

    def mention_sizes(self) -> dict[str, int]:
        """Classes per mention head: present or not, then the attributes and the centre's row and column."""
        return {"present": 2, **{name: len(values) for name, values in self.heads.items()},
                "column": self.grid, "row": self.grid}

    def _values(self, obj: GraphObject) -> list[int]:
        return [values.index(obj.name if name == "shape" else next(a for a in obj.attributes if a in values))
                for name, values in self.heads.items()]

    def patches(self, image_id: str) -> torch.Tensor:
        """`[grid * grid, n_heads]` class indices, row-major like the image tokens."""
        labels = torch.zeros(self.grid, self.grid, len(self.heads) + 2, dtype=torch.long)
        labels[:, :, -2] = torch.arange(self.grid)[None, :]
        labels[:, :, -1] = torch.arange(self.grid)[:, None]
        for obj in self.graphs[image_id].values():
            cells = self._cells(obj)
            for head, value in enumerate(self._values(obj)):
                labels[:, :, head][cells] = value + 1
        return labels.reshape(self.grid * self.grid, -1)

    def _cells(self, obj: GraphObject) -> torch.Tensor:
        """`[grid, grid]`: the patches whose centre lies inside the object's box."""
        centres = (torch.arange(self.grid) + 0.5) * self.cell
        x, y, w, h = obj.box
        inside_x = (centres >= x) & (centres < x + w)
        inside_y = (centres >= y) & (centres < y + h)
        return inside_y[:, None] & inside_x[None, :]

    def object_patches(self, image_id: str, object_id: str) -> torch.Tensor:
        """`[grid * grid]` bool: the image tokens showing the object (none for an empty id)."""
        if not object_id:
            return torch.zeros(self.grid * self.grid, dtype=torch.bool)
        return self._cells(self.graphs[image_id][object_id]).flatten()

    def mention(self, image_id: str, object_id: str) -> list[int]:
        """Labels of one mentioned object (an empty id: not in the image; its other heads are ignored)."""
        if not object_id:
            return [0] + [IGNORE] * (len(self.heads) + 2)
        obj = self.graphs[image_id][object_id]
        x, y, w, h = obj.box
        column = min(self.grid - 1, int((x + w / 2) / self.cell))
        row = min(self.grid - 1, int((y + h / 2) / self.cell))
        return [1, *self._values(obj), column, row]

    def named(self, image_id: str, object_id: str, words: list[str]) -> int:
        """1 if the object has the first attribute value among the question's `words` ("Is there a cube or a cone
        that is *green*?"), 0 if it lacks it or is not in the image; `IGNORE` when the question names no value.

        Only the last prompt position can be asked this: at the object's own word the value may not be read yet."""
        value = next((word for word in words if word in self.attribute_values), None)
        if value is None:
            return IGNORE
        if not object_id:
            return 0
        return int(value in self.graphs[image_id][object_id].attributes)

"""A synthetic world in GQA's own file format: small scenes of solids, GQA-style questions in all six categories.

Why: the study's experiments need a model that answers GQA-style questions, and a tiny LLaVA can only be
trained from scratch (on CPU, in minutes) on a world it can actually learn. `synthesize` writes such a world as
real GQA files, so `load_gqa` reads it exactly like the real thing and every experiment runs unchanged on both.

The world:
- a scene is 1-4 objects (one object in a tenth of the scenes) on a plain background, at most one per shape,
  so "the cube" is unambiguous. Each object has a shape (cube, sphere, cylinder, cone), a colour (red, green,
  blue, yellow, purple, gray), a size (small, large: about 19% and 32% of the image side) and a material
  (metal, rubber); boxes never overlap;
- in a scene with two or more objects the first two share exactly one of colour, size and material (so every
  such scene can ask CompareAttr; which one is shared follows the CompareAttr answer counts, to keep them even);
- spatial facts are only stated with a clear margin: "left of" needs the box centres 12% of the image apart
  horizontally, "on the left side" a centre at least a sixth of the image from the middle.

The questions (GQA's templates and `types.detailed`; answers in GQA's answer form):

| category | detailed types | example | answers |
| --- | --- | --- | --- |
| ChooseAttr | chooseAttr, materialChoose | Is the cube red or blue? | the 6 colours, small/large, metal/rubber |
| ChooseCat | objThisChoose, categoryThatChoose | What is the large red object, a cube or a cone? | the 4 shapes |
| ChooseRel | relChooser | Is the cube to the left or to the right of the sphere? | left/right, above/below |
| CompareAttr | twoCommon | What do the cube and the sphere have in common? | color/size/material |
| LogicalObj | existThatOr (yes), existThatOrC (no) | Is there a cube or a cone that is green? | yes/no |
| QueryAttr | positionQuery | On which side of the photo is the cube? | left/right |
| (none) | directOf, material | What color is the cube? | colours, sizes, materials, shapes |

objThisChoose ("What is this, …") is asked only in one-object scenes, where "this" is unambiguous. The last row is
training variety outside the study's six (its rows get `category=None`).

Balance: answers are chosen greedily per split so that, within each category and template family (ChooseAttr's
colour/size/material questions, ChooseRel's horizontal/vertical ones, …), every answer is about equally common;
the true option of a choose question comes first or second equally often; categories get equal shares. So
neither the answer prior nor the option order nor the template gives the answer away: a model must look (on
48k questions, an exact-question-text lookup and a word-level naive Bayes fitted on train score chance on
val+test in all six categories).

Splits partition the scenes (no image is in two splits); everything follows from `seed`.

The package: `scenes` (the vocabulary, sampling and placing objects, spatial facts, the scene graph),
`questions` (one class per category, each listing the questions a scene supports and asking one, and the
balanced sampler over them), `writing` (splits, records, images, `synthesize`, `load_synthetic`).
"""

from mmscope.data.synthetic.questions import ANSWERS, OTHER
from mmscope.data.synthetic.scenes import (
    ATTRIBUTES,
    COLORS,
    MATERIALS,
    SHAPES,
    SIDE_FRACTION,
    SIZES,
    Scene,
    SceneObject,
    sample_scene,
    scene_graph,
)
from mmscope.data.synthetic.writing import DEFAULT_SPLITS, SyntheticFiles, load_synthetic, synthesize

__all__ = [
    "ANSWERS",
    "ATTRIBUTES",
    "COLORS",
    "DEFAULT_SPLITS",
    "MATERIALS",
    "OTHER",
    "SHAPES",
    "SIDE_FRACTION",
    "SIZES",
    "Scene",
    "SceneObject",
    "SyntheticFiles",
    "load_synthetic",
    "sample_scene",
    "scene_graph",
    "synthesize",
]

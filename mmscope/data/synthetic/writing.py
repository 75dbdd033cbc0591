"""Writing a synthetic world: splits, GQA question records, rendered images, `synthesize` and `load_synthetic`."""

from __future__ import annotations

import json
import multiprocessing
import numbers
import os
import random
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from tqdm.auto import tqdm

from mmscope.data.categories import DETAILED_TYPE_TO_CATEGORY
from mmscope.data.errors import DataError, DataFileNotFoundError, MalformedFileError
from mmscope.data.gqa import load_gqa
from mmscope.data.render import render
from mmscope.data.rows import check_split
from mmscope.data.synthetic.questions import ANSWERS, TYPE_GROUPS, Question, QuestionSampler
from mmscope.data.synthetic.scenes import (
    COLORS,
    MATERIALS,
    SHAPES,
    SIDE_FRACTION,
    SIZES,
    Scene,
    sample_scene,
    scene_graph,
)
from mmscope.errors import known

DEFAULT_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


@dataclass(frozen=True)
class SyntheticFiles:
    """Where `synthesize` wrote the world (official GQA layout), per split."""

    root: Path
    questions: dict[str, Path]
    scene_graphs: dict[str, Path]
    images: Path
    world: Path


def _annotate(text: str, mentions: list[tuple[str, str]]) -> dict[str, str]:
    """GQA annotations: token index (as a string) -> object id, for each mentioned word's first occurrence."""
    tokens = [t.lower() for t in re.findall(r"\w+|[^\w\s]", text)]
    annotations = {}
    for word, object_id in mentions:
        for index, token in enumerate(tokens):
            if token in (word, f"{word}s"):
                annotations[str(index)] = object_id
                break
    return annotations


def _gqa_record(question_id: str, scene: Scene, answer: str, q: Question) -> dict:
    """The GQA questions-file record of question `q` about `scene`."""
    structural, semantic = TYPE_GROUPS[q.detailed]
    steps = [{"operation": op, "dependencies": deps, "argument": arg} for op, arg, deps in q.steps]
    semantic_str = "->".join(
        f"{op}: {arg}" + (f" [{', '.join(map(str, deps))}]" if deps else "") for op, arg, deps in q.steps
    )
    return {
        "imageId": scene.image_id,
        "question": q.question,
        "answer": answer,
        "fullAnswer": q.full_answer,
        "isBalanced": True,
        "groups": {"global": None, "local": q.detailed},
        "entailed": [],
        "equivalent": [question_id],
        "types": {"structural": structural, "semantic": semantic, "detailed": q.detailed},
        "annotations": {
            "question": _annotate(q.question, q.mentions),
            "answer": {},
            "fullAnswer": _annotate(q.full_answer, q.mentions),
        },
        "semantic": steps,
        "semanticStr": semantic_str,
    }


def _split_sizes(n_scenes: int, splits: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    """Scenes per split: largest-remainder rounding of `n_scenes * fraction`; every split gets at least one."""
    names = [name for name, _ in splits]
    fractions = [fraction for _, fraction in splits]
    if not splits or len(set(names)) != len(names) or any(not re.fullmatch(r"\w+", n) for n in names):
        raise DataError(f"splits must be distinct word-character names with fractions; got {list(splits)}")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be positive and sum to 1; got {dict(splits)}")
    exact = [n_scenes * f for f in fractions]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(len(splits)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n_scenes - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) == 0:
        raise DataError(f"n_scenes={n_scenes} is too few for splits {dict(splits)}: some split gets no scene")
    return list(zip(names, sizes))


def _render_file(task: tuple[str, int, list]) -> None:
    path, image_size, objects = task
    # 4:4:4 chroma and high quality keep the flat colours of small objects clean.
    render(image_size, objects).save(path, "JPEG", quality=95, subsampling=0)


def _render_all(tasks: list[tuple[str, int, list]], workers: int, progress: bool) -> None:
    bar = tqdm(total=len(tasks), desc="rendering scenes", unit="image", disable=not progress)
    if workers <= 1:
        for task in tasks:
            _render_file(task)
            bar.update()
    else:
        # fork starts workers at once on Linux; other platforms keep their default start method.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with context.Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_file, tasks, chunksize=32):
                bar.update()
    bar.close()


RENDERED = "rendered.json"  # beside world.json: the splits whose images are drawn (absent: all of them)


def _world(sizes: list[tuple[str, int]], seed: int, image_size: int, questions_per_scene: int, images: Path):
    """Per split, in order: its questions, scene graphs and render tasks — all a function of `seed`."""
    rng = random.Random(seed)
    index, question_number = 0, 0
    for split, n_split in sizes:
        sampler = QuestionSampler(rng)
        questions, graphs, tasks = {}, {}, []
        for _ in range(n_split):
            scene = sample_scene(rng, index, image_size, sampler.shared_attribute())
            index += 1
            graphs[scene.image_id] = scene_graph(scene)
            tasks.append((str(images / f"{scene.image_id}.jpg"), image_size,
                          [(o.shape, COLORS[o.color], o.material == "metal", (o.x, o.y, o.side))
                           for o in scene.objects]))
            for _, answer, question in sampler.ask(scene, questions_per_scene):
                question_id = f"{question_number:08d}"
                question_number += 1
                questions[question_id] = _gqa_record(question_id, scene, answer, question)
        yield split, questions, graphs, tasks


def _mark_rendered(out_dir: Path, splits: Sequence[str]) -> None:
    marker = out_dir / RENDERED
    before = json.loads(marker.read_text()) if marker.exists() else []
    marker.write_text(json.dumps(sorted(set(before) | set(splits))))


def rendered_splits(out_dir: str | Path) -> list[str] | None:
    """The splits of a synthetic world whose images are drawn (None: all of them — a world drawn whole)."""
    marker = Path(out_dir) / RENDERED
    return json.loads(marker.read_text()) if marker.exists() else None


def render_splits(out_dir: str | Path, splits: Sequence[str], *, workers: int | None = None,
                  progress: bool = True) -> None:
    """Draw the images of `splits` of a world `synthesize` wrote with only some splits rendered (those drawn
    already are left alone); the images equal those a whole `synthesize` would draw."""
    out_dir = Path(out_dir)
    done = rendered_splits(out_dir)
    missing = [split for split in splits if done is not None and split not in done]
    if not missing:
        return
    world = json.loads((out_dir / "world.json").read_text())
    sizes = [(name, counts["scenes"]) for name, counts in world["splits"].items()]
    unknown = sorted(set(missing) - {name for name, _ in sizes})
    if unknown:
        raise DataError(f"split {unknown[0]!r} is not one of {out_dir}'s: {known([name for name, _ in sizes])}")
    tasks = [task for split, _, _, split_tasks in _world(sizes, world["seed"], world["image_size"],
                                                          world["questions_per_scene"], out_dir / "images")
             if split in missing for task in split_tasks]
    _render_all(tasks, workers or os.cpu_count() or 1, progress)
    _mark_rendered(out_dir, missing)


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    ours = [out_dir / name for name in ("questions", "sceneGraphs", "images", "world.json", RENDERED)]
    present = [path for path in ours if path.exists()]
    if present and not overwrite:
        raise DataError(f"{out_dir} already holds {', '.join(p.name for p in present)}; "
                        "pass overwrite=True (--overwrite) to replace them")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in ours[:3]:
        path.mkdir(parents=True)


def synthesize(
    out_dir: str | Path,
    n_scenes: int,
    seed: int = 0,
    *,
    image_size: int = 96,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    questions_per_scene: int = 8,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    render: Sequence[str] | None = None,
) -> SyntheticFiles:
    """Write a synthetic world of `n_scenes` scenes in GQA's layout under `out_dir`; return the paths.

    Files: `questions/{split}_balanced_questions.json`, `sceneGraphs/{split}_sceneGraphs.json`,
    `images/{imageId}.jpg` and `world.json` (vocabulary, answers per category, settings, counts).

    Args:
        n_scenes: scenes (= images) over all splits; each gets up to `questions_per_scene` questions.
        seed: everything (scenes, questions, splits) is a function of it; images do not depend on `workers`.
        image_size: side of the square images in pixels (objects scale with it; >= 64 keeps them >= 12 px).
        splits: (name, fraction) pairs; scenes are divided by largest-remainder rounding, no scene shared.
        workers: rendering processes (default: all CPU cores).
        overwrite: replace a world already in `out_dir` (only the four entries above are removed).
        progress: show a progress bar.
        render: the splits whose images to draw now (default: all); `render_splits` draws the others later,
            identically. The questions and scene graphs of every split are always written.
    """
    for name, value in (("n_scenes", n_scenes), ("seed", seed), ("image_size", image_size),
                        ("questions_per_scene", questions_per_scene)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise DataError(f"{name} must be a whole number; got {value!r}")
    if n_scenes < 1 or questions_per_scene < 1 or image_size < 32:
        raise DataError(f"need n_scenes >= 1, questions_per_scene >= 1 and image_size >= 32; got {n_scenes}, "
                        f"{questions_per_scene}, {image_size}")
    out_dir = Path(out_dir)
    sizes = _split_sizes(n_scenes, splits)
    _prepare_folder(out_dir, overwrite)
    files = SyntheticFiles(
        root=out_dir,
        questions={name: out_dir / "questions" / f"{name}_balanced_questions.json" for name, _ in sizes},
        scene_graphs={name: out_dir / "sceneGraphs" / f"{name}_sceneGraphs.json" for name, _ in sizes},
        images=out_dir / "images",
        world=out_dir / "world.json",
    )
    counts, tasks = {}, {}
    for split, questions, graphs, split_tasks in _world(sizes, seed, image_size, questions_per_scene, files.images):
        files.questions[split].write_text(json.dumps(questions))
        files.scene_graphs[split].write_text(json.dumps(graphs))
        counts[split] = {"scenes": len(graphs), "questions": len(questions)}
        tasks[split] = split_tasks
    drawn = [name for name, _ in sizes] if render is None else [name for name, _ in sizes if name in render]
    _render_all([task for split in drawn for task in tasks[split]], workers or os.cpu_count() or 1, progress)
    if render is not None:
        _mark_rendered(out_dir, drawn)
    world = {
        "format": "mmscope synthetic GQA world",
        "version": 1,
        "seed": seed,
        "n_scenes": n_scenes,
        "image_size": image_size,
        "questions_per_scene": questions_per_scene,
        "splits": counts,
        "vocabulary": {"shapes": SHAPES, "colors": list(COLORS), "sizes": SIZES, "materials": MATERIALS},
        "colors_rgb": COLORS,
        "object_side_px": {size: round(f * image_size) for size, f in SIDE_FRACTION.items()},
        "answers": ANSWERS,
        "detailed_types": {t: DETAILED_TYPE_TO_CATEGORY.get(t) for t in TYPE_GROUPS},
    }
    files.world.write_text(json.dumps(world, indent=2))
    return files


def world_splits(out_dir: Path) -> list[str]:
    """The split names a synthetic world's `world.json` lists, checked to be there and well formed."""
    world_file = out_dir / "world.json"
    if not world_file.is_file():
        raise DataFileNotFoundError(f"{out_dir} is not a synthetic world: {world_file} is missing "
                                    "(create one with mmscope.data.synthesize or `mmscope data synth`)")
    text = world_file.read_bytes()
    try:
        world = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"is not valid JSON ({error})" if text.strip() else "is empty"
        raise MalformedFileError(f"world file {world_file} {problem}; write the world again (`mmscope data synth "
                                 "--overwrite` with its --n-scenes and --seed)") from None
    splits = world.get("splits") if isinstance(world, dict) else None
    if not isinstance(splits, dict) or not splits:
        found = f"keys {known(sorted(world)) or '(none)'}" if isinstance(world, dict) else type(world).__name__
        raise MalformedFileError(f"world file {world_file} needs 'splits' (split name -> counts), as "
                                 f"`mmscope data synth` writes it; found {found}")
    return list(splits)


def load_synthetic(
    out_dir: str | Path,
    split: str = "train",
    *,
    categories: Sequence[str] | None = None,
    on_missing_image: str = "error",
) -> Dataset:
    """One split of a world written by `synthesize`, through `load_gqa` (with scene graphs and images).

    `categories` / `on_missing_image` as in `load_gqa`; the extra questions outside the six have
    `category=None` (pass `categories=CATEGORIES` to drop them).
    """
    out_dir = Path(out_dir)
    check_split(split, world_splits(out_dir), f"the synthetic world {out_dir}")
    return load_gqa(
        out_dir / "questions" / f"{split}_balanced_questions.json",
        out_dir / "sceneGraphs" / f"{split}_sceneGraphs.json",
        out_dir / "images",
        categories=categories,
        on_missing_image=on_missing_image,
    )


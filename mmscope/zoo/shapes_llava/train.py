"""Train the embedded LLaVA from scratch on the synthetic GQA-format world.

The recipe is LLaVA's, shrunk: a CLIP-style vision tower, a two-layer projector and a Llama decoder, trained
end to end on (image, prompt, answer) with the study's prompt template and cross-entropy on the answer tokens
(and the end-of-sequence token). Auxiliary targets speed up what answer-only training learns slowly — what each
image patch shows, which image region each word of the question names, and what the last prompt position must
gather — and shape where information flows (image -> question words -> last position), so interventions on the
shipped model find that route by construction; the model card says so.

`train` runs the recipe's stages; each part lives in a room of its own:

- `config`: what determines a run (`TrainConfig`, whose `option()` fields are `mmscope train`'s options), and
  its checks: a value outside its range is refused with a `TrainConfigError` naming the option as `mmscope
  train` spells it, before anything is created or written;
- `prompts`: the study's prompt for a first turn, and the multi-turn continuation for later ones;
- `targets`: the auxiliary labels read off the scene graphs, per image patch and per mentioned object;
- `batches`: the images preprocessed once, and rows turned into batches (`Batcher`);
- `objective`: the auxiliary heads, the forward pass, the losses, bfloat16 autocast, and validation;
- `schedule`: the two stages' optimization, stage 1 (vision pre-training), and which rows stage 2 draws;
- `resume`: the training state kept at every validation, and the world generated when no `--data` is given;
- `instructions`: the instruction-tuning mix beyond the study's questions (captions, statements, turns).

Everything is seeded; the same command on the same machine type gives the same checkpoint, and the same
command run again after a crash continues from `OUT/resume.pt` and ends with the same weights as an
uninterrupted run. The auxiliary heads are dropped after training: the result is an ordinary `save_pretrained`
folder of a plain `LlavaForConditionalGeneration`, with a model card.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmscope.zoo.build import build_llava, build_word_tokenizer, save_llava
from mmscope.zoo.shapes_llava.batches import Batcher, ImageSet
from mmscope.zoo.shapes_llava.config import TrainConfig, TrainConfigError
from mmscope.zoo.shapes_llava.instructions import TurnPool
from mmscope.zoo.shapes_llava.objective import (
    AuxiliaryHeads,
    answer_logits,
    attention_loss,
    autocast,
    auxiliary_heads,
    last_position_loss,
    reads_internals,
    step_losses,
    total_loss,
    uses_bf16,
    validation_accuracy,
)
from mmscope.zoo.shapes_llava.prompts import follow_up_of, prompt_of
from mmscope.zoo.shapes_llava.resume import (
    RESUME,
    TrainingStateError,
    generated_world,
    load_resume,
    restore_modules,
    restore_progress,
    training_state,
)
from mmscope.zoo.shapes_llava.resume import save_resume as _save_resume  # `train` saves through this name
from mmscope.zoo.shapes_llava.schedule import CategorySampler, optimizer_for, pretrain_vision, take_step
from mmscope.zoo.shapes_llava.targets import IGNORE, SceneTargets

# `train`, and the recipe's names as they were imported from here before it was split into rooms.
__all__ = ["IGNORE", "RESUME", "AuxiliaryHeads", "Batcher", "CategorySampler", "ImageSet", "SceneTargets",
           "TrainConfig", "TrainConfigError", "TrainingStateError", "answer_logits", "attention_loss",
           "follow_up_of", "last_position_loss", "prompt_of", "train"]


@dataclass
class _Run:
    """One run's pieces, as `train` builds them before stage 1, and its history."""

    config: TrainConfig
    out: Path
    world: Path
    rows: dict[str, Any]  # the train and val splits (`datasets.Dataset`)
    pool: TurnPool | None  # what later turns ask, with more than one turn or caption steps
    processor: Any
    targets: SceneTargets
    images: dict[str, ImageSet]  # per split
    modules: dict[str, torch.nn.Module]  # the model, then the auxiliary heads (`auxiliary_heads`)
    started: float  # `time.time()` when this process started the run
    wandb: Any = None  # the W&B run, with --wandb
    history: list[dict] = field(default_factory=list)
    before: float = 0.0  # minutes a crashed run had spent before this process continued it

    @property
    def model(self):
        return self.modules["model"]

    def minutes(self) -> float:
        return self.before + (time.time() - self.started) / 60


@dataclass
class _AnswerStage:
    """Stage 2's batches, optimizer and sampler, and its progress bar over the steps still to do."""

    batcher: Batcher
    val_batcher: Batcher
    val_indices: list[int]
    trained: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    sampler: CategorySampler
    progress: tqdm


def train(config: TrainConfig) -> Path:
    """Train and save the model to `config.out`; returns the folder. Continues a crashed run found in it."""
    config.check()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    started = time.time()
    resumed = load_resume(Path(config.out) / RESUME, config)
    run = _assemble(config, started)
    run.history = _vision_stage(run, resumed)
    stage = _answer_stage(run, resumed)
    for step in stage.progress:
        _answer_step(run, stage, step)
    return _finish(run)


def _assemble(config: TrainConfig, started: float) -> _Run:
    """The world (generated next to `out` without --data) and its splits, the tokenizer and model, the targets,
    the images and the auxiliary heads; then the output folder and the W&B run."""
    from mmscope.data.synthetic import load_synthetic

    out = Path(config.out)
    world = Path(config.data) if config.data else out.parent / f"{out.name}-world"
    if not config.data:
        generated_world(world, config)
    rows = {split: load_synthetic(world, split) for split in ("train", "val")}
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    questions, answers = list(rows["train"]["question"]), list(rows["train"]["answer"])
    pool = (TurnPool(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, list(rows["train"]["image_id"]),
                     questions, answers, seed=config.seed, positions=config.caption_positions)
            if config.turns > 1 or config.caption_steps or config.first_statement_share else None)
    model, processor = _model(config, questions + answers + (pool.corpus() if pool else []))
    grid = config.spec.image_size // config.spec.patch_size
    targets = SceneTargets(world / "sceneGraphs" / "train_sceneGraphs.json", vocabulary, grid, config.spec.image_size)
    images = {split: ImageSet(processor, rows[split]) for split in ("train", "val")}
    modules = {"model": model, **auxiliary_heads(config.spec.text_hidden, targets)}
    out.mkdir(parents=True, exist_ok=True)
    return _Run(config=config, out=out, world=world, rows=rows, pool=pool, processor=processor, targets=targets,
                images=images, modules=modules, started=started, wandb=_wandb_run(config) if config.wandb else None)


def _model(config: TrainConfig, corpus: list[str]):
    """A fresh model and processor of `config.spec` with a word tokenizer of `corpus`, set up for training."""
    model, processor = build_llava(build_word_tokenizer(corpus), config.spec, seed=config.seed)
    if config.attention_loss_weight:
        model.set_attn_implementation("eager")  # the attention loss needs the weights
    model.train()
    return model, processor


def _vision_stage(run: _Run, resumed: dict | None) -> list[dict]:
    """Stage 1 (`pretrain_vision`), or the weights and history of the crashed run being continued; then the
    vision tower frozen where `freeze_vision` says. Returns the history so far."""
    config = run.config
    if resumed is None:
        history = (pretrain_vision(run.model, run.images["train"], run.targets, run.modules["auxiliary"], config,
                                   run.wandb) if config.vision_steps else [])
    else:
        restore_modules(run.out / RESUME, resumed, run.modules)
        history = resumed["history"]
    if config.freeze_vision:
        run.model.model.vision_tower.requires_grad_(False)
        run.model.model.vision_tower.eval()
    return history


def _answer_stage(run: _Run, resumed: dict | None) -> _AnswerStage:
    """Stage 2's batches (with a frozen tower, over vision features computed once), validation questions,
    optimizer and sampler — where the crashed run being continued left them."""
    config, images, rows = run.config, run.images, run.rows
    frozen = config.freeze_vision  # then the vision features are computed once
    batcher = Batcher(run.processor, rows["train"], images["train"],
                      images["train"].features(run.model) if frozen else None, run.targets,
                      turns=run.pool, extra_turns=config.turns - 1, caption_share=config.caption_share,
                      statement_share=config.statement_share, description_share=config.description_share,
                      first_statement_share=config.first_statement_share, seed=config.seed,
                      blank_share=config.blank_share,
                      flat_features=images["train"].features(run.model, flat=True) if frozen else None)
    val_batcher = Batcher(run.processor, rows["val"], images["val"])
    val_indices = random.Random(config.seed).sample(range(len(rows["val"])),
                                                    min(config.eval_questions, len(rows["val"])))
    trained = [p for module in run.modules.values() for p in module.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_for(trained, config, config.steps)
    sampler = CategorySampler(rows["train"]["category"], config.focus, config.seed)
    first = 0  # stage-2 steps already done
    if resumed is not None:
        first, run.before = restore_progress(run.out / RESUME, resumed, config, optimizer, schedule, sampler,
                                             batcher)
    progress = tqdm(range(first, config.steps), desc="stage 2: answers", unit="step", initial=first,
                    total=config.steps)
    if first:
        progress.write(f"resuming {run.out / RESUME} at step {first}")
    return _AnswerStage(batcher, val_batcher, val_indices, trained, optimizer, schedule, sampler, progress)


# How the progress bar shows each loss.
_SHOWN = {"loss": "answer", "patch_loss": "patches", "grounding_loss": "grounding", "attention_loss": "look",
          "gather_loss": "gather", "named_loss": "named"}


def _answer_step(run: _Run, stage: _AnswerStage, step: int) -> None:
    """Stage-2 step `step` (0-based): a batch, its losses, an optimizer step and its record in the history;
    at a validation step also the validation and, unless it is the last step, the training state."""
    config = run.config
    captioning = step < config.caption_steps  # the internal losses (if any) wait for the questions
    batch = stage.batcher(stage.sampler(config.batch_size), captions=captioning)
    losses = step_losses(config, run.modules, batch, reads_internals(config) and not captioning)
    take_step(total_loss(config, losses), stage.trained, stage.optimizer, stage.schedule)
    stage.progress.set_postfix(**{_SHOWN[name]: f"{loss.item():.3f}" for name, loss in losses.items()})
    record = {"step": step + 1, **{name: loss.item() for name, loss in losses.items()},
              "lr": stage.schedule.get_last_lr()[0]}
    if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
        _validate(run, stage, record)
    run.history.append(record)
    if run.wandb is not None:
        run.wandb.log(record)
    if "val_accuracy" in record and step + 1 < config.steps:
        _save_resume(run.out / RESUME, training_state(config, step + 1, run.history, run.minutes(), run.modules,
                                                      stage.optimizer, stage.schedule, stage.sampler, stage.batcher))


def _validate(run: _Run, stage: _AnswerStage, record: dict) -> None:
    """Validate, reweight the sampler by the validation errors, and add both to the step's `record`."""
    with autocast(run.config):
        scores = validation_accuracy(run.model, stage.val_batcher, stage.val_indices)
    stage.sampler.update(scores)
    record.update({f"sampling/{name}": weight for name, weight in zip(stage.sampler.names, stage.sampler.weights)})
    record["val_accuracy"] = scores.pop("all")
    record.update({f"val_accuracy/{category}": score for category, score in scores.items()})
    stage.progress.write(f"step {record['step']}: answer loss {record['loss']:.4f}  val accuracy "
                         f"{record['val_accuracy']:.3f} (" + ", ".join(f"{c} {v:.2f}" for c, v in scores.items()) + ")")


def _finish(run: _Run) -> Path:
    """Save the model (without the auxiliary heads), the world's record and `training.json`; the training state
    is no longer needed."""
    model, out = run.model, run.out
    model.eval()
    model.requires_grad_(True)
    model.set_attn_implementation("sdpa")
    save_llava(model, run.processor, out)
    shutil.copy(run.world / "world.json", out / "world.json")  # how to regenerate the data, held-out split included
    summary = {
        "config": {**asdict(run.config), "spec": asdict(run.config.spec)},
        "minutes": run.minutes(),
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in model.parameters()),
        "bf16": uses_bf16(run.config),
        "final_val_accuracy": run.history[-1].get("val_accuracy"),
        "world": str(run.world),
    }
    (out / "training.json").write_text(json.dumps({"summary": summary, "history": run.history}, indent=1))
    (out / RESUME).unlink(missing_ok=True)
    if run.wandb is not None:
        run.wandb.summary.update({k: v for k, v in summary.items() if k != "config"})
        run.wandb.finish()
    return out


def _wandb_run(config: TrainConfig):
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
    return wandb.init(project="mmscope", job_type="train", config={**asdict(config), "spec": asdict(config.spec)},
                      dir=config.out)

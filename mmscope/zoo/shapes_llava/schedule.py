"""How training is scheduled: LLaVA's two stages, with the roles adapted to a model trained from scratch, each
optimised by AdamW under a linear warm-up and cosine decay (`optimizer_for`), and which rows stage 2 draws.

1. vision pre-training (`pretrain_vision`): the vision tower and projector learn the per-patch targets alone
   (cheap: no decoder);
2. instruction tuning (`mmscope.zoo.shapes_llava.train`): the whole model learns the answers, with all the
   auxiliary losses. (`freeze_vision` keeps the tower frozen as LLaVA does, computing its features once per
   image — faster per step, but here the attention loss then falls much more slowly: the tower's keys cannot
   adapt to the decoder's queries.)

Stage 2 draws its rows category by category (`CategorySampler`), more of them where validation finds the model
still wrong.
"""

from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm

from mmscope.zoo.shapes_llava.batches import ImageSet, image_features
from mmscope.zoo.shapes_llava.config import FOCUS_RULE, TrainConfig, refuse
from mmscope.zoo.shapes_llava.objective import AuxiliaryHeads, autocast
from mmscope.zoo.shapes_llava.targets import SceneTargets


def cosine(warmup: int, steps: int):
    """Linear warm-up then cosine decay to 0, as a `LambdaLR` factor."""
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def optimizer_for(parameters: list[torch.nn.Parameter], config: TrainConfig, steps: int
                  ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A stage's AdamW over `parameters` and its learning-rate schedule over `steps` steps (`cosine`)."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(config.warmup, steps))


def take_step(loss: torch.Tensor, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One optimizer step on `loss`, its gradient norm clipped to 1."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def pretrain_vision(model, images: ImageSet, targets: SceneTargets, heads: AuxiliaryHeads, config: TrainConfig,
                    run=None) -> list[dict]:
    """Stage 1: the vision tower and projector learn the per-patch targets; returns the loss history."""
    parameters = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
                  *heads.parameters()]
    optimizer, schedule = optimizer_for(parameters, config, config.vision_steps)
    labels = torch.stack([targets.patches(image_id) for image_id in images.ids])
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    progress = tqdm(range(config.vision_steps), desc="stage 1: vision", unit="step")
    for step in progress:
        chosen = torch.randint(len(images), (config.vision_batch_size,), generator=generator)
        with autocast(config):
            features = image_features(model, images.pixel_values[chosen])
        loss = heads.loss(features.float(), labels[chosen])
        take_step(loss, parameters, optimizer, schedule)
        progress.set_postfix(patches=f"{loss.item():.3f}")
        history.append({"vision_step": step + 1, "vision_patch_loss": loss.item()})
        if run is not None:
            run.log(history[-1])
    return history


class CategorySampler:
    """Draws training rows category by category (with replacement): a share `1 - focus` of the draws is uniform
    over the categories, the share `focus` in proportion to each category's last validation error, so that
    steps go where the model is still wrong. Rows outside the six categories form one more category, which
    gets the mean error. Before the first `update` all categories are equally likely."""

    OTHER = "(other)"

    def __init__(self, categories: list[str | None], focus: float = 0.5, seed: int = 0) -> None:
        if not 0 <= focus <= 1:
            refuse("focus", focus, FOCUS_RULE)
        self.rows: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            self.rows.setdefault(category or self.OTHER, []).append(index)
        self.names = sorted(self.rows)
        self.focus = focus
        self.weights = [1 / len(self.names)] * len(self.names)
        self.random = random.Random(seed)

    def update(self, scores: dict[str, float]) -> None:
        """Reweight from validation accuracies per category (`validation_accuracy`'s dict)."""
        known = [1 - scores[name] for name in self.names if name in scores]
        mean = sum(known) / len(known) if known else 1.0
        errors = [1 - scores[name] if name in scores else mean for name in self.names]
        total = sum(errors)
        share = [e / total for e in errors] if total > 0 else [1 / len(errors)] * len(errors)
        self.weights = [(1 - self.focus) / len(self.names) + self.focus * w for w in share]

    def __call__(self, n: int) -> list[int]:
        chosen = self.random.choices(self.names, weights=self.weights, k=n)
        return [self.random.choice(self.rows[name]) for name in chosen]

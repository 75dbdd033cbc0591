"""What stage 2 minimises: cross-entropy on every answer token (and end-of-sequence token) of the sequence, and
the auxiliary losses that shape where information flows (image -> question words -> last position). The small
heads that read the auxiliary targets (`mmscope.zoo.shapes_llava.targets`) are linear (`AuxiliaryHeads`) and
dropped after training; the saved model is a plain `LlavaForConditionalGeneration`.

- patch: the per-patch targets, read from the projector's output (the features the decoder sees);
- grounding: each mentioned object's targets, read at its word's position from a middle decoder layer
  (`grounding_layer`);
- attention: one attention head of an earlier layer (`attention_layer`, `attention_head`) is taught where to
  look: from the object's word, its attention mass on that object's image patches is maximised;
- gather and named: comparing two objects (CompareAttr) or testing them against an attribute (LogicalObj,
  ChooseCat's options) happens at the last prompt position, which first has to gather what the question's words
  have learned. So the same mention targets (one set of heads per mention), and whether each object has the
  value the question names, are also read at the last prompt position from a later decoder layer
  (`gather_layer`): by then it must know both objects.

Interventions on the shipped model find that route by construction; the model card says so. Validation is a
fast proxy for generation: the share of answers predicted whole, greedily, under teacher forcing. The forward
pass runs under bfloat16 autocast where `bf16` says (by default where the CPU computes bfloat16 natively), the
weights staying float32.
"""

from __future__ import annotations

import torch

from mmscope.zoo.shapes_llava.batches import Batcher, image_features
from mmscope.zoo.shapes_llava.config import LOSSES, TrainConfig
from mmscope.zoo.shapes_llava.targets import IGNORE, MAX_MENTIONS, SceneTargets


class AuxiliaryHeads(torch.nn.Module):
    """Linear heads reading auxiliary targets from features (training only); `IGNORE` labels are skipped."""

    def __init__(self, dim: int, sizes: dict[str, int]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in sizes.values())

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over heads; `features [B, P, D]`, `labels [B, P, n_heads]`."""
        losses = [torch.nn.functional.cross_entropy(head(features).flatten(0, 1), labels[..., i].flatten(),
                                                    reduction="sum") / (labels[..., i] != IGNORE).sum().clamp(min=1)
                  for i, head in enumerate(self.heads)]
        return torch.stack(losses).mean()


def forward(model, batch: dict[str, torch.Tensor], internals: bool = False):
    """The decoder's output on `batch` and the projected image features. The image features (from the batch's
    pixels, or its cached vision features) are projected and scattered into the image-token positions exactly
    as the model's forward does. With `internals`, the output also has every layer's hidden states and (under
    eager attention) attention weights."""
    if "image_features" in batch:
        projected = model.model.multi_modal_projector(batch["image_features"])
    else:
        projected = image_features(model, batch["pixel_values"])
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    image_positions = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image_positions, projected.to(embeds.dtype))
    output = model.model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=internals,
        output_attentions=internals and model.config.text_config._attn_implementation == "eager",
    )
    return output, projected


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits `[B, A, V]` predicting each token of the first turn's answer (from the position before it)."""
    output, _ = forward(model, batch)
    start = int(batch["answer_start"])
    width = batch["answer_ids"].shape[1]
    return model.lm_head(output.last_hidden_state[:, start : start + width])


def labelled_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (every turn's answer and end-of-sequence token;
    `IGNORE` elsewhere): the language-model head runs only at the positions that predict one."""
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), targets[where])


def attention_loss(weights: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-log of the attention mass (`weights [B, T, T]`, one head) from each mentioned object's word onto that
    object's image tokens, averaged over mentions of objects in the image."""
    patches = batch["mention_patches"]  # [B, M, P]
    rows = weights.gather(1, batch["mention_positions"].clamp(min=0)[..., None].expand(-1, -1, weights.shape[-1]))
    image = batch["image_start"][:, None, None] + torch.arange(patches.shape[-1])  # [B, 1, P]
    on_image = rows.gather(2, image.expand(-1, rows.shape[1], -1))  # [B, M, P]
    mass = (on_image * patches).sum(-1)
    valid = patches.any(-1) & (batch["mention_positions"] >= 0)
    return -(mass[valid] + 1e-6).log().mean() if valid.any() else weights.sum() * 0


def at_mentions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden [B, T, D]` at `positions [B, M]` (-1 rows give position 0; their labels are ignored)."""
    index = positions.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def last_position_loss(hidden: torch.Tensor, batch: dict[str, torch.Tensor], heads: torch.nn.ModuleList,
                       labels: str = "mention_labels") -> torch.Tensor:
    """The mentioned objects' targets (`batch[labels]`, `[B, M, heads]`) read from `hidden [B, T, D]` at the last
    prompt position (the one that predicts the answer's first token): heads `m` read mention `m`; mean over
    mentions."""
    last = hidden[:, int(batch["answer_start"])][:, None]  # [B, 1, D]
    return torch.stack([head.loss(last, batch[labels][:, m, None]) for m, head in enumerate(heads)]).mean()


def validation_accuracy(model, batcher: Batcher, indices: list[int], batch_size: int = 128) -> dict[str, float]:
    """Share of questions whose whole answer is predicted greedily under teacher forcing (a fast proxy for
    generation): `{"all": …, category: …}` over `indices` of the batcher's dataset."""
    model.eval()
    right: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = batcher(indices[start : start + batch_size])
            predicted = answer_logits(model, batch).argmax(-1)
            right += (((predicted == batch["answer_ids"]) | ~batch["answer_mask"]).all(-1)).tolist()
    model.train()
    categories = batcher.dataset.select(indices)["category"]
    scores = {"all": sum(right) / max(1, len(right))}
    for category in sorted({c for c in categories if c}):
        hits = [r for r, c in zip(right, categories) if c == category]
        scores[category] = sum(hits) / len(hits)
    return scores


def native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX)? There autocast is about twice as fast as
    float32; elsewhere bfloat16 is emulated and an order of magnitude slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def uses_bf16(config: TrainConfig) -> bool:
    """`config.bf16`, with None resolved for this machine (`native_bf16`)."""
    return native_bf16() if config.bf16 is None else config.bf16


def autocast(config: TrainConfig):
    """bfloat16 autocast on CPU (weights and optimizer state stay float32), or a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(config))


def auxiliary_heads(dim: int, targets: SceneTargets) -> dict[str, torch.nn.Module]:
    """The heads of the auxiliary losses over features of width `dim`, by their name in the training state:
    per patch (`auxiliary`), at each mention (`grounding`), and at the last position one set per mention
    (`gathering`: the mention's targets; `naming`: the named value). Created in this order (their weights draw
    from torch's random state)."""
    return {
        "auxiliary": AuxiliaryHeads(dim, targets.sizes()),
        "grounding": AuxiliaryHeads(dim, targets.mention_sizes()),
        "gathering": torch.nn.ModuleList(AuxiliaryHeads(dim, targets.mention_sizes()) for _ in range(MAX_MENTIONS)),
        "naming": torch.nn.ModuleList(AuxiliaryHeads(dim, {"named": 2}) for _ in range(MAX_MENTIONS)),
    }


def reads_internals(config: TrainConfig) -> bool:
    """Does a loss read the decoder's inside (hidden states or attention weights), not only its output?"""
    return any(getattr(config, f"{loss}_loss_weight") for loss in LOSSES if loss != "patch")


def step_losses(config: TrainConfig, modules: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor],
                internals: bool) -> dict[str, torch.Tensor]:
    """One batch's losses by their name in the history: the answers' (`loss`), then the auxiliary ones (zero
    where their weight is, and the internal ones zero without `internals`)."""
    model = modules["model"]
    with autocast(config):
        output, projected = forward(model, batch, internals)
        answer_loss = labelled_loss(model, output.last_hidden_state, batch["labels"])
    zero = answer_loss * 0
    patch_loss = (modules["auxiliary"].loss(projected.float(), batch["patch_labels"]) if config.patch_loss_weight
                  else zero)
    if internals:
        inner = _internal_losses(config, modules, output, batch, zero)
    else:
        inner = dict.fromkeys(("grounding_loss", "attention_loss", "gather_loss", "named_loss"), zero)
    return {"loss": answer_loss, "patch_loss": patch_loss, **inner}


def _internal_losses(config: TrainConfig, modules: dict[str, torch.nn.Module], output,
                     batch: dict[str, torch.Tensor], zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """The losses read from the decoder's hidden states and attention weights."""
    grounding_loss = modules["grounding"].loss(at_mentions(output.hidden_states[config.grounding_layer].float(),
                                                           batch["mention_positions"]), batch["mention_labels"])
    gathered = output.hidden_states[config.gather_layer].float()
    gather_loss = last_position_loss(gathered, batch, modules["gathering"])
    named_loss = last_position_loss(gathered, batch, modules["naming"], "mention_named")
    look_loss = (attention_loss(output.attentions[config.attention_layer][:, config.attention_head].float(), batch)
                 if config.attention_loss_weight else zero)
    return {"grounding_loss": grounding_loss, "attention_loss": look_loss, "gather_loss": gather_loss,
            "named_loss": named_loss}


def total_loss(config: TrainConfig, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answers' loss plus each auxiliary loss times its weight."""
    return (losses["loss"] + config.patch_loss_weight * losses["patch_loss"]
            + config.grounding_loss_weight * losses["grounding_loss"]
            + config.attention_loss_weight * losses["attention_loss"]
            + config.gather_loss_weight * losses["gather_loss"] + config.named_loss_weight * losses["named_loss"])

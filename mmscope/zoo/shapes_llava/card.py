"""The model card of a checkpoint trained by `mmscope train`: architecture, data, training, measured accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig


def write_model_card(folder: str | Path, evaluation: str, command: str) -> Path:
    """Write `folder/README.md` from the checkpoint's config, `training.json`, `world.json` and `evaluation`
    (the table printed by `mmscope evaluate`, produced by `command`)."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    training = json.loads((folder / "training.json").read_text())
    summary, train_config = training["summary"], training["summary"]["config"]
    world = json.loads((folder / "world.json").read_text())
    vision, text = config.vision_config, config.text_config
    grid = vision.image_size // vision.patch_size
    vocabulary = world["vocabulary"]
    tower = "vision tower frozen" if train_config.get("freeze_vision") else "whole model"
    bf16 = summary.get("bf16", train_config.get("bf16"))  # as resolved on the machine (older runs: as set)
    precision = ("Mixed precision: bfloat16 autocast, float32 weights and optimizer state." if bf16
                 else "Float32 throughout.")
    named = (f"; there too, whether each mentioned object has the attribute value the question names (\"Is there "
             f"a cube or a cone that is *green*?\"; an absent object has none; weight "
             f"{train_config['named_loss_weight']})" if train_config.get("named_loss_weight") else "")
    card = f"""# shapes-llava

A small LLaVA-1.5-style vision-language model trained from scratch by mmscope on its synthetic GQA-format
world, so that interventions and probes have a real, trained model to act on anywhere (no download needed).

## Architecture
`LlavaForConditionalGeneration`, {summary['parameters'] / 1e6:.2f} M parameters:
- vision tower: CLIP ViT, {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.image_size}×{vision.image_size} images in
  {vision.patch_size}-px patches → {grid * grid} image tokens (features of layer {config.vision_feature_layer}, CLS dropped);
- projector: two-layer GELU MLP;
- language model: Llama, {text.num_hidden_layers} decoder layers, width {text.hidden_size}, {text.num_attention_heads} heads, vocabulary of {text.vocab_size} words
  (word-level `tokenizers` tokenizer, lower-cased);
- prompt: the study's Vicuna-v1 template (system prompt, `USER: <image>\\n{{question}} \\nAnswer the question using a
  single word or phrase. ASSISTANT:`); processor: `LlavaProcessor` with `LlavaImageProcessorPil`.

## Data
`mmscope.data.synthesize(n_scenes={world['n_scenes']}, seed={world['seed']}, image_size={world['image_size']})`: scenes of 1–4
objects — shapes {', '.join(vocabulary['shapes'])}; colours {', '.join(vocabulary['colors'])}; sizes
{', '.join(vocabulary['sizes'])}; materials {', '.join(vocabulary['materials'])} — with GQA-format questions of the six categories plus colour/shape/size/material
queries. Splits share no scene: {world['splits']['train']['questions']} training questions
({world['splits']['train']['scenes']} scenes); validation and test {world['splits']['test']['questions']} questions each.

## Training
`mmscope train --out DIR --seed {train_config['seed']}`, in LLaVA's two stages (AdamW lr {train_config['lr']}, cosine schedules):
1. vision pre-training, {train_config.get('vision_steps', 0)} steps of {train_config.get('vision_batch_size', 0)} images: the vision tower and projector learn, for
   every image token, the shape, colour, size and material of the object under it and the patch's row and column
   (from the scene graphs);
2. instruction tuning, {train_config['steps']} steps of {train_config['batch_size']} questions, {tower}: cross-entropy on the answer tokens,
   plus auxiliary losses read by linear heads that are discarded after training — the patch targets again at the
   projector's output (weight {train_config['patch_loss_weight']}); at each object word of the question (GQA's annotations), whether that
   object is in the image and its attributes and position, at the output of decoder layer {train_config.get('grounding_layer', '-')} (weight
   {train_config.get('grounding_loss_weight', 0)}); the attention mass that head {train_config.get('attention_head', '-')} of layer {train_config.get('attention_layer', '-')} puts from that word on the object's patches
   (weight {train_config.get('attention_loss_weight', 0)}); and the same object targets (one set of heads per mentioned object) at the last prompt
   position, at the output of decoder layer {train_config.get('gather_layer', '-')} (weight {train_config.get('gather_loss_weight', 0)}){named}.
{precision}

These auxiliary targets steer information along image → question words → last position, so knockouts on this
model find that route partly by construction; use it to exercise the tools, and a real VLM for findings.

Trained in {summary['minutes']:.0f} minutes on {summary['machine']}.
Final validation accuracy (teacher-forced whole answer): {summary['final_val_accuracy']:.3f}.

## Evaluation on the held-out test split
Greedy answers, stripped and lower-cased, against the label; "blank image" replaces every image by a black one.
`{command}`:

```
{evaluation}
```
"""
    path = folder / "README.md"
    path.write_text(card)
    return path

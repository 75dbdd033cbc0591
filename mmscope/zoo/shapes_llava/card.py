"""The model card of a checkpoint trained by `mmscope train`: architecture, data, training, the planted route,
and what was measured on it.

The measured parts are sections, each written by the command that measured it with `--card` (`mmscope evaluate
--card`, `mmscope knockout --card`, `mmscope probe --card`): its command line, its printed table and its figure,
kept in the checkpoint's `card/` folder (`write_card_section`), so that rerunning one command replaces its own
section and keeps the others. `README.md` is rendered from the checkpoint's files and those sections.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig

from mmscope.zoo.shapes_llava.batches import FLAT_COLOURS

SECTIONS = "card"  # the checkpoint's folder of measured sections
ORDER = ("evaluate", "knockout", "probe")  # sections in this order, any others after them by name
HEADINGS = {"evaluate": "Evaluation on held-out data", "knockout": "Attention knockout",
            "probe": "Layer-wise probes"}
INTRODUCTIONS = {"evaluate": "Greedy answers, stripped and lower-cased, against the label; \"blank image\" replaces "
                             "every image by a black one; \"chance\" is a uniform guess over the options each "
                             "question allows (a choose question's two, true or false, else its category's answers "
                             "among the questions)."}


def write_card_section(folder: str | Path, name: str, command: str, text: str, figure: Path | None = None) -> Path:
    """Keep section `name` (`command`, its printed `text`, and `figure` copied beside it) in the checkpoint's
    `card/` folder and render the card again; returns `README.md`."""
    folder = Path(folder)
    sections = folder / SECTIONS
    sections.mkdir(exist_ok=True)
    stem = "-".join(name.split())  # the section's files: no blank in their names
    if figure is not None:
        shutil.copyfile(figure, sections / f"{stem}.png")
    (sections / f"{stem}.json").write_text(json.dumps({"name": name, "command": command, "text": text,
                                                       "figure": f"{stem}.png" if figure is not None else None},
                                                      indent=1))
    return write_model_card(folder)


def measured_sections(folder: Path) -> str:
    """The card's measured sections, rendered (`write_card_section`)."""
    kept = {}
    for path in sorted((folder / SECTIONS).glob("*.json")):
        section = json.loads(path.read_text())
        kept[section.get("name", path.stem)] = section
    def rank(name: str) -> tuple[int, str]:  # by the command that wrote it (ORDER), then by name
        command = name.split()[0]
        return (ORDER.index(command) if command in ORDER else len(ORDER), name)

    parts = []
    for name in sorted(kept, key=rank):
        section, command = kept[name], name.split()[0]
        heading = HEADINGS.get(command, command) + name[len(command):]
        lines = [f"## {heading}", *([INTRODUCTIONS[command]] if command in INTRODUCTIONS else []),
                 f"`{section['command']}`:", "", "```", section["text"].rstrip(), "```"]
        if section.get("figure"):
            lines += ["", f"![{heading}]({SECTIONS}/{section['figure']})"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_model_card(folder: str | Path) -> Path:
    """Write `folder/README.md` from the checkpoint's config, `training.json`, `world.json` and its measured
    sections (`card/`)."""
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
    statements = statement_paragraph(train_config) + blank_paragraph(train_config)
    route = planted_route(train_config)
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
2. instruction tuning, {train_config['steps']} steps of {train_config['batch_size']} questions, {tower}: cross-entropy on the answer tokens
   (and the end token), plus the auxiliary losses of "The planted route" below (linear heads, discarded after
   training).
{precision}

{statements}{route}
Trained in {summary['minutes']:.0f} minutes on {summary['machine']}.
Final validation accuracy (teacher-forced whole answer): {summary['final_val_accuracy']:.3f}.

{measured_sections(folder)}
"""
    path = folder / "README.md"
    path.write_text(card)
    return path


def statement_paragraph(config: dict) -> str:
    """How the training mix holds true/false statements, where it does (empty where it holds none)."""
    share, turns = config.get("statement_share", 0.0), config.get("turns", 1)
    first = config.get("first_statement_share", 0.0)
    later = share * (turns - 1) if turns > 1 else 0.0
    if not later and not first:
        return ""
    blank = config.get("blank_share", 0.0)  # a sequence showing an empty image holds one question and nothing else
    per_sequence = (1 - blank) * (first + later)
    mean_turns = (1 - blank) * turns + blank
    opening = (f"A share {first} of the sequences opens with a statement instead of its question (no auxiliary "
               "target on it). " if first else "")
    follow = (f"Each later turn is a statement with probability {share}, otherwise another question about the image; "
              "within those turns questions come first. " if later else "")
    return (f"Every training sequence holds {turns} turn{'s' if turns > 1 else ''} about its image. {opening}{follow}"
            f"About {per_sequence:.2f} statements per sequence, {100 * per_sequence / mean_turns:.0f}% of the turns. A "
            "statement is asked as `True or false: There is a red cube.` and answered `true` or `false` (answer-token "
            "loss only, like the questions): the probing study's entailment pairs of the training split's scene "
            "graphs — true captions, and hard negatives with one attribute, object or relation swapped "
            "(`mmscope.data.probing.entailment_dataset`).\n\n")


def blank_paragraph(config: dict) -> str:
    """How the training mix holds empty images, where it does (empty where it holds none)."""
    share = config.get("blank_share", 0.0)
    if not share:
        return ""
    return (f"A share {share} of the sequences whose question offers options (every category but the extra "
            "colour, shape, size and material queries) shows an empty image instead of its scene — the world's "
            f"background, or one of {len(FLAT_COLOURS) - 1} other flat colours (black, the blank image `mmscope "
            "evaluate` shows, is not among them) — and keeps only its question, answered by one of its options, "
            "drawn at random each time: the two a choose question names, yes or no, left or right, the three "
            "attribute kinds of CompareAttr (no object targets, no later turns). In expectation that is cross-entropy against the "
            "uniform distribution over the options: with no evidence, every option equally likely.\n\n")


def planted_route(config: dict) -> str:
    """The route the auxiliary losses plant, step by step: which loss, at which layer and head, read at which
    positions — in mmscope's numbering (decoder layers from 0; "after layer L" is the residual stream that layer
    writes, `hidden_states[L + 1]`)."""
    rows = []
    if config.get("patch_loss_weight"):
        rows.append(("patch", config["patch_loss_weight"], "projector output (the decoder's input)", "—",
                     "every image token", "the attributes of the object under the patch (or background), its row and column"))
    if config.get("attention_loss_weight"):
        layer, head = config.get("attention_layer"), config.get("attention_head")
        rows.append(("attention", config["attention_loss_weight"], f"layer {layer}", f"head {head}",
                     "from each mentioned object's word to that object's image tokens",
                     "attention mass on the object's patches (maximised)"))
    if config.get("grounding_loss_weight"):
        after = config.get("grounding_layer", 0) - 1
        rows.append(("grounding", config["grounding_loss_weight"], f"after layer {after}", "—",
                     "each mentioned object's word", "present or not; shape, colour, size, material; row and column"))
    if config.get("gather_loss_weight") or config.get("named_loss_weight"):
        after = config.get("gather_layer", 0) - 1
        if config.get("gather_loss_weight"):
            rows.append(("gather", config["gather_loss_weight"], f"after layer {after}", "—", "the last prompt position",
                         "the grounding targets of each mentioned object (one set of heads per mention)"))
        if config.get("named_loss_weight"):
            rows.append(("named", config["named_loss_weight"], f"after layer {after}", "—", "the last prompt position",
                         "whether each mentioned object has the attribute value the question names"))
    if not rows:
        return "No auxiliary loss: nothing inside the decoder was trained toward a route.\n"
    table = "\n".join(f"| {loss} | {weight} | {where} | {head} | {positions} | {target} |"
                       for loss, weight, where, head, positions, target in rows)
    return f"""## The planted route
The auxiliary losses train linear heads (discarded after training) to read these targets at these places, so
information is pushed along image → question words → last position. Decoder layers count from 0; "after layer
L" is the residual stream layer L writes (`hidden_states[L + 1]`, mmscope's `residual` site of layer L).

| loss | weight | where | head | positions | target |
|---|---|---|---|---|---|
{table}

A method that claims to find where image information reaches the answer should find these steps on this model:
use it as a check with a known answer, not as a finding about VLMs — a real VLM learns its routes from answers
alone (why this model does not: `docs/answer-only-training.md`).
"""

"""The `mmscope` command line: one sub-command per job, each with `--help`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from mmscope.model import DEFAULT_MODEL
from mmscope.zoo.shapes_llava.train import TrainConfig

app = typer.Typer(
    name="mmscope",
    help="Mechanistic interventions for vision-language models, built on nnsight.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _config_file(ctx: typer.Context, value: Path | None) -> Path | None:
    """`--config file.yaml`: its keys become the defaults of the command's options (the command line wins)."""
    if value is not None:
        if not value.exists():
            raise typer.BadParameter(f"config file {str(value)!r} does not exist")
        loaded = yaml.safe_load(value.read_text()) or {}
        loaded = loaded.get("options", loaded)  # a run's config.yaml works as well
        ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in loaded.items()}}
    return value


Model = Annotated[str, typer.Option(help="Embedded model name, save_pretrained folder, or hub id.")]
Data = Annotated[Path | None, typer.Option(help="Synthetic-world folder, GQA folder, or the study's CSV folder "
                                                 "(default: the embedded model's held-out test split).")]
Images = Annotated[Path | None, typer.Option(help="GQA images folder, for the study's CSVs.")]
Split = Annotated[str, typer.Option(help="Split of --data to use.")]
Categories = Annotated[list[str] | None, typer.Option(help="Categories to run (repeatable; default all six).")]
Limit = Annotated[int | None, typer.Option(help="At most N questions per category.")]
Out = Annotated[Path | None, typer.Option(help="Run folder (default runs/<experiment>); reruns resume.")]
IncludeAll = Annotated[bool, typer.Option("--include-all", help="Keep questions the model answers wrongly.")]
Wandb = Annotated[bool, typer.Option("--wandb", help="Log to Weights & Biases (offline without an API key).")]
Config = Annotated[Path | None, typer.Option(help="YAML file of option values.", callback=_config_file,
                                             is_eager=True)]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Engine = Annotated[str, typer.Option(help="Sweep engine: prefix (shared prefix cache, batched) or naive.")]


def _start(kind: str, options: dict):
    """Load model and data, open the run folder with its config.yaml."""
    import torch

    import mmscope
    from mmscope.experiments.common import default_out
    from mmscope.experiments.runs import RunDir
    from mmscope.experiments.workspace import load_questions

    torch.manual_seed(options["seed"])
    model = mmscope.load(options["model"])
    dataset = load_questions(options["data"], options["split"], images=options.get("images"),
                             categories=options.get("categories"), limit=options.get("limit"))
    plain = {key: str(value) if isinstance(value, Path) else value for key, value in options.items() if key != "config"}
    run = RunDir(default_out(kind, options.get("out")), {"experiment": {"kind": kind, **plain}, "options": plain})
    typer.echo(f"{kind}: {model}, {len(dataset)} questions → {run.folder}")
    return model, dataset, run


@app.command()
def knockout(
    model: Model = DEFAULT_MODEL, data: Data = None, images: Images = None, split: Split = "test",
    categories: Categories = None, limit: Limit = 20,
    flows: Annotated[list[str] | None, typer.Option("--flow", help="source->target (repeatable; default: the "
                                                    "study's six flows).")] = None,
    window: Annotated[int, typer.Option(help="Window k of layers blocked around each centre layer.")] = 9,
    engine: Engine = "prefix", include_all: IncludeAll = False, out: Out = None, wandb: Wandb = False,
    seed: Seed = 0, config: Config = None,
) -> None:
    """Attention-knockout sweep over flows × centre layers: Δp% of the answer per GQA category."""
    options = dict(locals())
    from mmscope.experiments.knockout import STUDY_FLOWS, run_knockout
    from mmscope.experiments.report import report

    options["flows"] = flows = list(flows or STUDY_FLOWS)
    loaded, dataset, run = _start("knockout", options)
    counts = run_knockout(loaded, dataset, run, flows, window, include_all=include_all, engine=engine)
    typer.echo(report("knockout", run, counts, wandb))


@app.command()
def lens(
    model: Model = DEFAULT_MODEL, data: Data = None, images: Images = None, split: Split = "test",
    categories: Categories = None, limit: Limit = 20,
    lens: Annotated[str, typer.Option(help="raw (no final norm, as in the study) or normed.")] = "raw",
    include_all: IncludeAll = False, out: Out = None, wandb: Wandb = False, seed: Seed = 0, config: Config = None,
) -> None:
    """Logit lens at the last position: p(answer), its capitalised form and the false option, per layer."""
    options = dict(locals())
    from mmscope.experiments.lens import run_lens
    from mmscope.experiments.report import report

    loaded, dataset, run = _start("lens", options)
    typer.echo(report("lens", run, run_lens(loaded, dataset, run, lens, include_all), wandb))


@app.command()
def truncate(
    model: Model = DEFAULT_MODEL, data: Data = None, images: Images = None, split: Split = "test",
    categories: Categories = None, limit: Limit = 20, engine: Engine = "prefix", include_all: IncludeAll = False,
    out: Out = None, wandb: Wandb = False, seed: Seed = 0, config: Config = None,
) -> None:
    """Early exit after each layer: p(answer) and whether it is still the top token."""
    options = dict(locals())
    from mmscope.experiments.report import report
    from mmscope.experiments.truncate import run_truncate

    loaded, dataset, run = _start("truncate", options)
    typer.echo(report("truncate", run, run_truncate(loaded, dataset, run, include_all, engine), wandb))


@app.command()
def patch(
    model: Model = DEFAULT_MODEL, data: Data = None, images: Images = None, split: Split = "test",
    categories: Categories = None, limit: Limit = 10,
    site: Annotated[str, typer.Option(help="residual, attention or mlp.")] = "residual",
    groups: Annotated[list[str] | None, typer.Option("--group", help="Token groups to patch (repeatable).")] = None,
    include_all: IncludeAll = False, out: Out = None, wandb: Wandb = False, seed: Seed = 0, config: Config = None,
) -> None:
    """Clean → corrupted (another scene's image) activation patching: layer × token-group heatmap."""
    options = dict(locals())
    from mmscope.experiments.patch import PATCH_GROUPS, run_patch
    from mmscope.experiments.report import report

    options["groups"] = groups = list(groups or PATCH_GROUPS)
    loaded, dataset, run = _start("patch", options)
    typer.echo(report("patch", run, run_patch(loaded, dataset, run, groups, site, include_all), wandb))


@app.command()
def probe(
    model: Model = DEFAULT_MODEL, data: Data = None, split: Split = "test",
    n_images: Annotated[int, typer.Option(help="Images (scenes) to build the probe datasets from.")] = 300,
    probe_kind: Annotated[str, typer.Option("--probe", help="linear or mlp.")] = "linear",
    out: Out = None, wandb: Wandb = False, seed: Seed = 0, config: Config = None,
) -> None:
    """Layer-wise probes: image–text entailment (global) vs object recognition (local)."""
    options = dict(locals())
    from mmscope.experiments.probe import run_probe
    from mmscope.experiments.report import report
    from mmscope.experiments.workspace import probe_datasets
    from mmscope.probes import ProbeConfig

    loaded, _, run = _start("probe", {**options, "limit": 1})
    datasets = probe_datasets(data, split, n_images, seed)
    poolings = {"entailment": ["last", "text"], "objects": ["image", "last"]}
    counts = run_probe(loaded, datasets, run, poolings, ProbeConfig(kind=probe_kind, seed=seed))
    typer.echo(report("probe", run, counts, wandb))


@app.command()
def train(
    out: Path = typer.Option(..., help="Folder to write the trained checkpoint (save_pretrained) to."),
    data: Path | None = typer.Option(None, help="A synthetic-world folder; generated next to OUT when omitted."),
    n_scenes: int = typer.Option(TrainConfig.n_scenes, help="Scenes to synthesize when --data is omitted."),
    vision_steps: int = typer.Option(TrainConfig.vision_steps, help="Stage 1 (vision pre-training) optimizer steps."),
    freeze_vision: bool = typer.Option(TrainConfig.freeze_vision, help="Keep the vision tower frozen in stage 2."),
    steps: int = typer.Option(TrainConfig.steps, help="Stage 2 (answers) optimizer steps."),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    lr: float = typer.Option(TrainConfig.lr),
    seed: int = typer.Option(TrainConfig.seed),
    eval_every: int = typer.Option(TrainConfig.eval_every, help="Validate every N steps."),
    patch_loss_weight: float = typer.Option(TrainConfig.patch_loss_weight,
                                            help="Weight of the per-patch attribute loss (0 turns it off)."),
    grounding_loss_weight: float = typer.Option(TrainConfig.grounding_loss_weight,
                                                help="Weight of the mentioned-object loss (0 turns it off)."),
    gather_loss_weight: float = typer.Option(TrainConfig.gather_loss_weight,
                                             help="Weight of the last-position mentioned-object loss (0: off)."),
    named_loss_weight: float = typer.Option(TrainConfig.named_loss_weight,
                                            help="Weight of the last-position named-value loss (0: off)."),
    focus: float = typer.Option(TrainConfig.focus,
                                help="Share of each batch drawn by categories' validation error (0: uniform)."),
    bf16: bool = typer.Option(TrainConfig.bf16, help="bfloat16 autocast (float32 weights); --no-bf16 for float32."),
    wandb: bool = typer.Option(False, "--wandb", help="Log the run to Weights & Biases (offline without a key)."),
) -> None:
    """Train the embedded LLaVA from scratch on the synthetic GQA-format world (defaults: the shipped recipe)."""
    from mmscope.zoo.shapes_llava.train import train as run_training

    config = TrainConfig(out=str(out), data=str(data) if data else None, n_scenes=n_scenes, vision_steps=vision_steps,
                         freeze_vision=freeze_vision, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         eval_every=eval_every, patch_loss_weight=patch_loss_weight,
                         grounding_loss_weight=grounding_loss_weight, gather_loss_weight=gather_loss_weight,
                         named_loss_weight=named_loss_weight, focus=focus, bf16=bf16, wandb=wandb)
    folder = run_training(config)
    typer.echo(f"saved {folder}")


@app.command()
def evaluate(
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, checkpoint folder or hub id."),
    data: Path | None = typer.Option(None, help="Synthetic-world or GQA folder (default: the embedded test split)."),
    split: str = typer.Option("test", help="Which split of --data."),
    limit: int | None = typer.Option(None, help="Evaluate at most N questions per category."),
    batch_size: int = typer.Option(32),
    blank: bool = typer.Option(True, help="Also evaluate with blank images (the model must use the image)."),
    card: bool = typer.Option(False, "--card", help="Write the result into the model folder's model card."),
) -> None:
    """Greedy accuracy per GQA category, with and without the image."""
    import mmscope
    from mmscope.experiments.answers import accuracy, greedy_answers
    from mmscope.experiments.tables import accuracy_table
    from mmscope.experiments.workspace import load_questions

    loaded = mmscope.load(model)
    dataset = load_questions(data, split, limit=limit)
    results = {"image": accuracy(dataset, greedy_answers(loaded, dataset, batch_size=batch_size))}
    if blank:
        answers = greedy_answers(loaded, dataset, batch_size=batch_size, blank=True, desc="blank images")
        results["blank image"] = accuracy(dataset, answers)
    table = accuracy_table(results)
    typer.echo(table)
    if card:
        from mmscope.model import resolve
        from mmscope.zoo.shapes_llava.card import write_model_card

        command = f"mmscope evaluate --model {model}" + (f" --limit {limit}" if limit else "")
        typer.echo(f"model card: {write_model_card(resolve(model), table, command)}")


def _register_subcommands() -> None:
    from mmscope.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Synthesize, load and inspect GQA-format data.")


_register_subcommands()

if __name__ == "__main__":
    app()

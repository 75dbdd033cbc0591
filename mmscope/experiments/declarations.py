"""Every command as the command line knows it: its name, its help, and its options class — each option's type,
default, help and checks (`mmscope.experiments.options`) — and where the code that runs it lives.

Nothing here imports a heavy library (torch, transformers, nnsight, datasets, pandas, matplotlib): `mmscope
--help`, a command's `--help` and an option refused before any data or model is read are answered without
them. What a command computes — an experiment's rows, figure and findings (`mmscope.experiments.<name>`), or
`evaluate`'s accuracy table — is imported when it runs (`Command.runs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmscope.experiments.options import (
    ENGINES,
    Command,
    OptionError,
    QuestionOptions,
    check_at_least,
    check_choice,
    check_once,
    column_mapping,
    columns_option,
    data_option,
    engine_option,
    flag_of,
    limit_option,
    model_option,
    option,
    out_option,
    seed_option,
    split_option,
    wandb_option,
)
from mmscope.experiments.references import REFERENCES, read_reference
from mmscope.sites import SITES
from mmscope.zoo import DEFAULT_MODEL

if TYPE_CHECKING:
    from mmscope.model import Model

# knockout

CONTROL_GROUP = "random_patches"  # as many image patches as the object's, drawn at random outside it (seeded)
STUDY_FLOWS = (
    "image->last",
    "question->last",
    "last->last",
    "image->question",
    "object->question",
    "other_patches->question",
)
# The defaults: the study's six flows and the object flow's matched random-patch control.
DEFAULT_FLOWS = (*STUDY_FLOWS, f"{CONTROL_GROUP}->question")


def flow_ends(text: str) -> tuple[str, str]:
    """The source and target group of a flow named `source->target` (`mmscope.experiments.knockout.Flow`)."""
    parts = text.split("->")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        quoting = (" — quote it: unquoted, the shell reads '>' as a redirection (and writes a file named after the "
                   "target)" if text.rstrip().endswith("-") and "->" not in text else "")
        raise OptionError(f"flow {text!r} (--flow) must read 'source->target', e.g. --flow 'image->last'{quoting}")
    return parts[0].strip(), parts[1].strip()


def check_flows(flows) -> None:
    """Refuse a malformed flow, or one given twice (spacing aside: `image -> last` is `image->last`)."""
    seen: dict[tuple[str, str], str] = {}
    for flow in flows:
        ends = flow_ends(flow)
        if ends in seen:
            earlier = "" if seen[ends] == flow else f" (as {seen[ends]!r})"
            raise OptionError(f"flow {flow!r} (--flow) is given twice{earlier}; give each flow once")
        seen[ends] = flow


def default_window(n_layers: int) -> int:
    """The default knockout window for a model of `n_layers`: the study's 9 on its 32- and 40-layer models; on a
    shallower one a third of its depth (rounded down, at least 1), so that centres still differ."""
    return max(1, min(9, n_layers // 3))


def card_option() -> Any:
    """`--card`: write what a run measured into the model folder's model card (`mmscope.zoo.shapes_llava.card`)."""
    return option(False, "Write the findings and figure into the model folder's model card.", flag="--card")


@dataclass(frozen=True)
class KnockoutOptions(QuestionOptions):
    """`mmscope knockout`: the flows to block, the window of layers around each centre, the sweep engine."""

    flows: list[str] | None = option(None, "source->target (repeatable; default: the study's six flows and the "
                                     "random-patch control of object->question).",
                                     flag="--flow")
    window: int | None = option(None, "Window k of layers blocked around each centre layer (default: about a "
                                      "third of the model's depth, at most the study's 9).")
    reference: str | None = option(None, "A published curve to draw over the run's: a CSV of centre layer and "
                                         f"mean Δp% (see the README), or a shipped one: {', '.join(REFERENCES)}.")
    engine: str = engine_option()
    card: bool = card_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "flows", list(self.flows or DEFAULT_FLOWS))  # recorded as run, defaults included
        check_flows(self.flows)
        check_at_least("window", self.window, 1)
        check_choice("engine", self.engine, ENGINES)
        if self.reference is not None:
            read_reference(self.reference)  # a bad file fails before the model loads

    def configure(self, model: Model):
        """The protocol's knobs, and the window: when not given, `default_window` of the model's depth."""
        options, lines = super().configure(model)
        if options.window is None:
            options = dataclasses.replace(options, window=default_window(model.n_layers))
            lines = [*lines, f"window {options.window} (the default for {model.n_layers} layers: about a third of "
                             "the depth, at most the study's 9)"]
        return options, lines


# lens


@dataclass(frozen=True)
class LensOptions(QuestionOptions):
    """`mmscope lens`: which lens, on which axis."""

    lens: str | None = option(None, "raw (no final norm, as in the study; the default) or normed.")
    lens_axis: str | None = option(None, "layers (L points: after each decoder layer; the default protocol's) or "
                                         "hidden-states (L+1: embeddings, after each layer, the final-normed "
                                         "output; the study's).")


# truncate


@dataclass(frozen=True)
class TruncateOptions(QuestionOptions):
    """`mmscope truncate`: the sweep engine."""

    engine: str = engine_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("engine", self.engine, ENGINES)


# estimates (attribution patching), patch and map

ESTIMATES = ("atp",)  # first-order estimates: attribution patching (mmscope.experiments.attribution)
METRICS = ("prob", "logprob")  # what an estimate estimates the change of: p of the answer's first token, or log p
VERIFY = 20  # the largest |estimates| run exactly, and the random others, by default


def verify_option() -> Any:
    """`--verify K`: how many of the largest |estimates| run exactly."""
    return option(None, f"Estimates: run the K largest |estimates| of each question exactly (default {VERIFY}).")


def verify_random_option() -> Any:
    """`--verify-random K`: how many random other candidates run exactly."""
    return option(None, f"Estimates: also run K random others exactly, to see how far the estimate holds beyond "
                        f"its top (default {VERIFY}).")


def metric_option() -> Any:
    """`--metric`: what the estimates estimate the change of."""
    return option(None, "Estimates: the metric, prob (p of the clean answer's first token; the default) or "
                        "logprob.")


def check_estimates(options: Any, estimating: bool, needs: str) -> None:
    """Fill `verify`, `verify_random` and `metric` in with their defaults where the run estimates, and check
    them; refuse them where it does not (`needs` says what would)."""
    given = [name for name in ("verify", "verify_random", "metric") if getattr(options, name) is not None]
    if not estimating:
        if given:
            raise OptionError(f"{flag_of(given[0])} applies to estimates; {needs}")
        return
    for name, default in (("verify", VERIFY), ("verify_random", VERIFY), ("metric", "prob")):
        if getattr(options, name) is None:
            object.__setattr__(options, name, default)
    check_at_least("verify", options.verify, 0)
    check_at_least("verify_random", options.verify_random, 0)
    check_choice("metric", options.metric, METRICS)


# patch

PATCH_GROUPS = ("image", "object", "question", "last")


@dataclass(frozen=True)
class PatchOptions(QuestionOptions):
    """`mmscope patch`: fewer questions by default, the site patched, the token groups, the sweep engine."""

    limit: int | None = limit_option(10)
    site: str = option("residual", "residual, attention or mlp.")
    groups: list[str] | None = option(None, "Token groups to patch (repeatable).", flag="--group")
    engine: str = engine_option()
    estimate: str | None = option(None, "atp: estimate every patch from one forward and one backward pass "
                                        "(attribution patching) and run only --verify and --verify-random of them "
                                        "exactly.")
    verify: int | None = verify_option()
    verify_random: int | None = verify_random_option()
    metric: str | None = metric_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("site", self.site, SITES)
        check_choice("engine", self.engine, ENGINES)
        if self.estimate is not None:
            check_choice("estimate", self.estimate, ESTIMATES)
        check_estimates(self, self.estimate is not None, "add --estimate atp")
        object.__setattr__(self, "groups", list(self.groups or PATCH_GROUPS))  # recorded as run, defaults included
        check_once("token group", self.groups, "--group")


# map

KINDS = ("knockout", "patch", "lens", "attention", "atp-knockout", "atp-patch")
ESTIMATED = {"atp-knockout": "knockout", "atp-patch": "patch"}  # each estimated kind: the kind it estimates
TARGETS = ("last", "question", "object_word")
DEFAULT_TARGETS = ("last", "question")
LENS_TOKENS = ("answer", "object")


@dataclass(frozen=True)
class MapOptions(QuestionOptions):
    """`mmscope map`: the kinds of map, the targets, the block side, the knockout windows, the layers of the
    other kinds, patch's site, the lens token, the sweep engine. An option the kinds asked for do not use is
    refused; its default is filled in only for a kind that uses it (so a run's config.yaml names no option the
    run did not use)."""

    kinds: list[str] | None = option(None, "Kind of map (repeatable): knockout (the default), patch, lens, "
                                           "attention; atp-knockout, atp-patch: knockout and patch estimated "
                                           "(attribution patching), the largest verified.", flag="--kind")
    targets: list[str] | None = option(None, "Target group of knockout and attention maps: whose attention to "
                                             "each region is blocked or read (repeatable; default: last and "
                                             "question; object_word: the question's object names).",
                                       flag="--target")
    region: int = option(1, "Side N of each region in patches: each region is an NxN block of the image-token grid.")
    window: int | None = option(None, "knockout: window k of layers blocked around each centre (default: "
                                      "knockout's, about a third of the depth, at most 9).")
    centers: list[int] | None = option(None, "knockout: centre layer of a window, one panel each (repeatable; "
                                             "default: the middle layer).", flag="--center")
    layers: list[int] | None = option(None, "patch, lens, attention: a layer, one panel each (repeatable; default: "
                                            "the middle layer for patch, every layer for lens and attention).",
                                      flag="--layer")
    site: str | None = option(None, "patch: the site patched, residual (the default), attention or mlp.")
    lens_token: str | None = option(None, "lens: the token whose probability is read, answer (the clean answer's "
                                          "first token; the default) or object (the question's object name's).")
    head: int | None = option(None, "attention: read this head of each layer (default: the mean over heads).")
    engine: str = engine_option()
    verify: int | None = verify_option()
    verify_random: int | None = verify_random_option()
    metric: str | None = metric_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        kinds = list(self.kinds or ["knockout"])
        object.__setattr__(self, "kinds", kinds)
        for what, name, flag in (("kind", "kinds", "--kind"), ("target", "targets", "--target"),
                                 ("centre", "centers", "--center"), ("layer", "layers", "--layer")):
            check_once(what, getattr(self, name), flag)  # each kind, target and panel once
        for kind in kinds:
            check_choice("kind", kind, KINDS, flag="--kind")
        uses = {"targets": ("knockout", "attention", "atp-knockout"), "window": ("knockout", "atp-knockout"),
                "centers": ("knockout", "atp-knockout"), "layers": ("patch", "lens", "attention", "atp-patch"),
                "site": ("patch", "atp-patch"), "lens_token": ("lens",), "head": ("attention",)}
        flags = {field.name: field.metadata.get("flag") or flag_of(field.name) for field in dataclasses.fields(self)}
        for name, users in uses.items():
            if getattr(self, name) is not None and not set(users) & set(kinds):
                flag = flags[name]
                raise OptionError(f"{flag} applies to --kind {' or '.join(users)}; this run draws "
                                  f"{', '.join(kinds)}")
        if set(uses["targets"]) & set(kinds):
            object.__setattr__(self, "targets", list(self.targets or DEFAULT_TARGETS))
            for target in self.targets:
                check_choice("target", target, TARGETS)
        check_estimates(self, bool(set(ESTIMATED) & set(kinds)), f"add --kind {' or --kind '.join(ESTIMATED)}")
        if {"patch", "atp-patch"} & set(kinds):
            object.__setattr__(self, "site", self.site or "residual")
            check_choice("site", self.site, SITES)
        if "lens" in kinds:
            object.__setattr__(self, "lens_token", self.lens_token or "answer")
            check_choice("lens token", self.lens_token, LENS_TOKENS, flag="--lens-token")
        check_at_least("region", self.region, 1)
        check_at_least("head", self.head, 0)
        check_at_least("window", self.window, 1)
        for center in self.centers or ():
            check_at_least("center", center, 0)
        for layer in self.layers or ():
            check_at_least("layer", layer, 0)
        check_choice("engine", self.engine, ENGINES)

    def configure(self, model: Model):
        """The protocol's knobs, and the windows, centres and layers when not given (printed in the run header);
        layers beyond the model's refused."""
        options, lines = super().configure(model)
        kinds = options.kinds
        knockouts = {"knockout", "atp-knockout"} & set(kinds)
        if knockouts and options.window is None:
            options = dataclasses.replace(options, window=default_window(model.n_layers))
            lines = [*lines, f"window {options.window} (knockout's default for {model.n_layers} layers: about a "
                             "third of the depth, at most the study's 9)"]
        if knockouts and options.centers is None:
            options = dataclasses.replace(options, centers=[model.n_layers // 2])
            lines = [*lines, f"center {options.centers[0]} (the default: the middle layer)"]
        if {"patch", "lens", "attention", "atp-patch"} & set(kinds) and options.layers is None:
            every = {"lens", "attention", "atp-patch"} & set(kinds)
            options = dataclasses.replace(options, layers=list(range(model.n_layers)) if every else
                                          [model.n_layers // 2])
            said = (f"0..{model.n_layers - 1} (the default for {' and '.join(sorted(every))}: every layer"
                    f"{'; patch at each' if 'patch' in kinds else ''})" if every else
                    f"{options.layers[0]} (the default for patch: the middle layer)")
            lines = [*lines, f"layers {said}"]
        for name, values in (("center", options.centers), ("layer", options.layers)):
            for value in values or ():
                if value >= model.n_layers:
                    raise OptionError(f"{name} {value} (--{name}): {model.name} has layers 0..{model.n_layers - 1}")
        if options.head is not None and options.head >= model.n_heads:
            raise OptionError(f"head {options.head} (--head): {model.name}'s layers have heads 0..{model.n_heads - 1}")
        return options, lines


# probe

PROBE_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class ProbeOptions:
    """`mmscope probe`: the model, the scene graphs' split, how many images, which probe, and the run folder."""

    model: str = model_option()
    data: Path | None = data_option()
    split: str = split_option()
    n_images: int = option(300, "Images (scenes) to build the probe datasets from.")
    probe_kind: str = option("linear", "linear or mlp.", flag="--probe")
    controls: bool = option(True, "Also train each probe on a shuffled-label baseline and a control task, and "
                                  "report selectivity (triples the training).")
    flows: list[str] | None = option(None, "An edit to probe under: block source->target attention (repeatable; "
                                           "e.g. 'image->question'). Each probe fitted on clean features is "
                                           "scored on features read under each edit.", flag="--flow")
    window: int | None = option(None, "With --flow: window k of layers blocked around each centre (default: "
                                      "knockout's, about a third of the depth).")
    centers: list[int] | None = option(None, "With --flow: a centre layer (repeatable; default: every layer).",
                                       flag="--center")
    truncate: bool = option(False, "An edit to probe under: exit after each centre layer (the later layers "
                                   "skipped, as in `mmscope truncate`).", flag="--truncate")
    retrain: bool = option(False, "With an edit: also fit and score a probe on the edited features (is the "
                                  "information still decodable at all?).", flag="--retrain")
    engine: str = engine_option()
    card: bool = card_option()
    out: Path | None = out_option()
    wandb: bool = wandb_option()
    seed: int = seed_option()

    def __post_init__(self) -> None:
        check_choice("probe", self.probe_kind, PROBE_KINDS)
        check_at_least("n_images", self.n_images, 1)
        check_flows(self.flows or ())
        check_choice("engine", self.engine, ENGINES)
        for name, flag in (("centers", "--center"), ("retrain", "--retrain")):
            if not (self.flows or self.truncate) and getattr(self, name) not in (None, False):
                raise OptionError(f"{flag} applies to the edits of --flow or --truncate; this run probes the clean "
                                  "model only")
        if not self.flows and self.window is not None:
            raise OptionError("--window applies to the knockouts of --flow; this run has none (--truncate exits "
                              "after each centre, with no window)")
        check_at_least("window", self.window, 1)
        check_once("centre", self.centers, "--center")
        for center in self.centers or ():
            check_at_least("center", center, 0)

    def configure(self, model: Model):
        """With --flow, the window and centres when not given (printed in the run header); centres beyond the
        model's layers refused."""
        if not (self.flows or self.truncate):
            return self, []
        options, lines = self, []
        if options.flows and options.window is None:
            options = dataclasses.replace(options, window=default_window(model.n_layers))
            lines.append(f"window {options.window} (knockout's default for {model.n_layers} layers)")
        if options.centers is None:
            options = dataclasses.replace(options, centers=list(range(model.n_layers)))
            lines.append(f"centres 0..{model.n_layers - 1} (the default: every layer)")
        for center in options.centers:
            if center >= model.n_layers:
                raise OptionError(f"center {center} (--center): {model.name} has layers 0..{model.n_layers - 1}")
        return options, lines


# evaluate


@dataclass(frozen=True)
class EvaluateOptions:
    """`mmscope evaluate`: the model, the questions, the batch size, and what else to measure or write."""

    model: str = option(DEFAULT_MODEL, "Embedded model name, checkpoint folder or hub id.")
    data: Path | None = option(None, "Synthetic-world or GQA folder, or a table of questions (default: the "
                                     "embedded test split).")
    columns: str | None = columns_option()
    split: str = option("test", "Which split of --data.")
    limit: int | None = option(None, "Evaluate at most N questions per category.")
    batch_size: int = option(32)
    blank: bool = option(True, "Also evaluate with blank images (the model must use the image).")
    statements: int | None = option(None, "Also ask true/false statements about the first N images of the split "
                                          "(the probing study's entailment pairs, as \"True or false: ...\"; "
                                          "needs its scene graphs).")
    card: bool = card_option()

    def __post_init__(self) -> None:
        check_at_least("limit", self.limit, 1, omitted="all questions")
        check_at_least("statements", self.statements, 1, omitted="no statements")
        check_at_least("batch_size", self.batch_size, 1)
        column_mapping(self.columns)


# check

HALF_DTYPES = ("bfloat16", "float16", "none")


@dataclass(frozen=True)
class CheckOptions:
    """`mmscope check`: the model (and how to load it), the examples, the half-precision copy, the JSON report."""

    model: str = model_option()
    device: str | None = option(None, "Device to load the model on (default: CUDA when available).")
    dtype: str | None = option(None, "Dtype to load the model in (default: float32 on CPU, the checkpoint's on GPU).")
    data: Path | None = option(None, "Synthetic-world or GQA folder, or a table of questions, whose first "
                                     "--examples questions are checked (default: the embedded test split's first "
                                     "questions with object boxes).")
    split: str = option("test", "Which split of --data.")
    examples: int = option(3, "How many examples to check on (at least 2: one check pads them into a batch).")
    half: str = option("bfloat16", "A float32 model's half-precision check runs a copy in this dtype (bfloat16, "
                                   "float16, or none to skip it); a half-precision model is checked against a "
                                   "float32 copy.")
    json: Path | None = option(None, "Also write the report as JSON to this file.")

    def __post_init__(self) -> None:
        check_at_least("examples", self.examples, 2)
        check_choice("half", self.half, HALF_DTYPES)


# The commands, in the order `mmscope --help` lists them (`train`, `data`: `mmscope.cli`). An experiment runs as
# its `Experiment` declares it (`mmscope.experiments.runner`), and takes `--config` (a run's own config.yaml works).

KNOCKOUT = Command(name="knockout", help="Attention-knockout sweep over flows × centre layers: Δp% of the answer "
                                         "per GQA category.",
                   options=KnockoutOptions, runs="mmscope.experiments.knockout:KNOCKOUT.main", config_file=True)
LENS = Command(name="lens", help="Logit lens at the last position: p(answer) in lower case and capitalised, and the "
                                 "false option, per layer.",
               options=LensOptions, runs="mmscope.experiments.lens:LENS.main", config_file=True)
TRUNCATE = Command(name="truncate", help="Early exit after each layer: p(answer) and whether it is still the top "
                                         "token.",
                   options=TruncateOptions, runs="mmscope.experiments.truncate:TRUNCATE.main", config_file=True)
PATCH = Command(name="patch", help="Clean → corrupted (another scene's image) activation patching: layer × "
                                   "token-group heatmap.",
                options=PatchOptions, runs="mmscope.experiments.patch:PATCH.main", config_file=True)
MAP = Command(name="map", help="Image maps (knockout, patch, lens, attention): each block of the image's effect on "
                               "the answer, drawn over it.",
              options=MapOptions, runs="mmscope.experiments.maps:MAP.main", config_file=True)
PROBE = Command(name="probe", help="Layer-wise probes: image–text entailment (global) vs object recognition "
                                   "(local).",
                options=ProbeOptions, runs="mmscope.experiments.probe:PROBE.main", config_file=True)
EXPERIMENTS = (KNOCKOUT, LENS, TRUNCATE, PATCH, MAP, PROBE)
CHECK = Command(name="check", help="Is mmscope right on this model? Its invariants on the model's own examples, "
                                   "then what mmscope can do with it.",
                options=CheckOptions, runs="mmscope.experiments.check:check_command")
EVALUATE = Command(name="evaluate", help="Greedy accuracy per GQA category, with and without the image.",
                   options=EvaluateOptions, runs="mmscope.experiments.evaluate:evaluate")

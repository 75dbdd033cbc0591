"""`mmscope.load` and `Model`: a Hugging Face VLM wrapped with nnsight, its bound adapter, and the runner.

    model = mmscope.load("shapes-llava")              # or a hub id, or a save_pretrained folder
    example = model.prepare(image, "Is the cube red or blue?", boxes=[(x, y, w, h)])
    probs = model.next_token_probs(example, [Knockout("image", "last", layers=range(3, 8))])

    with model.trace(example) as ctx:                 # the same edit, inline
        ctx.residual(3)[ctx.positions("image")] *= 0.5
        probs = ctx.logits()[:, -1].softmax(-1).save()

Every readout runs one nnsight trace: the inputs in a first invoke, then one invoke per intervention (so
each edits the forward pass in its own layer order, and edits to one site chain in list order), then the
readout — which reads the model through the same `Context` the interventions get. Nothing is monkey-patched;
the HF model stays untouched between calls.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nnsight
import torch
from nnsight import NNsight
from nnsight.intervention.tracer import InterleavingTracer
from nnsight.tracing.tracer import skip_context, skippable
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText

from mmscope.context import SITES, VISION_SITES, ActivationCache, Context
from mmscope.envoys import Sites
from mmscope.errors import InputError, MMScopeError, ModelLoadError, known, suggest
from mmscope.generation import Generation
from mmscope.interventions import Intervention
from mmscope.interventions.base import check_interventions
from mmscope.layout import Example, check_image, collate, token_layout, word_spans
from mmscope.models import Adapter, adapter_for
from mmscope.models.adapter import attribute_path
from mmscope.models.preprocessing import Preprocessing
from mmscope.prompts import PromptTemplate
from mmscope.zoo import DEFAULT_MODEL, EMBEDDED_MODELS

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
__all__ = ["DEFAULT_MODEL", "AnswerScore", "Model", "Trace", "load", "resolve"]


def resolve(name_or_path: str | Path) -> str:
    """An embedded model's folder, a local folder, or a hub id — with a clear error for a missing folder."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[name]
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"embedded model {name!r} is missing its checkpoint at {folder}")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {name!r} has no config.json (save it with save_pretrained)")
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise ModelLoadError(f"model folder {name!r} does not exist")
    return hub_source(name)


def hub_source(repo_id: str) -> str:
    """A hub id as `from_pretrained` should read it: the id itself while the hub can be reached; offline
    (`HF_HUB_OFFLINE=1`, or no connection to the hub within a few seconds) the local cache's copy of it, or a
    one-line error at once — rather than half a minute of retries that end in the same error."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    if not offline and hub_reachable(constants.ENDPOINT):
        return repo_id
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        why = ("HF_HUB_OFFLINE is set" if offline else
               f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached from this machine")
        raise ModelLoadError(
            f"could not load model {repo_id!r}: {why} and the local cache ({constants.HF_HUB_CACHE}) holds no copy "
            f"of it; pass a local save_pretrained folder instead, or download it once where there is a network "
            f"(with HF_HUB_OFFLINE=1 a cached copy loads without asking the hub){suggest(repo_id, EMBEDDED_MODELS)}"
        ) from None


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds (True behind a proxy, which only
    the hub client knows how to use)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def load(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "eager",
    adapter: Callable[..., Adapter] | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    preprocessing: Preprocessing | None = None,
) -> Model:
    """Load a VLM (`AutoModelForImageTextToText` + its processor) and wrap it with nnsight.

    Args:
        name_or_path: an embedded model name ("shapes-llava"), a `save_pretrained` folder, or a hub id.
        device: "cpu", "cuda", … (default: CUDA when available).
        dtype: torch dtype or its name (default: float32 on CPU, the checkpoint's dtype on GPU).
        attn_implementation: "eager" or "sdpa" — both honour an additive mask, which knockout edits.
            Flash attention ignores such masks and is refused.
        adapter: for a family mmscope does not know, what binds the model and its processor into an adapter:
            an `Adapter` subclass, or e.g. `functools.partial(GenericAdapter, layers=..., lm_head=...)`
            (default: the registered adapter of the checkpoint's model type).
        device_map: spread the model over several devices, as accelerate's big-model inference does: "auto"
            (or "balanced", "sequential"), or a dict of module name → device ("cpu", a GPU index, "disk"), with
            `max_memory` (device → limit) and `offload_folder` (for "disk"; default: a temporary folder). Every
            intervention and the sweep engine work as on one device. Not with `device`.
        preprocessing: how `Model.prepare` turns images, prompts and boxes into inputs (default: mmscope's own
            way, `Preprocessing()`); `Preprocessing.study()` is the cross-modal information-flow study's for
            LLaVA-1.5. A knob the family cannot do is refused here.
    """
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelLoadError(
            f"attn_implementation {attn_implementation!r} is not supported: knockout edits an additive attention "
            f"mask, which {attn_implementation} does not take; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if device_map is not None and device is not None:
        raise ModelLoadError(f"pass device ({device!r}) or device_map ({device_map!r}), not both")
    source = resolve(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # with a map: for the dtype
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": str(offload_folder or tempfile.mkdtemp(prefix="mmscope-offload-"))}
    dtype = _check_dtype(dtype)
    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    if Path(source).is_dir():
        _check_json_files(Path(source))
    try:
        hf_model = AutoModelForImageTextToText.from_pretrained(
            source, attn_implementation=attn_implementation, dtype=dtype or "auto", **placement
        )
        bind = adapter or adapter_for(hf_model)
        family = getattr(bind, "func", bind)  # an adapter class, or a functools.partial of one
        processor = getattr(family, "load_processor", Adapter.load_processor)(source)
    except MMScopeError:
        raise
    except SafetensorError as error:
        weights = known(sorted(path.name for path in Path(source).glob("*.safetensors"))) or "its weights"
        raise ModelLoadError(f"could not load model {str(name_or_path)!r}: {weights} in {source} is corrupt or "
                             f"truncated ({error}); save the checkpoint again") from error
    except (OSError, ValueError) as error:
        hint = suggest(str(name_or_path), EMBEDDED_MODELS) if not Path(source).exists() else ""
        first = str(error).strip().split("\n")[0].rstrip(".")
        raise ModelLoadError(f"could not load model {str(name_or_path)!r}: {first}{hint}") from error
    placed = hf_model if device_map is not None else hf_model.to(device)  # accelerate placed a mapped one
    model = Model(bind(placed.eval(), processor), name=str(name_or_path))
    if preprocessing is not None:
        model.set_preprocessing(preprocessing)
    return model


def _check_dtype(dtype) -> torch.dtype | str | None:
    """`dtype` as `from_pretrained` takes it: a torch dtype, None or "auto" (the checkpoint's); a name such as
    "bfloat16" or "torch.float16" becomes its torch dtype, and anything else is refused, naming it."""
    if dtype is None or isinstance(dtype, torch.dtype) or (isinstance(dtype, str) and dtype == "auto"):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
        names = ("float32", "float16", "bfloat16", "float64")
        raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype; use one of {known(names)} or 'auto'"
                             f"{suggest(dtype, names)}")
    raise ModelLoadError(f"dtype {dtype!r} must be a torch.dtype or its name (e.g. 'bfloat16'); got "
                         f"{type(dtype).__name__}")


def _check_json_files(folder: Path) -> None:
    """Every JSON file of a checkpoint folder parses: a truncated tokenizer.json would otherwise surface as a
    bare JSONDecodeError that names no file."""
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise ModelLoadError(f"{file} is not valid JSON ({error}); save the checkpoint again") from error


@dataclass(frozen=True)
class AnswerScore:
    """Scores of an answer per batch row: first-token id and probability, teacher-forced log-probability."""

    first_token: torch.Tensor  # [B] ids
    first_token_prob: torch.Tensor  # [B]
    logprob: torch.Tensor  # [B] sum over the answer's tokens
    n_tokens: torch.Tensor  # [B]


class Trace(InterleavingTracer):
    """`with model.trace(example) as ctx:` — an nnsight trace whose `with` target is the `Context`.

    The block runs inside the forward pass, as an intervention's `apply` would, under `torch.no_grad()`.
    Values kept past the block are marked with `.save()`, as in any nnsight trace.
    """

    context: Context

    def __enter__(self) -> Context:
        # nnsight's own __enter__, returning the context: capture the block at the caller's frame (two frames
        # up from capture and skip_context, as from Tracer.__enter__), then arm the hook that skips the body.
        self.capture()
        if skippable(self.node):
            skip_context(self)
        return self.context

    def execute(self, code) -> None:
        with torch.no_grad():
            super().execute(code)


class Model(Generation):
    """A VLM under nnsight with its bound adapter. Build with `mmscope.load`, or — for a model `load` cannot
    build, such as a `trust_remote_code` one — from an adapter bound to the Hugging Face model and its processor
    (or bare tokenizer): `Model(GenericAdapter(hf_model, tokenizer, layers=..., ...))`."""

    def __init__(self, adapter: Adapter, name: str = "") -> None:
        implementation = adapter.text_config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ModelLoadError(
                f"model {name!r} runs its language model with {implementation!r} attention, which ignores the "
                f"additive mask knockout edits; load it with attn_implementation in {ATTENTION_IMPLEMENTATIONS}"
            )
        self.adapter = adapter
        self.hf = adapter.model
        self.tokenizer = adapter.tokenizer
        self.name = name
        self.envoy = NNsight(self.hf)
        self.sites = Sites(self.envoy, adapter)
        self.n_layers = self.sites.n_layers
        self.n_heads = self.sites.n_heads
        self.final_norm = attribute_path(self.hf, adapter.final_norm)
        self.lm_head = attribute_path(self.hf, adapter.lm_head)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, family={self.adapter.family}, layers={self.n_layers}, heads={self.n_heads})"

    @property
    def processor(self):
        """The processor `prepare` runs: the loaded one, or the adapter's copy of it for the preprocessing."""
        return self.adapter.processor

    @property
    def preprocessing(self) -> Preprocessing:
        """How `prepare` turns images, prompts and boxes into inputs (`set_preprocessing` changes it)."""
        return self.adapter.preprocessing

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Prepare examples under `preprocessing` from now on; a knob the family cannot do is refused at once.
        Examples prepared before keep the inputs they were made with."""
        self.adapter.set_preprocessing(preprocessing)
        self.__dict__.pop("groups", None)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device or, for a model spread over devices (`device_map`), the first
        one its map names (offloaded parts run on the CPU; accelerate moves each layer's inputs where it runs)."""
        mapped = getattr(self.hf, "hf_device_map", None)
        if mapped and len(set(mapped.values())) > 1:
            first = next(iter(mapped.values()))
            return torch.device("cpu" if first == "disk" else f"cuda:{first}" if isinstance(first, int) else first)
        return next(self.hf.parameters()).device

    # --- inputs -----------------------------------------------------------------------------------------------
    def prepare(
        self,
        image,
        question: str,
        *,
        boxes: Sequence[Sequence[float]] | None = None,
        template: PromptTemplate | str | None = None,
        meta: dict | None = None,
        control_seed: int = 0,
        words: Sequence[str] | None = None,
    ) -> Example:
        """Prompt, processor inputs and token layout (`mmscope.layout.token_layout`) for one image (a PIL image or
        the path of an image file) and question, under the model's `preprocessing`.

        `boxes` are `(x, y, w, h)` in original pixels; they add the groups `object` (image tokens whose patch
        overlaps a box, or is red in the box mask under `object_patches="red-mask"`), `other_patches` (the
        remaining patch tokens) and `random_patches` (as many of `other_patches` as `object` has, drawn from
        `control_seed`, the question and the object's positions: the same inputs draw the same set in any
        process; left out when `other_patches` is the smaller).

        `words` are the question's object names (GQA's `object_names`); they add the group `object_word`, the
        question's tokens spelling them (`mmscope.layout.word_spans`; left out where it spells none).
        """
        if isinstance(control_seed, bool) or not isinstance(control_seed, int):
            raise InputError(f"control_seed must be a whole number; got {control_seed!r}")
        image = check_image(image)
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question must be a non-empty string; got {question!r}")
        marker = next((marker for marker in self.adapter.placeholder_tokens() if marker in question), None)
        if marker is not None:
            raise InputError(f"question {question[:60]!r} holds {marker!r}, the image placeholder token of "
                             f"{self.name or 'the model'}: the processor would read it as another image; remove it")
        if meta is not None and not isinstance(meta, dict):
            raise InputError(f"meta must be a dict (or None); got {type(meta).__name__} {meta!r:.60}")
        if isinstance(template, str):
            template = PromptTemplate.from_string(template)
        template = template or self.adapter.template
        prompt, spans = template.render(question.strip(), self.adapter.placeholder())
        if words is not None:
            if isinstance(words, str) or not all(isinstance(word, str) for word in words):
                raise InputError(f"words must be a list of the question's object names; got {words!r:.60}")
            found = [span for start, _ in spans.get("question", [])[:1]
                     for span in word_spans(question.strip(), words, start)]
            if found:
                spans = {**spans, "object_word": found}
        encoding = self.adapter.encode(image, prompt)
        length, context = encoding.inputs["input_ids"].shape[1], self.max_positions
        if context is not None and length > context:
            raise InputError(f"question {question[:40]!r}… makes a prompt of {length} tokens, more than the "
                             f"{context} positions of {self.name or 'the model'}'s context; shorten it")
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and bool((encoding.inputs["input_ids"] == unknown).any()):
            # One text for every question, so that a sweep warns once, not once per question.
            warnings.warn(f"a question has words the tokenizer of {self.name or 'the model'} does not know; the "
                          f"model reads each as {self.tokenizer.unk_token!r}", stacklevel=2)
        layout = token_layout(self.adapter, prompt, spans, encoding, image, boxes, question=question,
                              control_seed=control_seed)
        info = {"question": question, "image_size": (image.width, image.height), "boxes": boxes, **(meta or {})}
        return Example(inputs=encoding.inputs, layouts=[layout], prompts=[prompt], meta=[info])

    @property
    def max_positions(self) -> int | None:
        """The language model's context length, where its config gives one."""
        return getattr(self.adapter.text_config, "max_position_embeddings", None)

    @functools.cached_property
    def groups(self) -> tuple[str, ...]:
        """Every token-group name this model's examples can hold: those of a blank image's example with a box and
        an object name (names add `object_word`; boxes add `object`, `other_patches` and `random_patches`; an
        example prepared without boxes lacks those, and so does every example of a family whose image tokens are
        not patches, such as Kosmos-2's latent queries), under the model's `preprocessing`."""
        blank = Image.new("RGB", (64, 64), (128, 128, 128))
        with warnings.catch_warnings():  # its words may be unknown to the model's tokenizer; the groups are not
            warnings.simplefilter("ignore")
            try:
                example = self.prepare(blank, "What is this?", boxes=[(16, 16, 32, 32)], words=["this"])
            except InputError:  # the family places no boxes
                example = self.prepare(blank, "What is this?", words=["this"])
        return tuple(example.groups())

    def batch(self, examples: Sequence[Example]) -> Example:
        """Left-pad several prepared examples into one batch."""
        return collate(list(examples), self.tokenizer.pad_token_id, self.adapter.sequence_keys)

    def model_inputs(self, example: Example) -> dict[str, torch.Tensor]:
        """The tensors for a forward pass on the model's device, with padding-aware position ids."""
        inputs = {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in example.inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.hf.dtype)
        position_ids = self.adapter.position_ids(inputs["attention_mask"])
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        return inputs

    def extend(self, example: Example, tokens: torch.Tensor) -> Example:
        """`example` with `tokens [B, n]` appended to every row (layout, and so "last", unchanged)."""
        inputs = dict(example.inputs)
        for key in self.adapter.sequence_keys:
            fill = tokens if key == "input_ids" else torch.full_like(tokens, self.adapter.appended_value(key))
            inputs[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], dim=1)
        return Example(inputs, example.layouts, example.prompts, example.padding, example.meta)

    # --- running ---------------------------------------------------------------------------------------------
    def context(self, example: Example, source: ActivationCache | None = None) -> Context:
        """The `Context` interventions and readouts see for a forward pass over `example` (with `source`: the
        activations of another run, which a `CachedPatch` reads)."""
        return Context(self.sites, example, source)

    def trace(self, example: Example) -> Trace:
        """An nnsight trace of one forward pass over `example`, for edits written inline:

            with model.trace(example) as ctx:
                ctx.residual(3)[ctx.positions("image")] *= 0.5
                probs = ctx.logits()[:, -1].softmax(-1).save()

        `ctx` is the `Context` an intervention's `apply` gets, so the block's lines move into an intervention
        unchanged.
        """
        tracer = self.envoy.trace(**self.model_inputs(example), tracer_cls=Trace)
        tracer.context = self.context(example)
        return tracer

    def run(
        self,
        example: Example,
        interventions: Sequence[Intervention] = (),
        readout: Callable[[Context], object] | None = None,
        source: ActivationCache | None = None,
    ):
        """One forward pass with `interventions` applied in order; returns `readout(ctx)` (default: logits
        at each row's last prompt position, `[B, V]`, float32). `source`: another run's activations
        (`cache`), which patches read as `ctx.source`."""
        check_interventions(interventions)
        ctx = self.context(example, source=source)
        readout = readout or last_logits
        applied = [(intervention, ctx) for intervention in interventions]
        return self.run_inputs(self.model_inputs(example), applied, lambda: readout(ctx))

    def run_inputs(
        self,
        inputs: dict,
        applied: Sequence[tuple[Intervention, Context]],
        readout: Callable[[], object],
    ):
        """The runner behind `run`, over raw forward `inputs` (a suffix pass passes `inputs_embeds` and a cache):
        each intervention applies through its own context in its own invoke, in order; returns `readout()`."""
        with torch.no_grad(), self.envoy.trace() as tracer:
            with tracer.invoke(**inputs):
                pass
            for intervention, ctx in applied:
                with tracer.invoke():
                    intervention.apply(ctx)
            with tracer.invoke():
                result = nnsight.save(readout())
        return result

    def next_token_probs(self, example: Example, interventions: Sequence[Intervention] = (),
                         source: ActivationCache | None = None) -> torch.Tensor:
        """Softmax over the vocabulary at the last prompt position: `[V]` for one example, `[B, V]` for a batch."""
        probs = self.run(example, interventions, source=source).softmax(-1)
        return probs[0] if len(example) == 1 else probs

    def cache(self, example: Example, sites: Sequence[str] = SITES, layers: Sequence[int] | None = None,
              interventions: Sequence[Intervention] = (), vision_layers: Sequence[int] | None = None
              ) -> ActivationCache:
        """The activations of `sites` at `layers` (default: every layer) in one forward over a one-row `example`
        (under `interventions`): the source a `CachedPatch` reads (TransformerLens' `run_with_cache`). Vision
        sites (`VISION_SITES`: "vision_residual", "vision_attention", "vision_mlp", "projector") are cached at
        `vision_layers` (default: every vision layer; the projector at layer 0), for a `VisionCachedPatch`."""
        if len(example) != 1:
            raise InputError(f"cache takes one example (a batch of 1); got a batch of {len(example)}")
        unknown = [site for site in sites if site not in SITES + VISION_SITES]
        if unknown:
            raise InputError(f"unknown site(s) {unknown}; known: {known(SITES + VISION_SITES)}")
        layers = range(self.n_layers) if layers is None else sorted(_once(layers, "layers"))
        for layer in layers:
            self.sites.layer(layer)  # refuses a layer the model lacks
        pairs = [(site, layer) for layer in layers for site in ("attention", "mlp", "residual") if site in sites]
        vision = [site for site in ("vision_attention", "vision_mlp", "vision_residual") if site in sites]
        if vision:
            count = len(self.sites.vision_layers(f"model.cache(sites={vision})"))
            vision_layers = range(count) if vision_layers is None else sorted(_once(vision_layers, "vision_layers"))
        # forward order: the vision tower's layers, the projector, then the decoder's
        vision_pairs = [(site, layer) for layer in (vision_layers if vision else ()) for site in vision]
        vision_pairs += [("projector", 0)] if "projector" in sites else []

        def readout(ctx: Context) -> tuple[dict, torch.Tensor]:
            found = {pair: ctx.vision_site(*pair).clone() for pair in vision_pairs}
            return found | {pair: ctx.site(*pair).clone() for pair in pairs}, last_logits(ctx)[0]

        activations, logits = self.run(example, interventions, readout)
        return ActivationCache(example, activations, logits.softmax(-1))

    def answer_tokens(self, example: Example, answers: str | Sequence[str],
                      leading_space: bool | Sequence[bool] | None = None) -> list[list[int]]:
        """Token ids of each row's answer (a label, stripped) as the model would write it after the prompt.

        Real tokenizers spell a word two ways, with a leading space (`ĠRed`, `▁Red`) and without (`Red`), and
        after a prompt ending in `:` or a newline a model may write either. `leading_space` says which, per row
        or for all; None measures it from the model: the way its own greedy next token after each row's prompt
        is written (`writes_leading_space`), at the cost of one forward. Word-level tokenizers give the same ids
        either way."""
        answers = [answers] * len(example) if isinstance(answers, str) else list(answers)
        if len(answers) != len(example):
            raise InputError(f"{len(answers)} answers for a batch of {len(example)}")
        for answer in answers:
            if not isinstance(answer, str) or not answer.strip():
                raise InputError(f"answer must be a non-empty string; got {answer!r}")
        if leading_space is None:
            leading_space = self.greedy_leading_space(example)
        spaces = [leading_space] * len(example) if isinstance(leading_space, bool) else list(leading_space)
        if len(spaces) != len(example) or not all(isinstance(space, bool) for space in spaces):
            raise InputError(f"leading_space must be a bool or one bool per row of the batch of {len(example)}; "
                             f"got {leading_space!r}")
        tokens = []
        for prompt, answer, space in zip(example.prompts, answers, spaces, strict=True):
            written = (" " if space else "") + answer.strip()
            with_answer = self.tokenizer(prompt + written)["input_ids"]
            alone = self.tokenizer(prompt)["input_ids"]
            if with_answer[: len(alone)] == alone:
                tokens.append(with_answer[len(alone) :])
            else:  # the answer merged with the prompt's last characters: the answer's own tokens
                tokens.append(self.tokenizer(written, add_special_tokens=False)["input_ids"])
            unknown = self.tokenizer.unk_token_id
            if unknown is not None and unknown in tokens[-1]:
                warnings.warn(f"answer {answer.strip()!r} has words the tokenizer does not know: it is scored as "
                              f"{self.tokenizer.unk_token!r}, which any unknown word would match", stacklevel=3)
        return tokens

    def greedy_leading_space(self, example: Example) -> list[bool]:
        """Per row, whether the model's greedy next token after the prompt starts with whitespace: how it writes
        an answer there (one forward)."""
        return self.writes_leading_space(example, self.run(example).argmax(-1).tolist())

    def writes_leading_space(self, example: Example, tokens: Sequence[int]) -> list[bool]:
        """Per row, whether `tokens[row]` written right after that row's prompt starts with whitespace: the text
        it adds to the prompt's last tokens, decoded together (so SentencePiece's `▁` and byte-level BPE's `Ġ`
        count as the spaces they are, and a word-level tokenizer's joining space does not)."""
        if len(tokens) != len(example):
            raise InputError(f"{len(tokens)} tokens for a batch of {len(example)}")
        spaces = []
        for row, token in enumerate(tokens):
            ids = example.inputs["input_ids"][row][example.inputs["attention_mask"][row].bool()].tolist()[-4:]
            before = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            after = self.tokenizer.decode([*ids, int(token)], clean_up_tokenization_spaces=False)
            added = after[len(before):] if after.startswith(before) else self.tokenizer.decode([int(token)])
            spaces.append(added[:1].isspace())
        return spaces

    def answer_prob(
        self, example: Example, answer: str | Sequence[str], interventions: Sequence[Intervention] = (),
        leading_space: bool | Sequence[bool] | None = None,
    ) -> AnswerScore:
        """Probability of the answer's first token at the last position and the teacher-forced log-probability
        of the whole answer (both under `interventions`), per row; the answer is tokenised as `answer_tokens`
        does (`leading_space`: as the model writes, measured, unless given)."""
        tokens = self.answer_tokens(example, answer, leading_space)
        width = max(len(t) for t in tokens)
        pad = self.tokenizer.pad_token_id
        appended = torch.tensor([t + [pad] * (width - len(t)) for t in tokens])
        extended = self.extend(example, appended)
        last = torch.tensor([layout["last"][0] for layout in example.layouts])

        def readout(ctx: Context) -> torch.Tensor:
            logits = ctx.logits()
            columns = last[:, None] + torch.arange(width)[None, :]
            return logits[torch.arange(len(last))[:, None], columns.to(logits.device)].float().log_softmax(-1)

        logprobs = self.run(extended, interventions, readout)  # [B, width, V]
        picked = logprobs.gather(-1, appended[..., None].to(logprobs.device))[..., 0]
        lengths = torch.tensor([len(t) for t in tokens])
        valid = torch.arange(width)[None, :] < lengths[:, None]
        return AnswerScore(
            first_token=appended[:, 0],
            first_token_prob=picked[:, 0].exp().cpu(),
            logprob=(picked.cpu() * valid).sum(-1),
            n_tokens=lengths,
        )

    def hidden_states(self, example: Example, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """Residual stream `[n_layers + 1, B, T, D]`: the decoder's input embeddings, then after each layer."""

        def readout(ctx: Context) -> torch.Tensor:
            states = [ctx.embeddings()] + [ctx.residual(layer) for layer in range(self.n_layers)]
            return torch.stack(states).float()

        return self.run(example, interventions, readout)

    def unembed(self, hidden: torch.Tensor, normed: bool = True) -> torch.Tensor:
        """Logits `[..., V]` of residual-stream vectors `[..., D]`, through the final norm (or not: a raw lens),
        the lm_head and what the family does after it (`Adapter.final_logits`)."""
        with torch.no_grad():
            hidden = hidden.to(self.device, self.hf.dtype)
            return self.adapter.final_logits(self.lm_head(self.final_norm(hidden) if normed else hidden)).float()


def _once(layers, name: str) -> list:
    """`layers` as a list, each given once (a repeated one is refused, naming it, not silently dropped)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        layers = [layers]
    layers = list(layers)
    if any(isinstance(layer, bool) or not hasattr(layer, "__index__") for layer in layers):
        raise InputError(f"{name} must be whole layer numbers; got {layers!r}")
    repeated = next((layer for index, layer in enumerate(layers) if layer in layers[:index]), None)
    if repeated is not None:
        raise InputError(f"{name} lists {repeated} twice; got {layers}: give each once")
    return layers


def last_logits(ctx: Context) -> torch.Tensor:
    """The default readout: logits at each row's last prompt position, `[B, V]`, float32."""
    logits = ctx.logits()
    rows, cols = ctx.positions("last")
    return logits[rows.to(logits.device), cols.to(logits.device)].float()

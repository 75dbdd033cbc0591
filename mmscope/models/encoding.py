"""Where each token of a processed prompt came from: a character span of the prompt, or the image placeholder.

A VLM processor rewrites the prompt before tokenizing it: it may insert text (PaliGemma's BOS after the image,
Emu3's leading BOS), and it expands each image placeholder into the image-feature tokens plus the family's
markers (Qwen's vision start/end, Idefics3's tile tags and newlines, Gemma3's start/end of image …). Rather
than re-deriving each family's rules, we ask the processor itself: transformers processors report every
token's character offsets in the expanded text (`return_offsets_mapping`) and every placeholder's span
before and after expansion (`return_text_replacement_offsets`). Carrying those offsets back through the
replacements, then through the processor's own insertions (a character alignment of the prompt with the
text the processor prepared from it), gives each token its span in the prompt the template rendered.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmscope.errors import InputError


@dataclass(frozen=True)
class Encoding:
    """A processor's output for one prompt, and the origin of each of its `T` tokens.

    Attributes:
        inputs: the model's batch-1 inputs (input_ids `[1, T]`, attention_mask, pixel_values …).
        spans: `[T, 2]` character span `[start, end)` of each token in the prompt; `(0, 0)` for tokens the
            processor added (BOS, placeholder expansion …). None when the processor cannot report offsets;
            the layout is then found by aligning the tokenizer's tokens of the prompt with the text tokens.
        expanded: `[T]` True for tokens the image placeholder expanded into (image tokens and their markers).
    """

    inputs: dict[str, torch.Tensor]
    spans: torch.Tensor | None = None
    expanded: torch.Tensor | None = None


def _atoms(text: str, special_tokens: Sequence[str]) -> list[tuple[int, int]]:
    """`text` as `[start, end)` atoms: each special token whole, every other character alone."""
    if not special_tokens:
        return [(i, i + 1) for i in range(len(text))]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)) + "|.", re.S)
    return [match.span() for match in pattern.finditer(text)]


def prompt_positions(prompt: str, prepared: str, special_tokens: Sequence[str] = ()) -> list[int]:
    """For each character of `prepared` (the processor's rewrite of `prompt`), its index in `prompt` or -1.

    The processor may only insert text; any other change would make the prompt's spans meaningless. Special
    tokens are aligned whole, so an inserted `<bos>` after `<image>` cannot borrow the image token's `>`.
    """
    prompt_atoms, prepared_atoms = _atoms(prompt, special_tokens), _atoms(prepared, special_tokens)
    positions = [-1] * len(prepared)
    matcher = difflib.SequenceMatcher(
        None, [prompt[s:e] for s, e in prompt_atoms], [prepared[s:e] for s, e in prepared_atoms], autojunk=False
    )
    for operation, start, end, prepared_start, prepared_end in matcher.get_opcodes():
        if operation == "equal":
            pairs = zip(prompt_atoms[start:end], prepared_atoms[prepared_start:prepared_end], strict=True)
            for (s, e), (ps, pe) in pairs:
                positions[ps:pe] = range(s, e)
        elif operation != "insert":
            raise InputError(
                f"the processor rewrote the prompt {prompt[:60]!r}… as {prepared[:60]!r}… (not only inserting "
                "text), so token groups cannot be placed; override the adapter's `encode`"
            )
    return positions


def token_origins(
    prompt: str, prepared: str, offsets: torch.Tensor, replacements: list[dict], special_tokens: Sequence[str] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans `[T, 2]` in `prompt` and expanded flags `[T]` from the processor's offsets.

    Args:
        prompt: the text given to the processor.
        prepared: the processor's rewrite of it before placeholder expansion (e.g. with a BOS inserted).
        offsets: `[T, 2]` each token's `[start, end)` in the expanded text.
        replacements: the processor's placeholder replacements, each with `span` (in `prepared`) and
            `new_span` (in the expanded text).
        special_tokens: the tokenizer's added tokens, aligned as wholes.
    """
    to_prompt = prompt_positions(prompt, prepared, special_tokens)
    replacements = sorted(replacements, key=lambda r: r["new_span"][0])
    spans = torch.zeros(len(offsets), 2, dtype=torch.long)
    expanded = torch.zeros(len(offsets), dtype=torch.bool)
    for index, (start, end) in enumerate(offsets.tolist()):
        if end <= start:
            continue
        if any(start < r["new_span"][1] and end > r["new_span"][0] for r in replacements):
            expanded[index] = True
            continue
        shift = sum(
            (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
            for r in replacements
            if r["new_span"][1] <= start
        )
        mapped = [p for p in to_prompt[start - shift : end - shift] if p >= 0]
        if mapped:
            spans[index] = torch.tensor([min(mapped), max(mapped) + 1])
    return spans, expanded


def encode_with_origins(processor, image, prompt: str) -> Encoding:
    """Run a transformers processor on one image and prompt, asking it where each token came from."""
    try:
        output = dict(
            processor(
                images=[image],
                text=[prompt],
                return_tensors="pt",
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
            )
        )
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        return Encoding(dict(processor(images=[image], text=[prompt], return_tensors="pt")))
    offsets = output.pop("offset_mapping", None)
    replacements = output.pop("text_replacement_offsets", None)
    if offsets is None or replacements is None:
        return Encoding(output)
    prepared = processor.prepare_inputs_layout(images=[image], text=[prompt])[1][0]
    special_tokens = list(processor.tokenizer.added_tokens_encoder)
    spans, expanded = token_origins(prompt, prepared, offsets[0], replacements[0], special_tokens)
    return Encoding(output, spans, expanded)


def chunk_tokenised(
    encoding: Encoding,
    prompt: str,
    placeholder: str,
    tokenizer,
    image_positions: torch.Tensor,
    sequence_keys: Sequence[str],
    text_value: Callable[[str], int],
) -> Encoding:
    """`encoding` (the processor's, of `prompt`) with its text tokens replaced as LLaVA's `tokenizer_image_token`
    makes them: the text before and after the image placeholder tokenised each on its own, the first chunk's BOS
    kept and the second chunk's own BOS dropped, the processor's expansion of the placeholder between them.

    Args:
        encoding: the processor's output for `prompt`, whose placeholder expanded into one contiguous run.
        prompt: the rendered prompt, with `placeholder` exactly once.
        tokenizer: a fast tokenizer (it must report character offsets).
        image_positions: `[n]` image-token positions in the processor's `input_ids` (the run when the
            encoding does not say which tokens the placeholder expanded into).
        sequence_keys: the `[1, T]` inputs to rebuild; outside the run each takes `text_value(key)`.
    Returns:
        The encoding of the chunked ids `[1, T']`: the processor's other inputs (pixel values …) unchanged, each
        text token's character span in `prompt`, the run flagged as expanded.
    """
    if prompt.count(placeholder) != 1:
        raise InputError(f"prompt_chunks splits the prompt at the image placeholder {placeholder!r}, which must occur "
                         f"exactly once; it occurs {prompt.count(placeholder)} times in {prompt[:60]!r}…")
    run = encoding.expanded.nonzero().flatten() if encoding.expanded is not None else image_positions
    if not len(run) or run.tolist() != list(range(int(run[0]), int(run[-1]) + 1)):
        raise InputError("prompt_chunks needs the image placeholder to expand into one contiguous run of tokens")
    head, tail = prompt.split(placeholder)
    try:
        chunks = [tokenizer(text, return_offsets_mapping=True) for text in (head, tail)]
    except NotImplementedError:  # a slow tokenizer
        raise InputError("prompt_chunks needs a fast tokenizer, which reports character offsets") from None
    (head_ids, head_offsets), (tail_ids, tail_offsets) = (
        (list(chunk["input_ids"]), [tuple(o) for o in chunk["offset_mapping"]]) for chunk in chunks
    )
    bos = tokenizer.bos_token_id
    if bos is not None and head_ids[:1] == [bos] and tail_ids[:1] == [bos]:
        tail_ids, tail_offsets = tail_ids[1:], tail_offsets[1:]
    shift = len(head) + len(placeholder)
    tail_offsets = [(start + shift, end + shift) if end > start else (0, 0) for start, end in tail_offsets]
    start, stop = int(run[0]), int(run[-1]) + 1
    inputs = dict(encoding.inputs)
    for key in sequence_keys:
        if key not in inputs:
            continue
        old = inputs[key]
        if key == "input_ids":
            before, after = torch.tensor([head_ids]), torch.tensor([tail_ids])
        else:
            before = torch.full((1, len(head_ids)), text_value(key))
            after = torch.full((1, len(tail_ids)), text_value(key))
        inputs[key] = torch.cat([before.to(old.dtype), old[:, start:stop], after.to(old.dtype)], dim=1)
    spans = torch.tensor(
        [list(span) for span in head_offsets] + [[0, 0]] * (stop - start) + [list(span) for span in tail_offsets],
        dtype=torch.long,
    ).reshape(-1, 2)
    expanded = torch.zeros(len(spans), dtype=torch.bool)
    expanded[len(head_ids) : len(head_ids) + stop - start] = True
    return Encoding(inputs, spans, expanded)

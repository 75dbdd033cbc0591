"""Greedy generation, as `Model` offers it (`generate_answer`, `generate_tokens`, `decode_answer`).

Interventions apply at every step, each step one full forward over the sequence so far (`Model.run`), so their
positions stay the prompt's. Without interventions (in a family whose adapter gives the position ids of a
forward) the steps share a key/value cache instead — a prefill over the prompt, then one forward per appended
token, with the attention mask, token types and position ids a full forward over the sequence so far would
give that token — and give the uncached steps' tokens (checked in `tests/test_generation.py` for every family).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from mmscope.errors import InputError
from mmscope.interventions.base import Intervention, check_interventions

if TYPE_CHECKING:
    from mmscope.context import Context
    from mmscope.layout import Example


class Generation:
    """Greedy decoding for `Model`, through its `run`, `extend`, `model_inputs`, `adapter`, `tokenizer`, `hf` and
    `device`."""

    def generate_answer(
        self, example: Example, interventions: Sequence[Intervention] = (), max_new_tokens: int = 8
    ) -> str | list[str]:
        """Greedy answer(s), stripped: `generate_tokens` decoded without the stop token and special tokens."""
        texts = [self.decode_answer(ids) for ids in self.generate_tokens(example, interventions, max_new_tokens)]
        return texts[0] if len(example) == 1 else texts

    def generate_tokens(
        self, example: Example, interventions: Sequence[Intervention] = (), max_new_tokens: int = 8
    ) -> list[list[int]]:
        """The token ids each row writes by greedy decoding, up to `max_new_tokens`, the stop token (eos or pad)
        that ends a row included: `[0]` is the token a sweep scores. Interventions apply at every step, over the
        whole sequence so far (their positions stay the prompt's); without any, the steps share a key/value
        cache — a prefill, then one token per step — and give the tokens of the uncached steps."""
        check_interventions(interventions)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number of at least 1; got {max_new_tokens!r}")
        if interventions or self.adapter.forward_position_ids(example.inputs) is None:
            return self._greedy(example, self._uncached_steps(example, interventions), max_new_tokens)
        return self._greedy(example, self._cached_steps(), max_new_tokens)

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """The text of generated `tokens`: the stop tokens (eos, pad) and special tokens left out, stripped."""
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        return self.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True).strip()

    def _generate_uncached(
        self, example: Example, interventions: Sequence[Intervention], max_new_tokens: int
    ) -> str | list[str]:
        """Greedy answer(s) by one full forward (`run`, under `interventions`) per generated token."""
        rows = self._greedy(example, self._uncached_steps(example, interventions), max_new_tokens)
        texts = [self.decode_answer(ids) for ids in rows]
        return texts[0] if len(example) == 1 else texts

    def _uncached_steps(
        self, example: Example, interventions: Sequence[Intervention]
    ) -> Callable[[Example, int], torch.Tensor]:
        """Next-token logits `[B, V]` of `example` extended by `step` tokens: one full forward (`run`) each."""
        last = torch.tensor([layout["last"][0] for layout in example.layouts])

        def next_logits(current: Example, step: int) -> torch.Tensor:
            def readout(ctx: Context) -> torch.Tensor:
                logits = ctx.logits()
                return logits[torch.arange(len(last)), (last + step).to(logits.device)]

            return self.run(current, interventions, readout)

        return next_logits

    def _cached_steps(self) -> Callable[[Example, int], torch.Tensor]:
        """Next-token logits `[B, V]` of the plain model, keeping a key/value cache: step 0 runs the whole prompt,
        every later step only the token the step before appended — with the attention mask, token types and
        position ids a full forward over the sequence so far would give it."""
        cache = DynamicCache(config=self.adapter.text_config)

        def next_logits(current: Example, step: int) -> torch.Tensor:
            cached = {self.adapter.cache_keyword: cache, "use_cache": True}
            with torch.no_grad():
                if step == 0:
                    return self.hf(**self.model_inputs(current), **cached).logits[:, -1]
                return self.adapter.decode_forward({**self._decode_inputs(current), **cached}).logits[:, -1]

        return next_logits

    def _decode_inputs(self, example: Example) -> dict[str, torch.Tensor]:
        """The inputs of a cached forward over the last token of `example`, on the model's device: its column of
        every sequence input and position ids, the whole attention mask, no image inputs (the cache holds them)."""
        full = example.inputs
        inputs = {key: full[key][:, -1:] for key in self.adapter.sequence_keys}
        inputs["attention_mask"] = full["attention_mask"]
        inputs["position_ids"] = self.adapter.forward_position_ids(full)[..., -1:]
        return {key: value.to(self.device) for key, value in inputs.items()}

    def _greedy(
        self, example: Example, next_logits: Callable[[Example, int], torch.Tensor], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy decoding with `next_logits(sequence so far, step) -> [B, V]`: the ids each row writes, up to and
        including the eos or pad that stops it (the batch steps on, padded, until every row has stopped)."""
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        pad = torch.tensor(self.tokenizer.pad_token_id)
        generated = torch.empty(len(example), 0, dtype=torch.long)
        done = torch.zeros(len(example), dtype=torch.bool)
        current = example
        for step in range(max_new_tokens):
            token = torch.where(done, pad, next_logits(current, step).argmax(-1).cpu())
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= torch.tensor([t in stop for t in token.tolist()])
            if done.all():
                break
            current = self.extend(current, token[:, None])
        rows = []
        for row in generated.tolist():
            ends = [step for step, token in enumerate(row) if token in stop]
            rows.append(row[: ends[0] + 1] if ends else row)
        return rows

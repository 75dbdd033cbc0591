"""PaliGemma (`PaliGemmaForConditionalGeneration`): SigLIP patches, then a prefix that attends bidirectionally.

The prompt is `<image>` followed by the task prefix ("answer en …"); the processor inserts BOS after the image
tokens and appends "\\n", and marks the whole prompt with `token_type_ids = 0`: the *prefix*, inside which every
token attends to every other (image and text alike). Tokens appended after it (answers) have
`token_type_ids = 1` and attend causally. Knockout edits the mask the model built, so blocking, say, image →
question removes edges that only exist because the prefix is bidirectional. Positions are 1-indexed. PaliGemma 2
(a Gemma 2 decoder) soft-caps its logits after the lm_head; `final_logits` does the same.
"""

from __future__ import annotations

import torch

from mmscope.models.adapter import Adapter, register
from mmscope.models.encoding import Encoding
from mmscope.prompts import IMAGE, QUESTION, PromptTemplate

PALIGEMMA_VQA = PromptTemplate((("image", IMAGE), ("instruction", "answer en "), ("question", QUESTION)))


@register("paligemma")
class PaliGemmaAdapter(Adapter):
    family: str = "paligemma"
    template: PromptTemplate = PALIGEMMA_VQA
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def encode(self, image, text) -> Encoding:
        encoding = super().encode(image, text)
        inputs = {key: value for key, value in encoding.inputs.items() if key != "labels"}  # training targets
        return Encoding(inputs, encoding.spans, encoding.expanded)

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-capped as PaliGemma's forward does when its text config asks (PaliGemma 2's Gemma 2 decoder)."""
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def appended_value(self, key: str) -> int:
        return 1 if key == "token_type_ids" else super().appended_value(key)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """1-indexed positions, as PaliGemma counts them, that ignore left padding."""
        return attention_mask.long().cumsum(-1)

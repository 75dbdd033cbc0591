"""mmscope: mechanistic interventions for vision-language models, built on nnsight.

The names below are imported when first used (PEP 562): `import mmscope` (and so the command line's `--help`)
does not import torch, transformers or nnsight; `mmscope.load(...)` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmscope.lazy import lazy_exports

if TYPE_CHECKING:
    from mmscope.experiments.check import Report, check
    from mmscope.layout import Example
    from mmscope.model import DEFAULT_MODEL, AnswerScore, Model, load
    from mmscope.models.preprocessing import Preprocessing
    from mmscope.prompts import LLAVA_15, PromptTemplate
    from mmscope.zoo import Sample, sample

# Each public name -> the module that defines it.
_HOMES = {
    "Report": "mmscope.experiments.check",
    "check": "mmscope.experiments.check",
    "Example": "mmscope.layout",
    "DEFAULT_MODEL": "mmscope.model",
    "AnswerScore": "mmscope.model",
    "Model": "mmscope.model",
    "load": "mmscope.model",
    "Preprocessing": "mmscope.models.preprocessing",
    "LLAVA_15": "mmscope.prompts",
    "PromptTemplate": "mmscope.prompts",
    "Sample": "mmscope.zoo",
    "sample": "mmscope.zoo",
}

__all__ = ["DEFAULT_MODEL", "LLAVA_15", "AnswerScore", "Example", "Model", "Preprocessing", "PromptTemplate", "Report",
           "Sample", "check", "load", "sample"]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)

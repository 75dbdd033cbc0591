"""mmscope: mechanistic interventions for vision-language models, built on nnsight."""

from mmscope.layout import Example
from mmscope.model import DEFAULT_MODEL, AnswerScore, Model, load
from mmscope.models.preprocessing import Preprocessing
from mmscope.prompts import LLAVA_15, PromptTemplate
from mmscope.zoo import Sample, sample

__all__ = ["DEFAULT_MODEL", "LLAVA_15", "AnswerScore", "Example", "Model", "Preprocessing", "PromptTemplate", "Sample",
           "load", "sample"]
__version__ = "0.1.0"

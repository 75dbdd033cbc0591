"""Loading processors whose image path needs less than their constructor asks for.

Some processors (the Qwen-VL family, SmolVLM) take a video processor, which transformers can only build with
torchvision. Their image path never touches it, so without torchvision we run the real processor class — its
own placeholder expansion, token types and offsets — with no video processor, rather than re-implementing it.
"""

from __future__ import annotations

import inspect

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING


def image_only(processor_class: type) -> type:
    """`processor_class`, accepting `video_processor=None` (its name and behaviour otherwise unchanged)."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def load_processor_without_video(source: str):
    """`AutoProcessor.from_pretrained(source)`, or — when the video processor cannot be built — the same processor
    class from the folder's image processor and tokenizer, without a video processor."""
    try:
        return AutoProcessor.from_pretrained(source)
    except ImportError:
        processor_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(source))]
        saved, _ = processor_class.get_processor_dict(source)  # e.g. SmolVLM's image_seq_len
        accepted = set(inspect.signature(processor_class.__init__).parameters)
        accepted -= {"self", "image_processor", "tokenizer"}
        settings = {key: value for key, value in saved.items() if key in accepted}
        return image_only(processor_class)(
            image_processor=AutoImageProcessor.from_pretrained(source),
            tokenizer=AutoTokenizer.from_pretrained(source),
            **{**settings, "video_processor": None},
        )

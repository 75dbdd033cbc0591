"""Architecture adapters. Importing this package registers every family mmscope supports."""

from mmscope.models import llava  # noqa: F401  (registers the adapter)
from mmscope.models import llava_next  # noqa: F401
from mmscope.models import qwen2_vl  # noqa: F401
from mmscope.models import gemma3  # noqa: F401
from mmscope.models import paligemma  # noqa: F401
from mmscope.models import idefics3  # noqa: F401
from mmscope.models import kosmos2  # noqa: F401
from mmscope.models import emu3  # noqa: F401
from mmscope.models.adapter import Adapter, adapter_for, register, supported_families
from mmscope.models.generic import GenericAdapter

__all__ = ["Adapter", "GenericAdapter", "adapter_for", "register", "supported_families"]

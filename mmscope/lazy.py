"""Lazy exports (PEP 562): a package lists its public names and the module that defines each, and a name is
imported on first use — so that `import mmscope` (and the command line's `--help`) imports no heavy library.

It imports nothing of mmscope's, so any package may use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any


def lazy_exports(package: str, homes: dict[str, str], names: Iterable[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`: `homes` maps each public name to the module
    that defines it; a name is imported from there when first read, then kept in the package."""
    public = tuple(names)

    def __getattr__(name: str) -> Any:
        """A public name, imported from its module on first use."""
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__

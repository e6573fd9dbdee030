"""Public names of a package imported from their modules on first use (PEP 562), so that
``hidiff --help`` (which loads the ``export`` command definitions) needs neither torch-side
export code nor onnx."""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, namespace: dict, homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each public name to the module
    that defines it; a name is imported once and then kept in ``namespace``."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__

"""Lazy module attributes: names resolve to their module on first use (keeps imports cheap)."""

from __future__ import annotations

import importlib


def lazy_attributes(module_name: str, table: dict[str, tuple[str, str]], namespace: dict):
    """A module ``__getattr__`` that imports ``table[name] = (module, attribute)`` on first use
    and caches the value in ``namespace`` (the module's globals)."""

    def __getattr__(name: str):
        try:
            target, attr = table[name]
        except KeyError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(target), attr)
        namespace[name] = value
        return value

    return __getattr__

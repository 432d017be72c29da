"""Notebook views (ipywidgets + plotly), each a thin object over a core or engine object.

Names load on first use, so ``import sftkit.ui`` stays cheap.
"""

from __future__ import annotations

_LAZY = {
    "PromptBuilder": ("sftkit.ui.prompt_builder", "PromptBuilder"),
    "LayerPicker": ("sftkit.ui.layer_picker", "LayerPicker"),
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'sftkit.ui' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value

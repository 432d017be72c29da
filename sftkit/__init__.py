"""sftkit: a Jupyter-native workbench for supervised fine-tuning of causal language models.

``import sftkit`` is cheap: it imports neither torch nor ipywidgets. Names below are
loaded on first use.

    model, tokenizer = sftkit.load_model("default")   # bundled SmolLM2-135M-Instruct
    sftkit.doctor()                                    # what is installed, and fixes
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("sftkit.engine.models", "load_model"),
    "plan_load": ("sftkit.engine.models", "plan_load"),
    "doctor": ("sftkit.engine.doctor", "run_doctor"),
    "Template": ("sftkit.core.template", "Template"),
    "FreezePlan": ("sftkit.engine.freeze", "FreezePlan"),
    "inspect_model": ("sftkit.engine.anatomy", "inspect_model"),
    "load_rows": ("sftkit.core.data", "load_rows"),
    "teaching_task": ("sftkit.core.teaching", "teaching_task"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'sftkit' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

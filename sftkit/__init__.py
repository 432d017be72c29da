"""sftkit: a Jupyter-native workbench for supervised fine-tuning of causal language models.

``import sftkit`` is cheap: it imports neither torch nor ipywidgets. Names below are
loaded on first use.

    model, tokenizer = sftkit.load_model("default")   # bundled SmolLM2-135M-Instruct
    sftkit.doctor()                                    # what is installed, and fixes
"""

from __future__ import annotations

from sftkit.core.lazy import lazy_attributes

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
    "RunConfig": ("sftkit.core.runconfig", "RunConfig"),
    "RunStore": ("sftkit.core.runstore", "RunStore"),
    "example_config": ("sftkit.core.examples", "example_config"),
    "launch": ("sftkit.engine.launch", "launch"),
    "attach": ("sftkit.engine.launch", "attach"),
    "resume": ("sftkit.engine.launch", "resume"),
    "load_trained": ("sftkit.engine.output", "load_trained"),
    "merge_and_save": ("sftkit.engine.output", "merge_and_save"),
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes('sftkit', _LAZY, globals())


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

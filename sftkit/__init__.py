"""sftkit: a Jupyter-native workbench for supervised fine-tuning of causal language models.

``import sftkit`` is cheap: it imports neither torch nor ipywidgets. Names below are
loaded on first use.

    model, tokenizer = sftkit.load_model("default")   # bundled SmolLM2-135M-Instruct
    sftkit.doctor()                                    # what is installed, and fixes

These names (and the views in ``sftkit.ui``) are the public API: the notebooks and the README
use nothing else. ``sftkit.core`` / ``sftkit.engine`` stay importable for power users.
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
    "split_rows": ("sftkit.core.data", "split_rows"),
    "teaching_task": ("sftkit.core.teaching", "teaching_task"),
    "RunConfig": ("sftkit.core.runconfig", "RunConfig"),
    "RunStore": ("sftkit.core.runstore", "RunStore"),
    "example_config": ("sftkit.core.examples", "example_config"),
    "launch": ("sftkit.engine.launch", "launch"),
    "attach": ("sftkit.engine.launch", "attach"),
    "resume": ("sftkit.engine.launch", "resume"),
    "load_trained": ("sftkit.engine.output", "load_trained"),
    "merge_and_save": ("sftkit.engine.output", "merge_and_save"),
    "launch_in_kernel": ("sftkit.engine.launch", "launch_in_kernel"),
    "run_rows": ("sftkit.core.rundata", "run_rows"),
    # prompting and answers
    "score_prompting": ("sftkit.engine.generate", "score_prompting"),
    "answer_rows": ("sftkit.engine.generate", "answer_rows"),
    # prompt vs fine-tune
    "compare": ("sftkit.engine.compare", "compare"),
    "Variant": ("sftkit.engine.compare", "Variant"),
    "Comparison": ("sftkit.engine.compare", "Comparison"),
    # preferences: ratings, and the rows a dpo / kto run trains on
    "PreferenceStore": ("sftkit.core.preferences", "PreferenceStore"),
    "sample_candidates": ("sftkit.engine.preference", "sample_candidates"),
    # PEFT methods side by side
    "compare_methods": ("sftkit.engine.shootout", "compare_methods"),
    "Budget": ("sftkit.engine.shootout", "Budget"),
    "PeftMethod": ("sftkit.engine.shootout", "Method"),
    "PEFT_METHODS": ("sftkit.engine.shootout", "METHODS"),
    "DEFAULT_PEFT_METHODS": ("sftkit.engine.shootout", "DEFAULT_METHODS"),
    "latest_shootout": ("sftkit.engine.shootout", "latest_shootout"),
    "export_adapter": ("sftkit.engine.output", "export_adapter"),
    # memory
    "measure_training_step": ("sftkit.engine.measure", "measure_training_step"),
    # attention
    "capture_attention": ("sftkit.engine.attention", "capture_attention"),
    "capture_row": ("sftkit.engine.attention", "capture_row"),
    "adapter_diff": ("sftkit.engine.attention", "adapter_diff"),
    "diff_captures": ("sftkit.engine.attention", "diff_captures"),
    # the notebooks' workshop knobs (SFTKIT_NOTEBOOK_FAST=1: every notebook in its fast profile)
    "notebook_knob": ("sftkit.core.knobs", "notebook_knob"),
    # the base of every error sftkit raises on purpose
    "SftkitError": ("sftkit.core.errors", "SftkitError"),
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes('sftkit', _LAZY, globals())


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

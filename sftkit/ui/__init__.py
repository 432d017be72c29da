"""Notebook views (ipywidgets + plotly), each a thin object over a core or engine object.

Names load on first use, so ``import sftkit.ui`` stays cheap.
"""

from __future__ import annotations

from sftkit.core.lazy import lazy_attributes

_LAZY = {
    "PromptBuilder": ("sftkit.ui.prompt_builder", "PromptBuilder"),
    "LayerPicker": ("sftkit.ui.layer_picker", "LayerPicker"),
    "AttentionView": ("sftkit.ui.attention_view", "AttentionView"),
    "RunLauncher": ("sftkit.ui.run_launcher", "RunLauncher"),
    "RunHistory": ("sftkit.ui.run_history", "RunHistory"),
    "CompareView": ("sftkit.ui.compare_view", "CompareView"),
    "ShootoutView": ("sftkit.ui.shootout_view", "ShootoutView"),
    "FeedbackCollector": ("sftkit.ui.feedback", "FeedbackCollector"),
}
__all__ = list(_LAZY)


__getattr__ = lazy_attributes('sftkit.ui', _LAZY, globals())

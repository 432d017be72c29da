"""State objects the views bind to: plain Python, no widget library.

Each holds what one view edits or follows (a template being drafted, a plan being edited, a run
being followed) with its derived values (preview, warnings, counters, estimate, curves, ETA) and
the actions on it. A view is then wiring: controls bound to a state object, and redraws. They
are tested without a front end, and a second view can reuse them.

Layer: imports ``sftkit.core`` and ``sftkit.engine``; never ipywidgets, plotly or ``sftkit.ui``.
Names load on first use.
"""

from __future__ import annotations

from sftkit.core.lazy import lazy_attributes

_LAZY: dict[str, tuple[str, str]] = {
    "RunMonitor": ("sftkit.state.run_monitor", "RunMonitor"),
    "RunControl": ("sftkit.state.run_monitor", "RunControl"),
    "ComparisonSession": ("sftkit.state.comparison", "ComparisonSession"),
    "FeedbackSession": ("sftkit.state.feedback", "FeedbackSession"),
    "PromptDraft": ("sftkit.state.prompt_draft", "PromptDraft"),
    "VirtualTokens": ("sftkit.state.prompt_draft", "VirtualTokens"),
    "PlanEditor": ("sftkit.state.plan_editor", "PlanEditor"),
}
__all__ = list(_LAZY)

__getattr__ = lazy_attributes("sftkit.state", _LAZY, globals())

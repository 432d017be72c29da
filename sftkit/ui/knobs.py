"""Widgets for config fields: kind, range, choices, label and help come from the field's metadata
(``sftkit.core.runconfig.knob_spec``), so a view never types a range or a choice list again."""

from __future__ import annotations

import math

import ipywidgets as W


def knob_widget(dotted: str, value, style, layout) -> W.Widget:
    """A widget for one config field, its range and choices from the field's own metadata."""
    from ..core.runconfig import knob_spec

    spec = knob_spec(dotted)
    label = spec.label + (f" (0: {spec.null_means})" if spec.kind == "int" and spec.nullable else "")
    common = dict(description=label, style=style, layout=layout, tooltip=spec.help)
    if spec.kind == "bool":
        return W.Checkbox(value=bool(value), description=spec.label, indent=False, tooltip=spec.help)
    if spec.kind == "choice":
        return W.Dropdown(options=list(spec.choices), value=value, **common)
    # a widget's range always covers the current value: a widget never clamps a valid setting silently
    if spec.kind == "log_float":
        here = math.log10(value) if value and value > 0 else spec.log_min
        return W.FloatLogSlider(value=value, base=10, min=min(spec.log_min, math.floor(here)),
                                max=max(spec.log_max, math.ceil(here)), step=spec.step or 0.1, readout_format=".1e",
                                **common)
    if spec.kind == "int":
        v = value if value is not None else 0
        return W.BoundedIntText(value=v, min=min(int(spec.widget_min), v), max=max(int(spec.widget_max), v), **common)
    if spec.kind == "float":
        return W.BoundedFloatText(value=value, min=min(spec.widget_min, value), max=max(spec.widget_max, value),
                                  **common)
    return W.Text(value=str(value), **common)


def knob_value(dotted: str, widget: W.Widget):
    from ..core.runconfig import knob_spec

    value = widget.value
    spec = knob_spec(dotted)
    if spec.kind == "int" and spec.nullable and value == 0:
        return None  # 0 in a nullable count means "not set" (max steps: use epochs)
    if spec.kind == "log_float":
        return float(f"{value:.3g}")
    if spec.kind == "text":
        return value.strip() or spec.default
    return value

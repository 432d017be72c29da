"""Run figures: metrics rows in, plotly figures and HTML out (no widgets); the arrays come from
``sftkit.state.run_monitor.curve_arrays``."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..state.run_monitor import CURVES as _CURVES
from ..state.run_monitor import curve_arrays

# where each of the monitor's curves goes: (subplot row, col)
PLACES = {"loss": (1, 1), "eval_loss": (1, 1), "lr": (1, 2), "grad_norm": (1, 3), "tokens_per_s": (2, 1),
          "memory": (2, 2)}
PLACES.update({key: (2, 3) for key in ("rewards/accuracies", "eval_rewards/accuracies", "rewards/margins",
                                       "rewards/chosen", "rewards/rejected")})  # preference runs
# (trace name, metrics key, subplot row, col, scale to display units)
CURVES = tuple((name, key, *PLACES[key], scale) for name, key, scale in _CURVES)
TITLES = ("loss", "learning rate", "grad norm", "tokens / s", "memory (MiB)", "preference (dpo / kto)")
COLOURS = ("#2563eb", "#dc2626", "#059669", "#7c3aed", "#d97706", "#0891b2", "#db2777", "#65a30d", "#9333ea",
           "#ea580c", "#475569")


def run_figure(metrics: Sequence[dict] = (), *, title: str = "", height: int = 460) -> go.Figure:
    fig = make_subplots(rows=2, cols=3, subplot_titles=TITLES, horizontal_spacing=0.07, vertical_spacing=0.16)
    for (name, key, row, col, _), (x, y), colour in zip(CURVES, curve_arrays(metrics), COLOURS):
        mode = "lines+markers" if key.startswith("eval_") else "lines"
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode=mode, line=dict(color=colour)), row=row, col=col)
    fig.update_layout(title=html.escape(str(title)), height=height, margin=dict(l=40, r=10, t=60, b=30),
                      legend=dict(orientation="h", y=-0.08), uirevision="keep")
    fig.update_xaxes(title_text="step", row=2)
    return fig


def overlay_figure(runs: dict[str, Sequence[dict]], *, height: int = 380) -> go.Figure:
    """Train (solid) and eval (dashed) loss of several runs on one plot."""
    fig = go.Figure()
    for i, (name, metrics) in enumerate(runs.items()):
        arrays = curve_arrays(metrics)
        colour = COLOURS[i % len(COLOURS)]
        label = html.escape(str(name))  # plotly renders some HTML in names: run names come from folders
        fig.add_trace(go.Scatter(x=arrays[0][0], y=arrays[0][1], name=f"{label} train", mode="lines",
                                 line=dict(color=colour), legendgroup=label))
        if len(arrays[1][0]):
            fig.add_trace(go.Scatter(x=arrays[1][0], y=arrays[1][1], name=f"{label} eval", mode="lines+markers",
                                     line=dict(color=colour, dash="dash"), legendgroup=label))
    fig.update_layout(height=height, xaxis_title="step", yaxis_title="loss", margin=dict(l=50, r=10, t=30, b=40))
    return fig


def metrics_table_html(metrics: Sequence[dict], *, max_rows: int = 12) -> str:
    """A compact table of logged steps (evenly thinned to ``max_rows``) for static snapshots."""
    rows = [m for m in metrics if "loss" in m or "eval_loss" in m]
    if len(rows) > max_rows:
        keep = sorted(set(np.linspace(0, len(rows) - 1, max_rows).round().astype(int).tolist()))
        rows = [rows[i] for i in keep]
    head = "<tr><th>step</th><th>loss</th><th>eval loss</th><th>lr</th><th>grad norm</th><th>tokens/s</th></tr>"

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else ""

    body = "".join(
        f"<tr><td>{f(m.get('step'), 'd')}</td><td>{f(m.get('loss'), '.4f')}</td><td>{f(m.get('eval_loss'), '.4f')}</td>"
        f"<td>{f(m.get('lr'), '.2e')}</td><td>{f(m.get('grad_norm'), '.3f')}</td>"
        f"<td>{f(m.get('tokens_per_s'), '.0f')}</td></tr>" for m in rows)
    return f"<table class='sftkit-metrics'>{head}{body}</table>"


def samples_html(samples: Sequence[dict], *, last_steps: int = 2) -> str:
    """The latest sample generations: prompt, target, output (green when it matches)."""
    if not samples:
        return "<i>samples appear here every <code>training.sample_every</code> steps</i>"
    samples = [s for s in samples if isinstance(s.get("step"), int) and not isinstance(s.get("step"), bool)]
    steps = sorted({s["step"] for s in samples})[-last_steps:]
    parts = []
    for step in reversed(steps):
        items = []
        for s in (s for s in samples if s["step"] == step):
            ok = str(s.get("output", "")).strip() == str(s.get("target", "")).strip()
            items.append(
                f"<div style='margin:2px 0'><span style='color:#6b7280'>{html.escape(str(s.get('prompt', ''))[:120])}"
                f"</span><br>&rarr; <b style='color:{'#047857' if ok else '#b91c1c'}'>"
                f"{html.escape(str(s.get('output', ''))[:200])}</b> <span style='color:#6b7280'>(target "
                f"{html.escape(str(s.get('target', ''))[:80])})</span></div>")
        parts.append(f"<div><b>step {step}</b>{''.join(items)}</div>")
    return "<div style='font-size:12px'>" + "".join(parts) + "</div>"

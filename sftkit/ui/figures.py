"""Figure builders: arrays in, a plotly figure out. No widgets, so they are testable and
usable in scripts and static exports."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

PROB_SCALE = "Viridis"
DIFF_SCALE = "RdBu_r"


def token_labels(pieces: Sequence, start: int = 0) -> list[str]:
    """Unique, readable axis labels: "12: fox" (position keeps repeated tokens apart)."""
    out = []
    for i, p in enumerate(pieces):
        text = p.text if hasattr(p, "text") else str(p)
        text = text.replace("\n", "\u21b5").replace(" ", "\u00b7") or "\u2205"
        out.append(f"{start + i}: {text[:16]}")
    return out


def heatmap_figure(matrix: np.ndarray, labels: Sequence[str], *, title: str = "", diverging: bool = False,
                   height: int = 520) -> go.Figure:
    """A query x key heatmap. Probabilities on a sequential scale; differences on a diverging
    scale centred on 0. Values travel as float32 (4 bytes a cell)."""
    z = np.asarray(matrix, dtype=np.float32)
    labels = list(labels)
    kwargs = dict(zmid=0.0, colorscale=DIFF_SCALE) if diverging else dict(zmin=0.0, colorscale=PROB_SCALE)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, hovertemplate="query %{y}<br>key %{x}<br>%{z:.4f}<extra></extra>",
        colorbar=dict(title="\u0394 p" if diverging else "p"), **kwargs))
    fig.update_layout(title=title, height=height, margin=dict(l=120, r=20, t=40, b=120),
                      yaxis=dict(autorange="reversed", type="category", tickfont=dict(size=9)),
                      xaxis=dict(type="category", tickfont=dict(size=9), tickangle=-60))
    return fig


def row_figure(values: np.ndarray, labels: Sequence[str], *, title: str = "", diverging: bool = False) -> go.Figure:
    """What one query token attends to: a bar per key token."""
    v = np.asarray(values, dtype=np.float32)
    colour = np.where(v >= 0, "#2563eb", "#dc2626") if diverging else "#2563eb"
    fig = go.Figure(go.Bar(x=list(labels), y=v, marker_color=colour,
                           hovertemplate="key %{x}<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, height=260, margin=dict(l=50, r=20, t=40, b=100),
                      xaxis=dict(type="category", tickfont=dict(size=9), tickangle=-60))
    return fig


def grid_figure(values: np.ndarray, layers: Sequence[int], *, title: str = "", diverging: bool = False) -> go.Figure:
    """Layers x heads coloured by a summary (static version of the view's clickable grid)."""
    z = np.asarray(values, dtype=np.float32)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"h{h}" for h in range(z.shape[1])], y=[f"L{layer}" for layer in layers],
        colorscale=DIFF_SCALE if diverging else PROB_SCALE, zmid=0.0 if diverging else None,
        hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=max(260, 16 * len(layers) + 80), margin=dict(l=50, r=20, t=40, b=30),
                      yaxis=dict(autorange="reversed"))
    return fig


def colour_of(value: float, lo: float, hi: float, diverging: bool = False) -> str:
    """A hex colour for a grid cell (viridis-like, or blue-white-red for differences)."""
    if diverging:
        m = max(abs(lo), abs(hi)) or 1.0
        t = float(np.clip(value / m, -1, 1))
        if t >= 0:
            r, g, b = 255, int(255 * (1 - t)), int(255 * (1 - t))
        else:
            r, g, b = int(255 * (1 + t)), int(255 * (1 + t)), 255
        return f"#{r:02x}{g:02x}{b:02x}"
    t = 0.0 if hi <= lo else float(np.clip((value - lo) / (hi - lo), 0, 1))
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    r, g, b = (int(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])) for k in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"

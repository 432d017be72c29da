"""AttentionView: an overview of every layer x head, one head's heatmap, and a row view.

A thin view over ``sftkit.engine.attention`` (AttentionCapture / AttentionDiff) and the
figure builders in ``sftkit.ui.figures``. Only the slice on screen goes to the browser: at
most ``max_window`` x ``max_window`` float32 values (256 x 256: about 350 kB of JSON), whatever
the prompt length; with a soft prompt or prefix, its virtual key columns in front (256 x 276 for 20).
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from ..core.errors import SftkitError
from ..engine.attention import AttentionCapture, AttentionDiff, AttentionTooLargeError
from . import figures
from .help import add_tips
from .render import error_html


class AttentionView:
    """Explore a capture (``capture_attention``) or a difference (``adapter_diff``, ``diff_captures``).

    Click a grid cell to open that head; move the layer/head controls, the token window,
    and the query row ("what does token i attend to").

    ``AttentionView.from_model`` captures and opens in one step; a capture over the memory
    limit then shows its error (the numbers and the way out) in the view's message area.
    """

    error: str | None = None

    @classmethod
    def from_model(cls, model, tokenizer, text: str | None = None, *, compare_adapter: bool = False,
                   max_window: int = 256, **capture_kwargs) -> "AttentionView":
        """Capture ``text`` (or ``input_ids=``) and view it; ``compare_adapter``: base vs adapter.

        ``capture_kwargs`` go to ``capture_attention`` / ``adapter_diff`` (``layers=``,
        ``max_bytes=``, ``input_ids=``, ``segments=``). A capture the size check refuses gives a
        view that shows the message instead of raising.
        """
        from ..engine.attention import adapter_diff, capture_attention

        try:
            if compare_adapter:
                data = adapter_diff(model, tokenizer, text, **capture_kwargs)
            else:
                data = capture_attention(model, tokenizer, text, **capture_kwargs)
        except AttentionTooLargeError as exc:
            return cls.failed(str(exc))
        return cls(data, max_window=max_window)

    @classmethod
    def failed(cls, message: str) -> "AttentionView":
        """A view with nothing to draw: the message area says why."""
        self = cls.__new__(cls)
        self.data = self.capture = None
        self.diff = False
        self.error = message
        self.info = W.HTML(f'<span style="color:#b91c1c">{html.escape(message)}</span>')
        self.widget = W.VBox([W.HTML("<b>Attention</b>: nothing captured"), self.info])
        return self

    def __init__(self, data: AttentionCapture | AttentionDiff, *, max_window: int = 256):
        self.data = data
        self.diff = isinstance(data, AttentionDiff)
        cap = data.after if self.diff else data
        self.capture = cap
        self.max_window = max_window
        T, H = cap.n_tokens, cap.n_heads
        options = (["change"] if self.diff else []) + cap.available_summaries()
        if self.diff and data.has_virtual:
            options.append("virtual")  # the adapter's soft prompt / prefix: its share, against the base's none
        self.summary = W.Dropdown(options=options, value=options[0], description="Colour by")
        self.layer = W.SelectionSlider(options=cap.layers, value=cap.layers[0], description="Layer")
        self.head = W.Dropdown(options=[(f"head {h}", h) for h in range(H)] + [("mean of heads", "mean"),
                                                                               ("max of heads", "max")],
                               value=0, description="Head")
        size = min(T, max_window)
        self.window_size = W.IntSlider(value=size, min=min(8, size), max=size, description="Window",
                                       tooltip="tokens shown (long prompts: move the start)")
        self.window_start = W.IntSlider(value=max(0, T - size), min=0, max=max(0, T - size), description="From token",
                                        style={"description_width": "initial"})
        first_query = cap.n_virtual if cap.n_virtual and not cap.virtual_queries else 0  # a prefix queries nothing
        self.query = W.IntSlider(value=T - 1, min=first_query, max=T - 1, description="Row: token",
                                 style={"description_width": "initial"})
        self.info = W.HTML()
        self.cells: dict[tuple[int, int], W.Button] = {}
        rows = [W.HBox([W.Label("layer", layout=W.Layout(width="44px"))] +
                       [W.Label(f"h{h}", layout=W.Layout(width="46px")) for h in range(H)],
                       layout=W.Layout(flex="0 0 auto"))]
        for layer in cap.layers:
            row = [W.Label(str(layer), layout=W.Layout(width="44px"))]
            for h in range(H):
                # no padding and a small font: the value (".52") fits the cell instead of turning into "..."
                b = W.Button(layout=W.Layout(width="46px", height="20px", margin="1px", padding="0px"))
                b.style.font_size = "11px"
                b.on_click(lambda _, layer=layer, h=h: self._guard(self.select, layer, h))
                self.cells[(layer, h)] = b
                row.append(b)
            rows.append(W.HBox(row, layout=W.Layout(flex="0 0 auto", min_height="22px")))
        self.grid = W.VBox(rows, layout=W.Layout(max_height="420px", overflow_y="auto"))
        self.heatmap = go.FigureWidget(figures.heatmap_figure(np.zeros((1, 1)), ["0"], diverging=self.diff))
        self.row_plot = go.FigureWidget(figures.row_figure(np.zeros(1), ["0"], diverging=self.diff))

        add_tips(self)
        self.summary.observe(lambda _: self._guard(self.refresh_grid), names="value")
        for w in (self.layer, self.head, self.window_start):
            w.observe(lambda _: self._guard(self.refresh_map), names="value")
        self.query.observe(lambda _: self._guard(self.refresh_row), names="value")  # the heatmap stays as it is
        self.window_size.observe(lambda ch: self._guard(self._resize, ch), names="value")

        title = (f"Attention change: {data.before.label or 'before'} \u2192 {data.after.label or 'after'}"
                 if self.diff else "Attention" + (f": {cap.label}" if cap.label else ""))  # labels: the user's text
        self.virtual_line = W.HTML(self._virtual_html())
        self.widget = W.VBox([
            W.HTML(f"<b>{html.escape(title)}</b> &middot; {int(T)} tokens, {len(cap.layers)} layers x {int(H)} heads"),
            self.virtual_line,
            W.HBox([W.VBox([self.summary, self.grid]), W.VBox([
                W.HBox([self.layer, self.head]), W.HBox([self.window_start, self.window_size]),
                self.heatmap, self.query, self.row_plot, self.info])]),
        ])
        self.refresh_grid()
        self.refresh_map()

    def _guard(self, action, *args):
        """Every error of a control is shown in the info line, never lost in the browser's log."""
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001
            self.info.value = error_html(exc, "Not shown")
            return None

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- state -------------------------------------------------------------------------
    def _need_data(self) -> None:
        if self.data is None:
            raise SftkitError(f"this view has nothing captured: {self.error}")

    @property
    def window(self) -> tuple[int, int]:
        self._need_data()
        start = int(self.window_start.value)
        return start, min(self.capture.n_tokens, start + int(self.window_size.value))

    def grid_values(self) -> np.ndarray:
        self._need_data()
        if self.summary.value == "change":
            return self.data.change()
        if self.diff and self.summary.value == "virtual":
            return self.data.virtual_share()
        if self.diff:  # on the captures as made: an adapter's virtual keys count in its entropy
            return self.data.summary(self.summary.value)
        return self.capture.summary(self.summary.value)

    @property
    def keys(self) -> np.ndarray:
        """The key positions (columns) shown: the window's, plus the virtual positions when the window has
        moved past them, so a soft prompt's share stays visible in a long prompt."""
        self._need_data()
        return self.capture.window_keys(self.window)

    def shown_map(self) -> np.ndarray:
        """The matrix the heatmap shows now (the window of the chosen layer and head): the window's
        queries as rows, ``keys`` as columns."""
        self._need_data()
        return self.data.head(self.layer.value, self.head.value, self.window, keys=self.keys)

    def _labels(self, positions) -> list[str]:
        tokens = self.capture.tokens
        return [figures.token_labels([tokens[int(i)]], start=int(i))[0] for i in positions]

    def select(self, layer: int, head: int | str) -> None:
        """What a grid click does: open that layer and head."""
        self._need_data()
        with self.heatmap.batch_update():
            self.layer.value = layer
            self.head.value = head
        self.refresh_map()

    def _resize(self, change) -> None:
        T = self.capture.n_tokens
        self.window_start.max = max(0, T - int(change["new"]))
        self.refresh_map()

    def _virtual_html(self) -> str:
        """A prompt method's virtual positions (or LLaMA-Adapter's gates) and their share, in one line; "" without."""
        data = self.data
        note = data.note if self.diff else self.capture.note
        if not note:
            return ""
        share = ""
        if (data.has_virtual if self.diff else self.capture.n_virtual):
            s = data.virtual_share()
            share = (f"<b>{100 * float(s.mean()):.1f}%</b> of the real tokens' attention goes to them (mean of "
                     f"layers and heads; {100 * float(s.min()):.1f}% to {100 * float(s.max()):.1f}% per head: "
                     "colour by <i>virtual</i>). ")
        return f'<div class="sftkit-virtual-note" style="color:#4b5563">{share}{html.escape(note)}</div>'

    # ---- rendering --------------------------------------------------------------------
    def refresh_grid(self) -> None:
        if self.data is None:
            return
        values = self.grid_values()
        diverging = self.diff and self.summary.value != "change"
        lo, hi = float(values.min()), float(values.max())
        for (layer, h), b in self.cells.items():
            v = float(values[self.capture.layers.index(layer), h])
            b.style.button_color = figures.colour_of(v, lo, hi, diverging)
            b.tooltip = f"layer {layer}, head {h}: {self.summary.value} {v:.3f}"
            b.description = f"{v:.2f}".replace("0.", ".", 1)  # ".52" fits the cell
            b.style.text_color = "#ffffff" if not diverging and (hi <= lo or (v - lo) / (hi - lo) < 0.5) else "#111111"

    def refresh_map(self) -> None:
        if self.data is None:
            return
        lo, hi = self.window
        m = self.shown_map()
        keys = self.keys
        rows = figures.token_labels(self.capture.tokens[lo:hi], start=lo)
        cols = self._labels(keys)
        head = self.head.value
        name = f"head {head}" if isinstance(head, int) else f"{head} of heads"
        with self.heatmap.batch_update():
            t = self.heatmap.data[0]
            t.z, t.x, t.y = m, cols, rows
            self.heatmap.layout.title.text = f"layer {self.layer.value}, {name}, tokens {lo}-{hi - 1}"
        self.refresh_row(cols)
        front = len(keys) - (hi - lo)
        kept = (f", and the {'' if front == self.capture.n_virtual else 'first '}{front} virtual positions as the "
                "first columns") if front else ""
        self.info.value = (f'<span style="color:#6b7280">showing {hi - lo} x {hi - lo} of '
                           f"{self.capture.n_tokens} x {self.capture.n_tokens}{kept}; the token window moves "
                           "through long prompts</span>")

    def refresh_row(self, labels: list[str] | None = None) -> None:
        """The row view: what the chosen query token attends to, over the window's keys."""
        if self.data is None:
            return
        keys = self.keys
        labels = labels or self._labels(keys)
        q = int(self.query.value)
        row = self.data.row(self.layer.value, self.head.value, q, self.window, keys=keys)
        with self.row_plot.batch_update():
            self.row_plot.data[0].x = labels
            self.row_plot.data[0].y = row
            if self.diff:
                self.row_plot.data[0].marker.color = np.where(row >= 0, "#2563eb", "#dc2626")
            token = figures.token_labels([self.capture.tokens[q]], start=q)[0]
            self.row_plot.layout.title.text = f"what token {html.escape(token)} attends to"

    # ---- static export --------------------------------------------------------------------
    def figures(self) -> list[go.Figure]:
        """Plain figures of what is on screen: the grid, the head map and the row."""
        if self.data is None:
            return []
        diverging = self.diff and self.summary.value != "change"
        return [figures.grid_figure(self.grid_values(), self.capture.layers, title=f"{self.summary.value} per head",
                                    diverging=diverging),
                go.Figure(self.heatmap), go.Figure(self.row_plot)]

    def snapshot(self) -> None:
        """Display static copies, so a saved notebook still shows them without a kernel."""
        from IPython.display import display

        for fig in self.figures():
            display(fig)

    def export_html(self, path: str | Path) -> Path:
        """One self-contained HTML file (plotly.js inside, works offline)."""
        path = Path(path)
        parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(self.figures())]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>",
                        encoding="utf-8")
        return path

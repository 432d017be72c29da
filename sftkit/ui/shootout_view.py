"""ShootoutView: the method shoot-out's table and the methods' loss curves overlaid.

Wiring only: bound to a ``sftkit.state.shootout.ShootoutSession`` (start / Stop, what it is doing,
the curves read from the runs' folders, the scored table). ``ShootoutView.reopen(store)`` shows the
latest saved shoot-out of a run store after a kernel restart.
"""

from __future__ import annotations

import html
import threading

import ipywidgets as W
import plotly.graph_objects as go

from ..state.shootout import FAILED, RESULT, ShootoutSession
from .help import add_tips
from .render import error_html

COLUMNS = ("method", "trainable", "% of model", "peak memory", "tokens/s", "minutes", "eval loss", "score [95% CI]",
           "vs the best (paired)", "forgetting (KL)")


def _num(x, fmt: str) -> str:
    return "&ndash;" if x is None else format(x, fmt)


def table_html(result) -> str:
    """The shoot-out table; every text is escaped, every number formatted."""
    if result is None:
        return "<i>no shoot-out yet: press Start (each method trains as a run, then all are scored)</i>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in result.methods:
        lo, hi = [None if x is None else 100 * x for x in (r.get("score_ci") or [None, None])]
        score = "&ndash;" if r.get("score") is None else f"{100 * r['score']:.1f}% [{_num(lo, '.1f')}, {_num(hi, '.1f')}]"
        row_style = ' style="font-weight:bold"' if r["method"] == result.best else ""
        body.append(
            f"<tr{row_style}><td>{html.escape(str(r['method']))}</td>"
            f"<td style='text-align:right'>{_num(r.get('trainable'), ',')}</td>"
            f"<td style='text-align:right'>{_num(r.get('trainable_percent'), '.3f')}%</td>"
            f"<td style='text-align:right'>{_num(r.get('peak_mib'), ',.0f')} MiB</td>"
            f"<td style='text-align:right'>{_num(r.get('tokens_per_s'), ',.0f')}</td>"
            f"<td style='text-align:right'>{_num(r.get('minutes'), '.2f')}</td>"
            f"<td style='text-align:right'>{_num(r.get('eval_loss'), '.3f')}</td>"
            f"<td style='text-align:right'>{score}</td>"
            f"<td style='font-size:12px'>{html.escape(str(r.get('vs_best') or ''))}</td>"
            f"<td style='text-align:right'>{_num(r.get('kl'), '.4f')}</td></tr>")
    zero = result.zero_shot or {}
    note = "" if zero.get("score") is None else (
        f"<div>zero-shot base model on the same items: {100 * zero['score']:.1f}%</div>")
    if any("p_vs_best_holm" in r for r in result.methods):
        from ..engine.shootout import HOLM_NOTE

        note += f"<div style='font-size:12px'>{html.escape(HOLM_NOTE)}</div>"
    b = {k: html.escape(str(v)) for k, v in (result.budget or {}).items()}  # read from a file: escaped
    caption = (f"<div><b>{html.escape(str(result.task))}</b>: {b.get('steps')} steps of batch {b.get('batch_size')}, "
               f"{b.get('rows')} rows, seed {b.get('seed')}, {b.get('eval_items')} held-out items"
               f"{'' if result.complete else ' &middot; <b>incomplete</b>'}"
               f"{'' if getattr(result, 'scored', True) else ' &middot; <b>not scored</b>'}</div>")
    return (f'<div class="sftkit-shootout">{caption}<table class="sftkit-shootout-table"><tr>{head}</tr>'
            f'{"".join(body)}</table>{note}</div>')


def curves_figure(curves: dict) -> go.Figure:
    """Each method's training loss by step, overlaid."""
    fig = go.Figure()
    for name, points in curves.items():
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=str(name))
    fig.update_layout(height=320, margin=dict(l=40, r=10, t=30, b=40), title="training loss, every method",
                      xaxis_title="step", yaxis_title="loss")
    return fig


class ShootoutView:
    """Start / Stop a shoot-out, follow the curves, read the table."""

    def __init__(self, session: ShootoutSession | None = None, *, poll_s: float = 2.0, **session_kwargs):
        self.session = session or ShootoutSession(**session_kwargs)
        self.start_button = W.Button(description="Start", icon="play", button_style="success")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="danger")
        self.status, self.table, self.messages = W.HTML(), W.HTML(), W.HTML()
        self.figure = go.FigureWidget(curves_figure({}))
        self._lock = threading.Lock()
        self._poll_s = poll_s
        self.start_button.on_click(lambda _: self._guard(self.start))
        self.stop_button.on_click(lambda _: self._guard(self.session.stop))
        add_tips(self)
        self.session.on_change(lambda event: self._guard(self.redraw, event))
        self.widget = W.VBox([W.HTML("<b>Method shoot-out</b>: the same rows, steps and seed for every PEFT method"),
                              W.HBox([self.start_button, self.stop_button]), self.status, self.figure,
                              self.table, self.messages])
        self.redraw()

    @classmethod
    def reopen(cls, store="runs") -> "ShootoutView":
        """The latest saved shoot-out of a run store."""
        return cls(ShootoutSession.reopen(store))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def snapshot(self) -> None:
        """Leave the table and the curves as static outputs (they stay in the saved notebook)."""
        from IPython.display import HTML, display

        display(HTML(table_html(self.session.result)))
        display(go.Figure(curves_figure(self.session.curves())))

    def _guard(self, action, *args):
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001 - shown, never lost in a thread or the browser's log
            self.messages.value = error_html(exc, "Shoot-out")
            return None

    def start(self) -> None:
        self.session.start()
        self.redraw()
        threading.Thread(target=self._poll, name="sftkit-shootout-view", daemon=True).start()

    def _poll(self) -> None:
        while self.session.running:
            self._guard(self.redraw)
            self.session.wait(self._poll_s)
        self._guard(self.redraw)

    def redraw(self, event: str | None = None) -> None:
        with self._lock:
            s = self.session
            self.start_button.disabled, self.stop_button.disabled = s.running, not s.running
            self.status.value = f'<div class="sftkit-status">{html.escape(s.line or "")}</div>'
            curves = s.curves()
            with self.figure.batch_update():
                fresh = curves_figure(curves)
                self.figure.data = []
                for trace in fresh.data:
                    self.figure.add_trace(trace)
            if event in (RESULT, None) or not s.running:
                self.table.value = table_html(s.result)
            if event == FAILED and s.error is not None:
                self.messages.value = error_html(s.error, "Shoot-out failed")

"""RunHistory: the run store as a table; overlay runs' loss curves; diff two runs' configs.

Everything is read back from the run folders, so it works after a kernel restart.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W
import plotly.graph_objects as go

from ..core.runconfig import config_diff
from ..core.runstore import RunStore
from . import run_figures
from .help import add_tips


def _seconds(v) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def runs_table_html(store: RunStore) -> str:
    """The store as a table; every value is escaped or formatted as a number."""
    rows = store.table()
    if not rows:
        return f"<i>no runs yet in <code>{html.escape(str(store.root))}</code></i>"

    def f(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else html.escape(str(v))

    head = "<tr><th>run</th><th>state</th><th>steps</th><th>last loss</th><th>eval loss</th><th>started</th><th>seconds</th></tr>"
    body = "".join(
        f"<tr><td>{f(r['run'])}</td><td>{f(r['state'])}</td><td>{f(r['step'])}/{f(r['max_steps']) or '?'}</td>"
        f"<td>{f(r['loss'])}</td><td>{f(r['eval_loss'])}</td><td>{f(r['started'])}</td>"
        f"<td>{_seconds(r['seconds'])}</td></tr>" for r in reversed(rows))
    return f"<table>{head}{body}</table>"


def diff_html(a_name: str, b_name: str, diff: list) -> str:
    if not diff:
        return f"<i>{html.escape(a_name)} and {html.escape(b_name)} ran with the same config</i>"
    body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(x))}</td>"
                   f"<td>{html.escape(repr(y))}</td></tr>" for k, x, y in diff)
    return (f"<table><tr><th>field</th><th>{html.escape(a_name)}</th><th>{html.escape(b_name)}</th></tr>"
            f"{body}</table>")


class RunHistory:
    """Past runs of a store: pick some to overlay their curves and compare their configs."""

    def __init__(self, store: str | Path | RunStore = "runs"):
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.table = W.HTML()
        self.picker = W.SelectMultiple(description="runs", rows=6, layout=W.Layout(width="520px"))
        self.reload_button = W.Button(description="Reload", icon="refresh")
        add_tips(self)
        self.reload_button.on_click(lambda _: self.reload())
        self.picker.observe(lambda _: self.show(), "value")
        self.figure = go.FigureWidget(run_figures.overlay_figure({}))
        self.diff = W.HTML()
        self.message = W.HTML()
        self.widget = W.VBox([W.HBox([self.picker, self.reload_button]), self.message, self.table, self.figure,
                              W.HTML("<b>Config differences</b> (first two selected runs)"), self.diff])
        self.reload()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def reload(self):
        try:
            self._reload()
        except Exception as exc:  # noqa: BLE001 - a bad folder in the store is shown, not raised
            self._error(exc)

    def _error(self, exc: Exception):
        self.message.value = (f"<span style='color:#b91c1c'>{html.escape(type(exc).__name__)}: "
                              f"{html.escape(str(exc))}</span>")

    def _reload(self):
        self.message.value = ""
        names = [r.name for r in self.store.runs()]
        keep = tuple(n for n in self.picker.value if n in names)
        self.picker.options = list(reversed(names))
        self.picker.value = keep or tuple(reversed(names))[:2]
        self.table.value = runs_table_html(self.store)
        self._show()

    def select(self, *names: str):
        self.picker.value = tuple(names)

    def overlay(self, *names: str) -> go.Figure:
        return run_figures.overlay_figure({n: self.store.get(n).metrics() for n in names})

    def config_diff(self, a: str, b: str) -> list:
        return config_diff(self.store.get(a).config(), self.store.get(b).config())

    def show(self):
        try:
            self._show()
        except Exception as exc:  # noqa: BLE001
            self._error(exc)

    def _show(self):
        names = list(self.picker.value)
        fig = self.overlay(*names)
        with self.figure.batch_update():
            self.figure.data = ()
            for trace in fig.data:
                self.figure.add_trace(trace)
        if len(names) >= 2:
            self.diff.value = diff_html(names[0], names[1], self.config_diff(names[0], names[1]))
        else:
            self.diff.value = "<i>select two runs to compare their configs</i>"

"""CompareView: prompting the base model vs fine-tuned adapters on the same held-out items.

Wiring over a ``ComparisonSession`` (``sftkit.state``): the comparison runs in a background thread
with a progress bar and ETA (Stop works, the kernel stays usable); when it ends the view draws a
summary chart per metric family (score with its 95% interval per variant), the paired table with
verdicts, the forgetting check, and the per-item table (filters, paging, differences from the
reference highlighted). Export to CSV and to one offline HTML file; ``snapshot()`` for saved
notebooks. Every error from the thread or a button is shown in the message area.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Sequence

import ipywidgets as W
import plotly.graph_objects as go

from ..state.comparison import FAILED, FILTERS, PROGRESS, RESULT, ComparisonSession
from . import compare_figures as F
from .help import add_tips
from .render import error_html


class CompareView:
    """variants: ``sftkit.Variant``s (zero-shot, few-shot, ``Variant.from_run(run)``); rows: the
    held-out items; model, tokenizer: the base model, loaded once; the rest goes to ``sftkit.compare``
    (``scorer=``, ``cache=``, ``batch_size=``, ...)."""

    def __init__(self, variants: Sequence, rows: Sequence[dict], *, model, tokenizer, page_size: int = 20,
                 start: bool = True, **compare_kwargs):
        self.session = ComparisonSession(variants, rows, model=model, tokenizer=tokenizer, page_size=page_size,
                                         **compare_kwargs)
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="320px"))
        self.progress_label, self.message = W.Label(""), W.HTML()
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="warning")
        self.csv_button = W.Button(description="Export CSV", icon="download")
        self.html_button = W.Button(description="Export HTML", icon="download")
        self.filter = W.Dropdown(options=FILTERS, value="all", description="show")
        names = [v.name for v in variants]
        # wins / losses: of the last variant (usually the adapter) over the first (usually zero-shot)
        self.a = W.Dropdown(options=names, value=names[-1], description="A", layout=W.Layout(width="230px"))
        self.b = W.Dropdown(options=names, value=names[0], description="vs B", layout=W.Layout(width="230px"))
        self._lock = threading.RLock()  # the comparison's thread and the kernel both draw
        self.page = W.BoundedIntText(value=1, min=1, max=1, description="page", layout=W.Layout(width="160px"))
        self.pages_label = W.Label("")
        self.charts, self.pairs, self.forgetting, self.items = W.HBox(), W.HTML(), W.HTML(), W.HTML()
        for button, action in ((self.stop_button, self.session.stop), (self.csv_button, self.export_csv),
                               (self.html_button, self.export_html)):
            button.on_click(lambda _, act=action: self._guard(act))
        for control in (self.filter, self.a, self.b):
            control.observe(lambda _: self._guard(self._first_page), "value")
        self.page.observe(lambda _: self._guard(self.draw_items), "value")
        add_tips(self)
        self.session.on_change(self._on_event)
        self.widget = W.VBox([
            W.HBox([self.stop_button, self.progress, self.progress_label]), self.message, self.charts,
            W.HTML("<b>Paired comparisons</b> (same items)"), self.pairs,
            W.HTML("<b>Cost elsewhere</b> (forgetting)"), self.forgetting,
            W.HBox([self.filter, self.a, self.b]),
            W.HBox([self.page, self.pages_label, self.csv_button, self.html_button]), self.items])
        if start:
            self.start()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    @property
    def result(self):
        return self.session.result

    def start(self) -> None:
        self.message.value = "comparing: generation runs in the background; Stop keeps what is done"
        self.session.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the comparison ends (scripts and tests)."""
        return self.session.wait(timeout)

    def _guard(self, action):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - every error of a button goes to the message area
            self.message.value = error_html(exc, "Failed")
            return None

    def _on_event(self, event: str) -> None:  # called from the comparison's thread
        self._guard(lambda: self._event(event))

    def _event(self, event: str) -> None:
        if event == PROGRESS:
            p = self.session.progress()
            self.progress.max, self.progress.value = max(p.total, 1), p.done
            self.progress_label.value = p.label
        elif event == FAILED:
            self.message.value = error_html(self.session.error, "The comparison failed")
        elif event == RESULT:
            self.draw()

    def _first_page(self) -> None:
        if self.page.value != 1:
            self.page.value = 1  # its observer draws
        else:
            self.draw_items()

    # ---- drawing --------------------------------------------------------------------------------
    def draw(self) -> None:
        with self._lock:
            self._draw()

    def _draw(self) -> None:
        res = self.result
        if res is None:
            return
        self.stop_button.disabled = True
        self.message.value = ("" if res.complete else
                              f"<b>stopped</b>: results on the first {res.n} of {len(res.items)} items")
        self.charts.children = [go.FigureWidget(fig) for fig in F.summary_figures(res)]
        self.pairs.value = F.pairs_table_html(res)
        self.forgetting.value = F.forgetting_html(res)
        self.draw_items()

    def draw_items(self) -> None:
        with self._lock:
            self._draw_items()

    def _draw_items(self) -> None:
        if self.result is None:
            return
        rows = self.session.item_rows(self.filter.value, self.a.value, self.b.value)
        shown, pages = self.session.page(rows, self.page.value - 1)
        self.page.max = pages
        self.pages_label.value = f"of {pages} ({len(rows)} items)"
        self.items.value = F.items_table_html(shown, list(self.result.variants) if self.result else [])

    # ---- export ---------------------------------------------------------------------------------
    def export_csv(self, path: str | Path = "comparison.csv") -> Path:
        out = self.result.to_csv(path)
        self.message.value = f"wrote <code>{html.escape(str(out))}</code>"
        return out

    def figures(self) -> list[go.Figure]:
        return F.summary_figures(self.result) if self.result is not None else []

    def report_html(self) -> str:
        """One self-contained page: charts (plotly.js inside, works offline) and every table."""
        figs = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(self.figures())]
        rows = self.session.item_rows("all")
        names = list(self.result.variants) if self.result else []
        return ("<html><head><meta charset='utf-8'><title>sftkit comparison</title></head><body>"
                + "".join(figs) + "<h3>Paired comparisons</h3>" + F.pairs_table_html(self.result)
                + "<h3>Cost elsewhere</h3>" + F.forgetting_html(self.result)
                + "<h3>Items</h3>" + F.items_table_html(rows, names) + "</body></html>")

    def export_html(self, path: str | Path = "comparison.html") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.report_html(), encoding="utf-8")
        self.message.value = f"wrote <code>{html.escape(str(path))}</code>"
        return path

    def snapshot(self) -> None:
        """Static copies (charts and tables), kept in the saved notebook."""
        from IPython.display import HTML, display

        for fig in self.figures():
            display(fig)
        display(HTML(F.pairs_table_html(self.result) + F.forgetting_html(self.result)
                     + F.items_table_html(self.session.item_rows("flips", self.a.value, self.b.value)[:50],
                                          list(self.result.variants))))

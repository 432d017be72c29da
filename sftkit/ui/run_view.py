"""RunView: one run followed live (progress, state, curves, samples), wiring over a RunMonitor.

Curves update in place in a plotly FigureWidget from a poller thread: numpy arrays, one
``batch_update`` per redraw, at most ``1 / min_redraw_s`` redraws a second. An error while
following is shown in the message area and polling goes on. The launcher builds on it; any
other view that follows a run can too.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go

from ..core.runproto import ACTIVE_STATES
from ..state.run_monitor import RunMonitor
from . import run_figures
from .live import Poller
from .render import error_html  # noqa: F401 - views import it from here too

STATE_COLOURS = {"pending": "#6b7280", "running": "#2563eb", "stopping": "#d97706", "finished": "#047857",
                 "stopped": "#d97706", "failed": "#b91c1c", "interrupted": "#b91c1c", "idle": "#6b7280"}


class RunView:
    def __init__(self, monitor: RunMonitor | None = None, *, poll_s: float = 0.5, min_redraw_s: float = 0.5,
                 on_state: Callable[[str], None] | None = None):
        self.monitor = monitor or RunMonitor()
        self.poll_s, self.min_redraw_s = poll_s, min_redraw_s
        self.on_state = on_state  # told the state after each look (the launcher enables its buttons)
        self._refresh_lock = threading.RLock()  # the poller thread and the notebook both refresh
        self._poller: Poller | None = None
        self._last_redraw = 0.0
        self.redraws = 0
        self._failing = False  # the last look failed: its message is up until a look succeeds
        self._folder_line = ""
        self._batching_shown = ""
        self._warnings_shown = 0
        self.message, self.state_label = W.HTML(), W.HTML()
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="320px"))
        self.progress_label = W.Label("")
        self.figure = go.FigureWidget(run_figures.run_figure(title=""))
        self.samples = W.HTML(run_figures.samples_html([]), layout=W.Layout(width="330px", max_height="440px",
                                                                          overflow="auto"))
        self.curves = W.HBox([self.figure, W.VBox([W.HTML("<b>Samples</b> (held-out prompts)"), self.samples])])

    @property
    def errors(self) -> int:
        return self.monitor.errors

    def show_error(self, exc: Exception, what: str) -> None:
        self.message.value = error_html(exc, what)

    def follow(self, handle) -> None:
        """Follow ``handle``'s run: read it all now, then poll while it is active."""
        if self._poller is not None:
            self._poller.stop()
        self.monitor.follow(handle)
        notes = "".join(f"<br><span style='color:#92400e'>&#9888; {html.escape(line)}</span>"
                        for report in handle.reports for line in report.lines())
        self._folder_line = f"run folder: <code>{html.escape(str(handle.run.path))}</code>{notes}"
        self._batching_shown = ""
        self._warnings_shown = 0
        self.message.value = self._folder_line
        try:
            active = self.refresh(force=True) in ACTIVE_STATES
        except Exception as exc:  # noqa: BLE001 - shown; the poller keeps trying
            self._poll_error(exc)
            active = True
        self._poller = Poller(self._poll_step, self._poll_error, self.poll_s) if active else None

    def _poll_step(self) -> bool:
        if self.refresh() in ACTIVE_STATES:
            return True
        self.refresh(force=True)  # the last lines after the end
        return False

    def _poll_error(self, exc: Exception) -> None:
        self.monitor.errors += 1
        self._failing = True
        self.show_error(exc, "Following the run failed (still trying)")

    def refresh(self, force: bool = False) -> str:
        """Read what the run wrote since the last look and redraw (throttled)."""
        if self.monitor.handle is None:
            return "idle"
        with self._refresh_lock:
            change = self.monitor.refresh()
            if self.monitor.batching and self.monitor.batching != self._batching_shown:
                self._batching_shown = self.monitor.batching
                self._folder_line += f"<br><span style='color:#374151'>{html.escape(self.monitor.batching)}</span>"
                if not self._failing:
                    self.message.value = self._folder_line
            if len(self.monitor.warnings) > self._warnings_shown:  # the run's own warnings, as they come
                new = self.monitor.warnings[self._warnings_shown:]
                self._warnings_shown = len(self.monitor.warnings)
                self._folder_line += "".join(f"<br><span style='color:#92400e'>&#9888; {html.escape(w)}</span>"
                                             for w in new)
                if not self._failing:
                    self.message.value = self._folder_line
            if self._failing:  # reading works again: the error message goes
                self._failing = False
                self.message.value = self._folder_line
            now = time.monotonic()
            if force or ((change.data or change.rewound) and now - self._last_redraw >= self.min_redraw_s):
                self._redraw()
                self._last_redraw = now
            progress = self.monitor.progress()
            self.progress.max = max(progress.total, 1)
            self.progress.value = min(progress.step, self.progress.max)
            self.progress_label.value = progress.label
            self.set_state(change.state, change.message)
            return change.state

    def _redraw(self) -> None:
        arrays = self.monitor.curves()
        with self.figure.batch_update():
            for trace, (x, y) in zip(self.figure.data, arrays):
                trace.x, trace.y = x, y
        self.samples.value = run_figures.samples_html(self.monitor.snapshot()[1])
        self.redraws += 1

    def set_state(self, state: str, message: str = "") -> None:
        colour = STATE_COLOURS.get(state, "#111827")
        self.state_label.value = (f"<b style='color:{colour}'>{html.escape(state)}</b> "
                                  f"<span style='color:#374151'>{html.escape(message or '')}</span>")
        if self.on_state is not None:
            self.on_state(state)

    def wait_poller(self, timeout: float = 10.0) -> None:
        if self._poller is not None:
            self._poller.join(timeout)

    def static_figure(self) -> go.Figure:
        handle = self.monitor.handle
        return run_figures.run_figure(self.monitor.snapshot()[0], title=handle.run.name if handle else "")

    def snapshot(self) -> None:
        """Display a static copy (figure + metrics table + samples), kept in the saved notebook."""
        from IPython.display import HTML, display

        metrics, samples = self.monitor.snapshot()
        display(self.static_figure())
        display(HTML(run_figures.metrics_table_html(metrics) + run_figures.samples_html(samples)))

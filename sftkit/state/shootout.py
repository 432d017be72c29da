"""The state behind the shoot-out view: a method shoot-out running in the background (which method
trains, its live loss curve read from its run folder, Stop), and its table once scored. Plain
Python, no widget library.

``ShootoutSession.start()`` runs ``sftkit.engine.shootout.compare_methods`` in a thread. While it
runs, ``curves()`` reads each started run's loss curve from its folder (so the view overlays the
methods as they train); once it is done, ``result`` is the ``Shootout`` (also saved in the run
store: ``ShootoutSession.reopen(store)`` shows the latest one after a kernel restart).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Sequence

from .observable import Observable

RESULT, PROGRESS, FAILED = "result", "progress", "failed"


class ShootoutSession(Observable):
    """One shoot-out: methods trained one after the other on the same rows, then scored together."""

    def __init__(self, task: str = "dates", methods: Sequence | None = None, budget=None, *,
                 model: str = "default", store: str | Path = "runs"):
        self.task, self.methods, self.budget = task, methods, budget
        self.model, self.store = model, Path(store)
        self.result = None  # a Shootout once finished (or stopped)
        self.error: BaseException | None = None
        self.line = ""  # what it is doing now
        self.runs: dict[str, object] = {}  # method name -> its RunFolder, as each starts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    @classmethod
    def reopen(cls, store: str | Path = "runs") -> "ShootoutSession":
        """The latest saved shoot-out of a run store (``result`` None when there is none)."""
        from ..core.runconfig import RunConfigError
        from ..engine.shootout import latest_shootout

        session = cls(store=store)
        session.result = latest_shootout(store)
        if session.result is not None:
            session.task = session.result.task
            session.line = f"saved shoot-out {session.result.name}"
            session.model = session.result.model or session.model
            try:  # Start runs it again as it was: the same methods and budget
                session.methods, session.budget = session.result.settings()
            except (RunConfigError, TypeError) as exc:
                session.line += f" (its methods and budget can't be reused: {exc})"
        return session

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started if self._started else 0.0

    def start(self) -> None:
        """Train and score in a thread (the kernel stays usable); ``stop()`` ends it after the current run."""
        if self.running:
            return
        from ..engine.shootout import compare_methods

        self._stop = threading.Event()
        self.error, self.result, self.runs, self._started = None, None, {}, time.perf_counter()

        def progress(line: str) -> None:
            self.line = line
            self._notify(PROGRESS)

        def on_run(method, run) -> None:
            self.runs[method.name] = run
            self._notify(PROGRESS)

        def work() -> None:
            try:
                self.result = compare_methods(self.task, self.methods, self.budget, model=self.model, store=self.store,
                                              progress=progress, stop=self._stop, on_run=on_run)
            except BaseException as exc:  # noqa: BLE001 - kept and shown by the view
                self.error = exc
                self.line = f"failed: {type(exc).__name__}: {exc}"
                self._notify(FAILED)
                return
            self.line = f"done in {self.seconds / 60:.1f} min" + ("" if self.result.complete else " (incomplete)")
            self._notify(RESULT)

        self._thread = threading.Thread(target=work, name="sftkit-shootout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The run in progress stops at its next step (its adapter is kept); no other starts."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def curves(self) -> dict[str, list[list[float]]]:
        """method -> [[step, loss], ...]: the saved table's, else read live from each started run's folder."""
        if self.result is not None and not self.running:
            return {k: [list(p) for p in v] for k, v in self.result.curves.items()}
        out = {}
        for name, run in list(self.runs.items()):
            out[name] = [[m["step"], m["loss"]] for m in run.metrics() if m.get("loss") is not None]
        return out

    def table(self) -> list[dict]:
        return self.result.table() if self.result is not None else []

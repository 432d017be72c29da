"""The state behind the comparison view: a comparison running in the background (progress, ETA,
Stop), its result, and the per-item table's filter and page. Plain Python, no widget library.

``ComparisonSession.start()`` runs ``sftkit.engine.compare.compare`` in a thread; the view polls
``progress()`` and redraws when ``on_change`` says the result arrived. ``rows(filter, page)`` gives
the per-item table a view shows: input, reference, each variant's output and score, filtered to
all items, items where the variants disagree (flips), wins or losses of the first variant over the
second, or errors (items some variant got wrong).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

from .observable import Observable

FILTERS = ("all", "flips", "wins", "losses", "errors")
RESULT, PROGRESS, FAILED = "result", "progress", "failed"


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    seconds: float

    @property
    def eta_seconds(self) -> float | None:
        if not self.done or self.done >= self.total:
            return None
        return self.seconds / self.done * (self.total - self.done)

    @property
    def label(self) -> str:
        text = f"{self.done}/{self.total} generations"
        eta = self.eta_seconds
        return text + (f" · ETA {eta:.0f} s" if eta is not None else "")


class ComparisonSession(Observable):
    """One comparison: variants on the same items, run in the background."""

    def __init__(self, variants: Sequence, rows: Sequence[dict], *, model, tokenizer, page_size: int = 20,
                 **compare_kwargs):
        self.variants, self.items = list(variants), [dict(r) for r in rows]
        self.model, self.tokenizer, self.compare_kwargs = model, tokenizer, compare_kwargs
        self.page_size = page_size
        self.result = None  # a Comparison once finished (or stopped)
        self.error: BaseException | None = None
        self._done, self._total, self._started = 0, 0, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners = []

    # ---- running -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the comparison in a thread (the kernel stays usable); ``stop()`` ends it early."""
        if self.running:
            return
        from ..engine.compare import compare

        self._stop = threading.Event()
        self.error, self._started = None, time.perf_counter()

        def progress(done: int, total: int) -> None:
            self._done, self._total = done, total
            self._notify(PROGRESS)

        def work() -> None:
            try:
                self.result = compare(self.variants, self.items, model=self.model, tokenizer=self.tokenizer,
                                      progress=progress, stop=self._stop, **self.compare_kwargs)
            except BaseException as exc:  # noqa: BLE001 - kept and shown by the view
                self.error = exc
                self._notify(FAILED)
                return
            self._notify(RESULT)

        self._thread = threading.Thread(target=work, name="sftkit-compare", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def progress(self) -> Progress:
        return Progress(self._done, self._total, time.perf_counter() - self._started if self._started else 0.0)

    # ---- the per-item table ---------------------------------------------------------------------
    def item_rows(self, filter: str = "all", a: str | None = None, b: str | None = None) -> list[dict]:
        """One dict per item: index, input, reference, and per variant its output and score."""
        if filter not in FILTERS:
            raise ValueError(f"filter={filter!r} is not allowed; allowed: {', '.join(FILTERS)}")
        if self.result is None:
            return []
        res = self.result
        names = list(res.variants)
        a, b = a or names[0], b or (names[1] if len(names) > 1 else names[0])
        out = []
        for i in range(res.n):  # items every variant answered (fewer when stopped)
            scores = {n: float(res.results[n][i][res.primary]) for n in names}
            keep = {
                "all": True,
                "flips": len({s > 0 for s in scores.values()}) > 1,
                "wins": scores[a] > scores[b],
                "losses": scores[a] < scores[b],
                "errors": any(s <= 0 for s in scores.values()),
            }[filter]
            if keep:
                out.append({"index": i, "input": res.inputs[names[0]][i], "reference": res.references[names[0]][i],
                            "outputs": {n: res.results[n][i]["output"] for n in names}, "scores": scores})
        return out

    def page(self, rows: list[dict], page: int) -> tuple[list[dict], int]:
        """Rows of ``page`` (0-based) and the number of pages."""
        pages = max(1, -(-len(rows) // self.page_size))
        page = min(max(page, 0), pages - 1)
        return rows[page * self.page_size:(page + 1) * self.page_size], pages

"""A background poller for live views: calls ``step()`` every ``interval`` seconds until it returns
False or ``stop()``; an exception goes to ``on_error`` and polling goes on (a failed look must
never freeze a view)."""

from __future__ import annotations

import threading
from typing import Callable


class Poller:
    def __init__(self, step: Callable[[], bool], on_error: Callable[[Exception], None], interval: float):
        self._step, self._on_error, self.interval = step, on_error, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="sftkit-view-poller")
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._step():
                    return
            except Exception as exc:  # noqa: BLE001 - shown by the view; polling goes on
                self._on_error(exc)
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

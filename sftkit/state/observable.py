"""Change notifications for state objects: plain callbacks, no widget library."""

from __future__ import annotations

from typing import Callable


class Observable:
    """``on_change(callback)`` registers ``callback(event)``; ``_notify(event)`` calls each one."""

    _listeners: list[Callable[[str], None]]

    def on_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after each change; returns a function that unsubscribes it."""
        if not hasattr(self, "_listeners"):
            self._listeners = []
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self, event: str) -> None:
        for callback in list(getattr(self, "_listeners", ())):
            callback(event)

"""Follow a run folder from any process: new metrics, samples and events since the last look.

Views use this to (re)attach to a run: a fresh follower reads everything so far, then only
what was appended. A resume replaces metrics.jsonl and samples.jsonl (new files, and a new
``attempt`` in the status): the follower notices either and starts those files over, with a
``rewound`` event, even when the new files have already grown past the old ones' size.
Safe to poll from several threads. Nothing here writes; the folder is the interface.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from .runproto import Event, Metric, RunState, Status, sample_row
from .runstore import RunFolder, read_jsonl


@dataclass
class Update:
    status: Status
    state: str
    message: str = ""
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    rewound: bool = False

    @property
    def empty(self) -> bool:
        return not (self.metrics or self.samples or self.events or self.rewound)


def _identity(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class RunFollower:
    def __init__(self, run: RunFolder):
        self.run = run
        self._lock = threading.Lock()
        self._offsets = {"metrics": 0, "samples": 0, "events": 0}
        self._files: dict[str, tuple[int, int] | None] = {}
        self._attempt: int | None = None

    def _paths(self):
        return (("metrics", self.run.metrics_path), ("samples", self.run.samples_path),
                ("events", self.run.events_path))

    def poll(self) -> Update:
        with self._lock:
            status = self.run.status()
            reading = self.run.reading(status)
            out = Update(status=status, state=reading.state.value, message=reading.message)
            replaced = self._attempt is not None and status.attempt != self._attempt
            for key, path in self._paths()[:2]:
                ident = _identity(path)
                if key in self._files and self._files[key] is not None and ident != self._files[key]:
                    replaced = True
            if replaced:
                self._offsets["metrics"] = self._offsets["samples"] = 0
                out.rewound = True
                out.events.append({"event": "rewound", "time": time.time()})
            self._attempt = status.attempt
            for key, path in self._paths():
                self._files[key] = _identity(path)
                rows, self._offsets[key] = read_jsonl(path, self._offsets[key])
                if key == "metrics":
                    out.metrics.extend(m.row() for m in map(Metric.from_dict, rows) if m is not None)
                elif key == "samples":
                    out.samples.extend(s for s in map(sample_row, rows) if s is not None)
                else:
                    out.events.extend({"event": e.kind, "time": e.time, **e.fields}
                                      for e in map(Event.from_dict, rows) if e is not None)
            return out

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> str:
        """Block until the run ends (or ``timeout`` seconds); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.run.reading().state
            if state.ended:
                return state.value
            if deadline is not None and time.monotonic() > deadline:
                return state.value
            time.sleep(interval)


__all__ = ["RunFollower", "Update", "RunState"]

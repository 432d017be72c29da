"""Follow a run folder from any process: new metrics, samples and events since the last look.

Views use this to (re)attach to a run: a fresh follower reads everything so far, then only
what was appended. Nothing here talks to the run process; the folder is the interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .runstore import END_STATES, RunFolder, read_jsonl


@dataclass
class Update:
    status: dict
    state: str
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.metrics or self.samples or self.events)


class RunFollower:
    def __init__(self, run: RunFolder):
        self.run = run
        self._offsets = {"metrics": 0, "samples": 0, "events": 0}
        self._metrics_size = 0

    def poll(self) -> Update:
        status = self.run.read_status()
        out = Update(status=status, state=self.run.state(status))
        # a resumed run rewrites metrics.jsonl shorter: start over when it shrank
        try:
            size = self.run.metrics_path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self._metrics_size:
            self._offsets = {"metrics": 0, "samples": 0, "events": self._offsets["events"]}
            out.events.append({"event": "rewound"})
        self._metrics_size = size
        for key, path in (("metrics", self.run.metrics_path), ("samples", self.run.samples_path),
                          ("events", self.run.events_path)):
            rows, self._offsets[key] = read_jsonl(path, self._offsets[key])
            getattr(out, key).extend(rows)
        return out

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> str:
        """Block until the run ends (or ``timeout`` seconds); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.run.state()
            if state in END_STATES:
                return state
            if deadline is not None and time.monotonic() > deadline:
                return state
            time.sleep(interval)

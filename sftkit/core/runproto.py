"""The run protocol: the states a run goes through and the records its folder holds.

One home for what a run folder means, shared by the run process (the writer), the
launcher, the follower, the views and the command line (readers):

- ``RunState``: the states and the transitions a writer may make (``check_transition``).
- ``ProcessId``: a process named by pid + start time + host, so a reused pid is not mistaken
  for the run's process.
- ``Status`` / ``Metric`` / ``Event``: typed records read back from ``status.json``,
  ``metrics.jsonl`` and ``events.jsonl``. Reading coerces every field to its type (a number is a
  number, a state is a state), so text from a shared or downloaded folder can't pose as anything
  else; the views still escape every string they show.
- ``effective_state``: what a status means now (a dead writer's ``running`` reads as
  ``interrupted``). It only reads. ``reconcile`` returns the status to write when someone
  decides to record that (the launcher, for the process it started); reading never writes.

Pure Python (psutil, a declared dependency, gives process start times): no torch, no widgets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SCHEMA_VERSION = 1
# a run folder whose writer never reported (no status, or a launcher's "pending" without a
# process) is taken as interrupted after this many seconds
START_GRACE_S = 120.0
# the run process beats its heartbeat this often from a thread of its own
HEARTBEAT_S = 5.0
# a writer on another host (a shared folder) is taken as dead when its heartbeat is this old
STALE_HEARTBEAT_S = 300.0


class RunState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        return self in ACTIVE

    @property
    def ended(self) -> bool:
        return not self.active


ACTIVE = frozenset({RunState.PENDING, RunState.RUNNING, RunState.STOPPING})
ENDED = frozenset(RunState) - ACTIVE
ACTIVE_STATES = tuple(s.value for s in RunState if s in ACTIVE)
END_STATES = tuple(s.value for s in RunState if s in ENDED)

# What a writer may move a run to. An ended run only goes back to pending (a resume).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.PENDING, RunState.RUNNING, RunState.STOPPING, RunState.STOPPED,
                                 RunState.FAILED, RunState.INTERRUPTED}),
    RunState.RUNNING: frozenset({RunState.RUNNING, RunState.STOPPING, RunState.FINISHED, RunState.STOPPED,
                                 RunState.FAILED, RunState.INTERRUPTED}),
    RunState.STOPPING: frozenset({RunState.STOPPING, RunState.STOPPED, RunState.FINISHED, RunState.FAILED,
                                  RunState.INTERRUPTED}),
    **{s: frozenset({RunState.PENDING}) for s in ENDED},
}


class ProtocolError(RuntimeError):
    """A writer tried a transition the protocol does not allow (a bug, not a user error)."""


def check_transition(old: RunState | None, new: RunState) -> None:
    if old is None:
        if new is not RunState.PENDING and new is not RunState.FAILED:
            raise ProtocolError(f"a run starts as pending, not {new}")
        return
    if new not in TRANSITIONS[old]:
        raise ProtocolError(f"a run can't go from {old} to {new}")


# ---- processes ------------------------------------------------------------------------------
def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - gone, no permission, or no psutil: unknown
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class ProcessId:
    """A process as pid + start time + host: a pid alone can name another process after reuse."""

    pid: int
    start: float | None
    host: str

    @classmethod
    def current(cls) -> "ProcessId":
        return cls(os.getpid(), _start_time(os.getpid()), socket.gethostname())

    @classmethod
    def of(cls, pid: int) -> "ProcessId":
        return cls(int(pid), _start_time(int(pid)), socket.gethostname())

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start, "host": self.host}

    @classmethod
    def from_dict(cls, d: Any) -> "ProcessId | None":
        if not isinstance(d, dict):
            return None
        pid = _as_int(d.get("pid"))
        if pid is None or pid <= 0:
            return None
        return cls(pid, _as_float(d.get("start")), _as_str(d.get("host")))

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True / False on this host; None (unknown) for a process on another host."""
        if not self.on_this_host:
            return None
        if not _pid_running(self.pid):
            return False
        if self.start is None:
            return True  # recorded without a start time: the pid is all there is
        now_start = _start_time(self.pid)
        return now_start is None or abs(now_start - self.start) < 1.0


# ---- coercion of what a file says ---------------------------------------------------------------
def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _as_float(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)  # NaN and inf stay: a metric may be NaN, and views show it as such


def _as_str(v, default: str = "") -> str:
    if v is None:
        return default
    return v if isinstance(v, str) else str(v)


def _as_opt_str(v) -> str | None:
    return None if v is None else _as_str(v)


def _as_state(v) -> RunState | None:
    try:
        return RunState(v)
    except ValueError:
        return None


# ---- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    """``status.json``: the writer's last word. ``state`` None: the folder has no (readable) status."""

    state: RunState | None = None
    step: int = 0
    max_steps: int | None = None
    message: str = ""
    process: ProcessId | None = None
    heartbeat: float | None = None
    attempt: int = 0  # 0 for the first process, +1 for each resume: followers see a new attempt
    started_at: str | None = None
    ended_at: str | None = None
    seconds: float | None = None
    device: str | None = None
    world_size: int = 1
    plan: str = ""
    output: str | None = None
    data_sha256: str | None = None
    mode: str = "process"  # "thread": an in-kernel run (its process is the kernel: never killed)
    schema: int = SCHEMA_VERSION
    unknown_state: str | None = None  # a state this version does not know (shown, never trusted)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown_state"}
        d["state"] = self.state.value if self.state is not None else None
        d["process"] = self.process.to_dict() if self.process is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Status":
        if not isinstance(d, dict):
            return cls()
        state = _as_state(d.get("state"))
        process = ProcessId.from_dict(d.get("process"))
        if process is None and _as_int(d.get("pid")):  # folders written before the protocol
            process = ProcessId(_as_int(d.get("pid")), None, socket.gethostname())
        return cls(
            state=state,
            step=max(_as_int(d.get("step")) or 0, 0),
            max_steps=_as_int(d.get("max_steps")),
            message=_as_str(d.get("message")),
            process=process,
            heartbeat=_as_float(d.get("heartbeat")),
            attempt=max(_as_int(d.get("attempt")) or 0, 0),
            started_at=_as_opt_str(d.get("started_at")),
            ended_at=_as_opt_str(d.get("ended_at")),
            seconds=_as_float(d.get("seconds")),
            device=_as_opt_str(d.get("device")),
            world_size=max(_as_int(d.get("world_size")) or 1, 1),
            plan=_as_str(d.get("plan")),
            output=_as_opt_str(d.get("output")),
            data_sha256=_as_opt_str(d.get("data_sha256")),
            mode="thread" if d.get("mode") == "thread" else "process",
            schema=_as_int(d.get("schema")) or 0,
            unknown_state=None if state is not None or d.get("state") is None else _as_str(d.get("state"))[:40],
        )

    def with_changes(self, **fields) -> "Status":
        return dataclasses.replace(self, **fields)


METRIC_NUMBERS = ("epoch", "time", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "steps_per_s",
                  "tokens_seen", "memory_rss", "memory_cuda_peak")
# preference runs (dpo / kto): TRL's reward metrics, as TRL names them; eval_ on held-out pairs
PREFERENCE_NUMBERS = tuple(f"{split}rewards/{name}" for split in ("", "eval_")
                           for name in ("chosen", "rejected", "margins", "accuracies"))
METRIC_NUMBERS += PREFERENCE_NUMBERS


@dataclass(frozen=True)
class Metric:
    """One line of ``metrics.jsonl``: a logged step (numbers only)."""

    step: int
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "step": self.step, **self.values}

    @classmethod
    def from_dict(cls, d: Any) -> "Metric | None":
        if not isinstance(d, dict):
            return None
        step = _as_int(d.get("step"))
        if step is None:
            return None
        values = {k: _as_float(d[k]) for k in METRIC_NUMBERS if k in d and _as_float(d[k]) is not None}
        return cls(step, values)

    def row(self) -> dict:
        """The plain dict the figures take: step plus the numbers."""
        return {"step": self.step, **self.values}


EVENT_KINDS = ("started", "resumed", "checkpoint", "eval", "sample", "sample_failed", "rows_dropped",
               "truncated", "data_changed", "train_summary", "stopped", "finished", "failed", "interrupted",
               "warning",  # warning: something the run should be told (few preference pairs, memorised pairs)
               "batching")  # batching: packing chosen or not (and the padding it saves), the loss path, passes


@dataclass(frozen=True)
class Event:
    """One line of ``events.jsonl``: a kind from EVENT_KINDS, a time, and its fields."""

    kind: str
    time: float | None
    fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "event": self.kind, "time": self.time, **self.fields}

    @classmethod
    def from_dict(cls, d: Any) -> "Event | None":
        if not isinstance(d, dict):
            return None
        kind = d.get("event")
        if kind not in EVENT_KINDS:
            return None
        rest = {k: v for k, v in d.items() if k not in ("event", "time", "schema")}
        return cls(kind, _as_float(d.get("time")), rest)


def sample_row(d: Any) -> dict | None:
    """One line of ``samples.jsonl`` with its fields coerced (strings are strings, step an int)."""
    if not isinstance(d, dict):
        return None
    step = _as_int(d.get("step"))
    if step is None:
        return None
    return {"step": step, "index": _as_int(d.get("index")) or 0, "prompt": _as_str(d.get("prompt")),
            "target": _as_str(d.get("target")), "output": _as_str(d.get("output")),
            "seconds": _as_float(d.get("seconds"))}


# ---- what a status means now -------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """A status read at a moment: the state it stands for now, and why."""

    state: RunState
    status: Status
    reason: str = ""

    @property
    def message(self) -> str:
        return self.reason or self.status.message


def effective_state(status: Status, *, folder_age_s: float | None, now: float | None = None) -> Reading:
    """The state a status stands for now, without writing anything.

    folder_age_s: seconds since the run's config was written (for a folder with no status).
    An active state whose writer is gone reads as ``interrupted``; so does a folder that never
    got a status, or a launcher's ``pending`` that no process took over, after START_GRACE_S.
    """
    now = time.time() if now is None else now
    if status.state is None:
        if status.unknown_state is not None:
            return Reading(RunState.FAILED, status, f"status.json holds an unknown state {status.unknown_state!r}")
        if folder_age_s is not None and folder_age_s > START_GRACE_S:
            return Reading(RunState.INTERRUPTED, status,
                           f"the run never reported a status ({folder_age_s:.0f} s since its config was written)")
        return Reading(RunState.PENDING, status, "starting")
    if status.state in ENDED:
        return Reading(status.state, status)
    if status.process is None:
        age = now - status.heartbeat if status.heartbeat is not None else folder_age_s
        if age is not None and age > START_GRACE_S:
            return Reading(RunState.INTERRUPTED, status,
                           f"no run process took the run over ({age:.0f} s since it was launched)")
        return Reading(status.state, status)
    alive = status.process.alive()
    if alive and status.process.start is None:
        # recorded without a start time (an older folder, or no psutil): the pid alone proves
        # nothing after reuse; trust it only if that process existed when the heartbeat was written
        # and the heartbeat is recent
        started = _start_time(status.process.pid)
        beat = status.heartbeat
        if beat is None or now - beat > STALE_HEARTBEAT_S or (started is not None and started > beat):
            return Reading(RunState.INTERRUPTED, status,
                           f"the run process (pid {status.process.pid}, recorded without a start time) is not the "
                           "one running now; it ended without a final state")
    if alive is False:
        return Reading(RunState.INTERRUPTED, status,
                       f"the run process (pid {status.process.pid}) is gone; it ended without a final state "
                       f"at step {status.step}")
    if alive is None and status.heartbeat is not None and now - status.heartbeat > STALE_HEARTBEAT_S:
        return Reading(RunState.INTERRUPTED, status,
                       f"no heartbeat for {now - status.heartbeat:.0f} s from host {status.process.host}")
    return Reading(status.state, status)


def reconcile(reading: Reading, *, exit_code: int | None = None, detail: str = "") -> Status | None:
    """The status to record for a run whose writer is gone (None when there is nothing to record).

    exit_code: the writer's exit status when the caller started it and saw it end: non-zero is
    recorded as ``failed``, a signal (negative) or 0 without a final state as ``interrupted``.
    Without it, only a run that already reads as interrupted is recorded so. The caller writes
    the result; nothing here touches a file.
    """
    if reading.status.state is not None and reading.status.state in ENDED:
        return None
    if exit_code is None and reading.state is not RunState.INTERRUPTED:
        return None
    state = RunState.FAILED if exit_code is not None and exit_code > 0 else RunState.INTERRUPTED
    reason = reading.reason if reading.state is RunState.INTERRUPTED else ""
    message = "; ".join(m for m in (reason, detail) if m)
    return reading.status.with_changes(state=state, message=message)

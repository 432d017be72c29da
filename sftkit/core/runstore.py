"""The run store: one folder per run, readable by any process at any time.

A run folder holds::

    config.yaml      the RunConfig it ran with
    status.json      state, step, process, heartbeat, message (rewritten atomically)
    metrics.jsonl    one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s, ...
    events.jsonl     started, checkpoint, eval, sample, stopped, finished, failed, resumed, ...
    samples.jsonl    generations from fixed held-out prompts during the run
    run.log          the run process's output
    run.lock         held (an OS lock) by the one process writing the run
    adapter/         the trained adapter (peft.PeftModel.from_pretrained loads it)
    checkpoints/     checkpoint-N folders (complete ones carry a marker file)

What the files mean is the run protocol (``runproto``). The run process writes through one
``RunWriter``; the launcher writes only the folder's first ``pending`` status, the STOP request
and, for a process it started and saw die, ``reconcile``'s verdict. Reading never writes.

JSONL lines are appended whole (short writes are finished or cut back); readers skip a torn
last line. Every other file is written to a temporary name and renamed. Pure Python, no torch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .atomic import write_text_atomic
from .errors import ConfigError
from .paths import cache_dir
from .runproto import (
    ACTIVE_STATES,
    END_STATES,
    HEARTBEAT_S,
    SCHEMA_VERSION,
    Event,
    Metric,
    ProcessId,
    Reading,
    RunState,
    Status,
    check_transition,
    effective_state,
    sample_row,
)

__all__ = ["ACTIVE_STATES", "END_STATES", "CHECKPOINT_MARKER", "RunStateError", "RunBusyError", "RunFolder",
           "RunWriter", "RunStore", "RunSummary", "DeviceLock", "DeviceBusyError", "busy_message", "read_jsonl",
           "append_jsonl"]

CHECKPOINT_MARKER = "sftkit-complete.json"


class RunStateError(ConfigError):
    """The run can't do that in its current state (resume a running run, ...)."""


class RunBusyError(RunStateError):
    """Another process is writing this run."""


def read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete JSON lines from byte ``offset``; returns them and the offset after the last one."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    out = []
    for line in data[: end + 1].splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    return out, offset + end + 1


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one whole line: a short write is finished; on an error (a full
    disk) the file is cut back to where it was, so no torn line is left for the next record."""
    line = (json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        done = 0
        try:
            while done < len(line):
                n = os.write(fd, line[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, f"no progress writing {path}")
                done += n
        except BaseException:
            if done:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    state: str
    step: int
    max_steps: int | None
    final_loss: float | None
    eval_loss: float | None
    started_at: str | None
    seconds: float | None
    message: str

    def row(self) -> dict:
        return {"run": self.name, "state": self.state, "step": self.step, "max_steps": self.max_steps,
                "loss": self.final_loss, "eval_loss": self.eval_loss, "started": self.started_at,
                "seconds": self.seconds}


class RunFolder:
    """One run's folder, read side (views, CLI, launcher). The run process writes with RunWriter."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunFolder) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    # ---- layout ----------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    events_path = property(lambda self: self.path / "events.jsonl")
    samples_path = property(lambda self: self.path / "samples.jsonl")
    log_path = property(lambda self: self.path / "run.log")
    lock_path = property(lambda self: self.path / "run.lock")
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    stop_path = property(lambda self: self.path / "STOP")

    def exists(self) -> bool:
        return self.config_path.is_file()

    # ---- the launcher's writes ------------------------------------------------------------
    def write_launch_status(self, message: str) -> Status:
        """The first ``pending`` of a launch or resume (before the run process exists).

        Refuses while the run is active (checked under the run's lock): a live run's folder is its
        process's alone."""
        lock = RunLock(self)
        lock.acquire()
        try:
            reading = self.reading()
            if reading.state.active and reading.status.state is not None:
                raise RunStateError(f"run {self.name} is {reading.state}; only a run that has ended can be "
                                    "started again")
            old = reading.status
            status = Status(state=RunState.PENDING, message=message, heartbeat=time.time(), step=old.step,
                            max_steps=old.max_steps, attempt=old.attempt, started_at=old.started_at,
                            data_sha256=old.data_sha256, device=old.device, plan=old.plan)
            write_text_atomic(self.status_path, json.dumps(status.to_dict(), indent=1, allow_nan=True))
            return status
        finally:
            lock.release()

    def write_reconciled(self, status: Status, expected: Status) -> bool:
        """Record ``reconcile``'s verdict for a run whose writer is gone, only if the status is still
        ``expected`` (the one the verdict was made on) and no process holds the run's lock: a run
        resumed meanwhile by someone else is left alone. True if written."""
        lock = RunLock(self)
        try:
            lock.acquire()
        except RunBusyError:
            return False
        try:
            if self.status() != expected:
                return False
            write_text_atomic(self.status_path, json.dumps(status.to_dict(), indent=1, allow_nan=True))
            return True
        finally:
            lock.release()

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only metrics (and samples) up to ``last_step``: a resumed run rewrites the rest.

        The files are replaced (a new inode), so a follower notices even if they grow back past
        their old size before its next look."""
        for path in (self.metrics_path, self.samples_path):
            rows, _ = read_jsonl(path)
            kept = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)
                    and r["step"] <= last_step]
            write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    # ---- stop requests ------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        write_text_atomic(self.stop_path, reason)

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self, older_than: float | None = None) -> None:
        """Remove a stop request (only one made before ``older_than``, a time.time(), if given)."""
        try:
            if older_than is None or self.stop_path.stat().st_mtime < older_than:
                self.stop_path.unlink()
        except FileNotFoundError:
            pass

    # ---- reading (never writes) ------------------------------------------------------------
    def read_status(self) -> dict:
        """status.json as it is on disk (a dict; {} when missing or unreadable)."""
        try:
            data = json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def status(self) -> Status:
        return Status.from_dict(self.read_status())

    def _config_age(self) -> float | None:
        try:
            return time.time() - self.config_path.stat().st_mtime
        except OSError:
            return None

    def reading(self, status: Status | None = None) -> Reading:
        """The run's state now (a run whose process died without saying so is ``interrupted``)."""
        status = self.status() if status is None else status
        return effective_state(status, folder_age_s=self._config_age())

    def state(self, status: Status | None = None) -> str:
        if status is None and not self.exists() and not self.status_path.exists():
            return "missing"
        return self.reading(status).state.value

    def is_active(self) -> bool:
        return self.reading().state.active

    def metrics(self) -> list[dict]:
        out = []
        for d in read_jsonl(self.metrics_path)[0]:
            m = Metric.from_dict(d)
            if m is not None:
                out.append(m.row())
        return out

    def events(self) -> list[dict]:
        out = []
        for d in read_jsonl(self.events_path)[0]:
            e = Event.from_dict(d)
            if e is not None:
                out.append({"event": e.kind, "time": e.time, **e.fields})
        return out

    def samples(self) -> list[dict]:
        return [s for s in map(sample_row, read_jsonl(self.samples_path)[0]) if s is not None]

    def config(self):
        from .runconfig import RunConfig

        return RunConfig.load(self.config_path)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a checkpoint cut short by a kill has no marker)."""
        out = []
        if self.checkpoints_dir.is_dir():
            for p in self.checkpoints_dir.iterdir():
                m = re.fullmatch(r"checkpoint-(\d+)", p.name)
                if m and (p / CHECKPOINT_MARKER).is_file():
                    out.append((int(m.group(1)), p))
        return sorted(out)

    def last_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def summary(self) -> RunSummary:
        reading = self.reading()
        status = reading.status
        metrics = self.metrics()
        losses = [m for m in metrics if m.get("loss") is not None]
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        return RunSummary(
            name=self.name, path=self.path, state=reading.state.value, step=status.step,
            max_steps=status.max_steps, final_loss=losses[-1]["loss"] if losses else None,
            eval_loss=evals[-1]["eval_loss"] if evals else None, started_at=status.started_at,
            seconds=status.seconds, message=reading.message)


def _unlock(fd: int | None) -> None:
    """Release an OS file lock taken on ``fd`` and close it (nothing when None)."""
    if fd is not None:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return None


class RunLock:
    """The run's own lock: one process writes a run folder at a time (an OS lock on run.lock,
    gone with the process even after ``kill -9``)."""

    def __init__(self, run: RunFolder):
        self.run = run
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.run.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(f"another process is writing run {self.run.name} ({self.run.path}); "
                               "one process per run") from None
        except OSError as exc:
            os.close(fd)
            raise RunStateError(f"can't lock {self.run.lock_path} ({exc}): the run store's file system does not "
                                "support file locks; put the store on a local disk (RunConfig.store)") from None
        self._fd = fd

    def release(self) -> None:
        self._fd = _unlock(self._fd)


class RunWriter:
    """The run process's one writer of its folder: status (with checked transitions and a
    heartbeat beaten from a thread), metrics, events and samples."""

    def __init__(self, run: RunFolder, *, resume: bool = False, process: ProcessId | None = None):
        self.run = run
        self.process = process or ProcessId.current()
        self._lock = threading.Lock()
        old = run.status()
        attempt = old.attempt + 1 if resume else old.attempt  # followers start over on a new attempt
        base = old if old.state is not None else Status()
        self._status = base.with_changes(process=self.process, attempt=attempt, schema=SCHEMA_VERSION)
        # what the run is now: a dead writer's "running" counts as interrupted, which may resume
        self._state_on_disk = run.reading(old).state if old.state is not None else None
        self._beat_stop: threading.Event | None = None
        self._beat_thread: threading.Thread | None = None

    @property
    def current(self) -> Status:
        return self._status

    def _write(self) -> None:
        status = self._status.with_changes(heartbeat=time.time())
        write_text_atomic(self.run.status_path, json.dumps(status.to_dict(), indent=1, allow_nan=True))
        self._status = status

    def status(self, state: RunState | str | None = None, **fields) -> Status:
        with self._lock:
            if state is not None:
                new = RunState(state)
                check_transition(self._state_on_disk, new)
                fields["state"] = new
            self._status = self._status.with_changes(**fields)
            self._write()
            self._state_on_disk = self._status.state
            return self._status

    def beat(self) -> None:
        with self._lock:
            if self._status.state is not None and self._status.state.active:
                self._write()

    def start_heartbeat(self, interval: float = HEARTBEAT_S) -> None:
        """Beat from a thread, so a long step or checkpoint is not taken for a dead process."""
        if self._beat_thread is not None:
            return
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                try:
                    self.beat()
                except OSError:
                    pass  # a full disk: the next beat tries again

        self._beat_stop = stop
        self._beat_thread = threading.Thread(target=loop, name=f"sftkit-heartbeat-{self.run.name}", daemon=True)
        self._beat_thread.start()

    def stop_heartbeat(self) -> None:
        if self._beat_stop is not None:
            self._beat_stop.set()
            self._beat_thread.join(timeout=5)
            self._beat_stop = self._beat_thread = None

    def metric(self, record: dict) -> None:
        append_jsonl(self.run.metrics_path, {"schema": SCHEMA_VERSION, **record})

    def event(self, kind: str, **fields) -> None:
        e = Event(kind, time.time(), fields)
        if Event.from_dict(e.to_dict()) is None:
            raise ValueError(f"unknown event kind {kind!r}")
        append_jsonl(self.run.events_path, e.to_dict())

    def sample(self, record: dict) -> None:
        append_jsonl(self.run.samples_path, {"schema": SCHEMA_VERSION, **record})


class RunStore:
    """A folder of run folders."""

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def new_run(self, name: str = "run") -> RunFolder:
        """A fresh, empty run folder named ``YYYYMMDD-HHMMSS-<name>``."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = self.root / (f"{stamp}-{safe}" + (f"-{i + 1}" if i else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return RunFolder(path)
        raise RunStateError(f"can't make a new run folder in {self.root}")

    def runs(self) -> list[RunFolder]:
        """Run folders, oldest first."""
        if not self.root.is_dir():
            return []
        return [RunFolder(p) for p in sorted(self.root.iterdir()) if (p / "config.yaml").is_file()]

    def get(self, name: str) -> RunFolder:
        path = Path(name)
        run = RunFolder(path if path.is_absolute() or path.exists() else self.root / name)
        if not run.exists():
            names = [r.name for r in self.runs()]
            raise RunStateError(f"no run {name!r} in {self.root}; runs: {', '.join(names[-10:]) or '(none)'}")
        return run

    def latest(self) -> RunFolder | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def table(self) -> list[dict]:
        return [r.summary().row() for r in self.runs()]

    def remove(self, name: str) -> None:
        """Delete a run folder: only a folder directly inside this store that is an sftkit run
        (its config.yaml loads as a run config) and that is not active."""
        run = self.get(name)
        if run.path.is_symlink() or run.path.resolve().parent != self.root.resolve():
            raise RunStateError(f"{run.path} is not a folder of the store {self.root}; sftkit removes only "
                                "run folders inside the store")
        try:
            run.config()
        except ConfigError as exc:
            raise RunStateError(f"{run.path} is not an sftkit run ({exc}); not removed") from None
        reading = run.reading()
        if reading.state.active:
            raise RunStateError(f"run {run.name} is {reading.state}; stop it before removing it")
        shutil.rmtree(run.path)


# ---- one training run per device ------------------------------------------------------------
class DeviceBusyError(RunStateError):
    """Another run is training on this device."""


class DeviceLock:
    """An exclusive lock per device (``cpu``, ``cuda:0``) held by a run process.

    It is an OS file lock, so it goes away with the process, even after ``kill -9``.
    The lock file names the run holding it, for the refusal message.
    """

    def __init__(self, device: str):
        self.device = device
        self.path = cache_dir() / "locks" / (re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock")
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """Who holds the lock now (None if free)."""
        import fcntl

        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:  # a shared probe: it never makes a holder's exclusive lock fail
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                    return data if isinstance(data, dict) else {}
                except (OSError, json.JSONDecodeError):
                    return {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self, run: RunFolder, attempts: int = 20) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for i in range(attempts):  # a reader's probe holds a shared lock for a moment: retry briefly
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == attempts - 1:
                    os.close(fd)
                    raise DeviceBusyError(busy_message(self.device, self.holder() or {})) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"run": str(run.path), "pid": os.getpid(), "since": time.time()}).encode())
        self._fd = fd

    def release(self) -> None:
        self._fd = _unlock(self._fd)


def busy_message(device: str, holder: dict) -> str:
    where = holder.get("run", "another run")
    pid = holder.get("pid")
    return (f"a run is already training on {device}: {where}" + (f" (pid {pid})" if pid else "") +
            ". One run per device at a time: stop it first (the launcher's Stop button or "
            f"`sftkit stop {where}`), or wait for it to finish.")

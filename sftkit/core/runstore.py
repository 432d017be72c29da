"""The run store: one folder per run, readable by any process at any time.

A run folder holds::

    config.yaml      the RunConfig it ran with
    status.json      state, step, pid, heartbeat, message (rewritten atomically)
    metrics.jsonl    one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s, ...
    events.jsonl     started, checkpoint, eval, sample, stopped, finished, failed, resumed
    samples.jsonl    generations from fixed held-out prompts during the run
    run.log          the run process's output
    adapter/         the trained adapter (peft.PeftModel.from_pretrained loads it)
    checkpoints/     checkpoint-N folders (complete ones carry a marker file)

JSONL lines are appended with one write each; readers skip a torn last line. Every other
file is written to a temporary name and renamed. Pure Python, no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import ConfigError
from .paths import cache_dir

ACTIVE_STATES = ("pending", "running", "stopping")
END_STATES = ("finished", "stopped", "failed", "interrupted")
CHECKPOINT_MARKER = "sftkit-complete.json"
HEARTBEAT_SECONDS = 2.0


class RunStateError(ConfigError):
    """The run can't do that in its current state (resume a running run, ...)."""


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{int(pid)}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
            except json.JSONDecodeError:
                continue
    return out, offset + end + 1


def append_jsonl(path: Path, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
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
    """One run's folder: write side (the run process) and read side (views, CLI)."""

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
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    stop_path = property(lambda self: self.path / "STOP")

    def exists(self) -> bool:
        return self.config_path.is_file()

    # ---- writing (the run process) ------------------------------------------------------
    def write_status(self, **fields) -> dict:
        status = self.read_status()
        status.update(fields)
        status["heartbeat"] = time.time()
        write_text_atomic(self.status_path, json.dumps(status, indent=1, allow_nan=True))
        return status

    def log_metric(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def log_event(self, kind: str, **fields) -> None:
        append_jsonl(self.events_path, {"event": kind, "time": time.time(), **fields})

    def log_sample(self, record: dict) -> None:
        append_jsonl(self.samples_path, record)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only metrics (and samples) up to ``last_step``: a resumed run rewrites the rest."""
        for path in (self.metrics_path, self.samples_path):
            rows, _ = read_jsonl(path)
            kept = [r for r in rows if r.get("step", 0) <= last_step]
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

    # ---- reading --------------------------------------------------------------------
    def read_status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def state(self, status: dict | None = None) -> str:
        """The run's state; a run whose process died without saying so is ``interrupted``.

        status: a status already read (saves reading the file again)."""
        status = self.read_status() if status is None else status
        state = status.get("state", "pending" if self.exists() else "missing")
        if state in ACTIVE_STATES:
            pid = status.get("pid")
            if pid and not _pid_alive(pid):
                return "interrupted"
            if not pid and time.time() - status.get("heartbeat", time.time()) > 120:
                return "interrupted"
        return state

    def is_active(self) -> bool:
        return self.state() in ACTIVE_STATES

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)[0]

    def events(self) -> list[dict]:
        return read_jsonl(self.events_path)[0]

    def samples(self) -> list[dict]:
        return read_jsonl(self.samples_path)[0]

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
        status = self.read_status()
        metrics = self.metrics()
        losses = [m for m in metrics if m.get("loss") is not None]
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        return RunSummary(
            name=self.name, path=self.path, state=self.state(status), step=int(status.get("step") or 0),
            max_steps=status.get("max_steps"), final_loss=losses[-1]["loss"] if losses else None,
            eval_loss=evals[-1]["eval_loss"] if evals else None, started_at=status.get("started_at"),
            seconds=status.get("seconds"), message=status.get("message", ""))


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
        run = self.get(name)
        if run.is_active():
            raise RunStateError(f"run {run.name} is {run.state()}; stop it before removing it")
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
        fd = os.open(self.path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return json.loads(self.path.read_text(encoding="utf-8") or "{}")
                except (OSError, json.JSONDecodeError):
                    return {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self, run: RunFolder) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DeviceBusyError(busy_message(self.device, self.holder() or {})) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"run": str(run.path), "pid": os.getpid(), "since": time.time()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def busy_message(device: str, holder: dict) -> str:
    where = holder.get("run", "another run")
    pid = holder.get("pid")
    return (f"a run is already training on {device}: {where}" + (f" (pid {pid})" if pid else "") +
            ". One run per device at a time: stop it first (the launcher's Stop button or "
            f"`sftkit stop {where}`), or wait for it to finish.")

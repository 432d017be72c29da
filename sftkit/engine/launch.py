"""Start a run as its own process (the same ``sftkit train`` the command line runs).

The notebook kernel only starts the process and follows the run folder, so the kernel stays
responsive, the run survives a browser disconnect or a kernel restart, and the GPU memory
goes back when the process ends. Data, template and rendering errors are raised here, before
any process starts (rows that would train nothing are reported); so is the refusal of a
second run on a busy device and of a resume on changed data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.follow import RunFollower
from ..core.rundata import RowReport, render_rows, rows_fingerprint, run_rows
from ..core.runconfig import RunConfig
from ..core.runopen import check_data_unchanged
from ..core.runproto import RunState, reconcile
from ..core.runstore import DeviceBusyError, DeviceLock, RunFolder, RunStateError, RunStore, busy_message


class RunHandle:
    """A run started (or found) from this process: follow it, stop it, wait for it.

    ``state`` only reads. ``reconcile()`` (called by ``poll``) is the one write a handle makes:
    when the process it started has exited without a final state, it records why."""

    def __init__(self, run: RunFolder, process: subprocess.Popen | None = None, thread=None,
                 reports: tuple[RowReport, ...] = ()):
        self.run = run
        self.process = process
        self.thread = thread  # in-kernel mode: the thread running the job
        self.follower = RunFollower(run)
        self.reports = reports  # what rendering the rows found before the start

    def __repr__(self) -> str:
        return f"RunHandle({self.run.name}, state={self.state})"

    @property
    def state(self) -> str:
        return self.run.state()

    def reconcile(self) -> str:
        """If the process this handle started has exited and the run still reads as active, record
        it: ``failed`` with the end of run.log for a non-zero exit, ``interrupted`` for a signal."""
        if self.process is None or self.process.poll() is None:
            return self.state
        reading = self.run.reading()
        if reading.status.state is None or reading.status.state.ended:
            return reading.state.value
        code = self.process.returncode
        tail = self.run.log_path.read_text(encoding="utf-8", errors="replace")[-600:] \
            if self.run.log_path.exists() else ""
        detail = f"the run process exited (code {code}) without finishing; the end of run.log: {tail.strip()}"
        verdict = reconcile(reading, exit_code=code, detail=detail)
        if verdict is not None:
            self.run.write_reconciled(verdict, reading.status)
        return self.state

    def poll(self):
        self.reconcile()
        return self.follower.poll()

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary; it saves the adapter first."""
        self.run.request_stop("stop requested from the notebook")

    def kill(self) -> None:
        """End the run process now (no adapter saved; the last checkpoint stays loadable).

        Only a process this handle started (its whole session), or, for an attached run, the
        process the status names if its start time still matches: a reused pid is never hit."""
        if self.thread is not None:
            raise RunStateError("an in-kernel run can't be killed; use stop() (or restart the kernel)")
        if self.process is not None:
            if self.process.poll() is None:  # not reaped yet: the pid is still ours
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.process.kill()
            self.process.wait()
            return
        proc = self.run.status().process
        if proc is None or proc.alive() is not True:
            raise RunStateError(f"run {self.run.name} has no live process of its own to kill")
        if proc.pid == os.getpid():
            raise RunStateError("the run is in this kernel; use stop()")
        os.kill(proc.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> str:
        if self.thread is not None:
            self.thread.join(timeout)
            return self.state
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return self.state
            return self.reconcile()
        return self.follower.wait(timeout)


def device_key(cfg: RunConfig) -> str:
    from .models import plan_load

    plan = plan_load(cfg.model.quantization, cfg.model.device, cfg.model.dtype, cfg.model.attn_implementation)
    return "cuda:0" if plan.device == "cuda" else "cpu"


def check_device_free(cfg: RunConfig) -> str:
    key = device_key(cfg)
    holder = DeviceLock(key).holder()
    if holder is not None:
        raise DeviceBusyError(busy_message(key, holder))
    store = RunStore(cfg.store)
    for other in store.runs():
        reading = other.reading()
        if reading.state.active and (reading.status.device or "cpu") == key.split(":")[0]:
            pid = reading.status.process.pid if reading.status.process else None
            raise DeviceBusyError(busy_message(key, {"run": str(other.path), "pid": pid}))
    return key


@dataclass(frozen=True)
class Preflight:
    """What the kernel checked before starting anything."""

    cfg: RunConfig
    fingerprint: str
    reports: tuple[RowReport, ...]

    def lines(self) -> list[str]:
        return [line for r in self.reports for line in r.lines()]


def preflight(cfg: RunConfig) -> Preflight:
    """Load, split and render the rows with the model's tokenizer (no weights): errors name the
    row or field; rows that would train nothing are counted (the run leaves them out); a run
    where no row trains anything is refused."""
    from .models import load_tokenizer

    rows = run_rows(cfg)
    tokenizer = load_tokenizer(cfg.model.spec)
    reports = [render_rows(rows.template, rows.train, tokenizer, split="train")[1]]
    if rows.eval:
        reports.append(render_rows(rows.template, rows.eval, tokenizer, split="eval")[1])
    return Preflight(cfg, rows_fingerprint(rows), tuple(reports))


def _spawn(run: RunFolder, extra: list[str], env: dict | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sftkit", "train", str(run.config_path), "--run-dir", str(run.path), *extra]
    log = open(run.log_path, "ab")
    try:
        child_env = {**os.environ, **(env or {})}
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=child_env, cwd=os.getcwd())
    finally:
        log.close()


def _new_run_folder(cfg: RunConfig, message: str) -> RunFolder:
    run = RunStore(cfg.store).new_run(cfg.name)
    cfg.save(run.config_path)
    run.write_launch_status(message)
    return run


def launch(cfg: RunConfig, *, env: dict | None = None) -> RunHandle:
    """Check the config's data (rendered), template and device, make the run folder, start
    ``sftkit train`` on it."""
    cfg = cfg.with_paths_from(Path.cwd())  # the run folder's config must not depend on a working directory
    checked = preflight(cfg)
    check_device_free(cfg)
    run = _new_run_folder(cfg, "starting the run process")
    return RunHandle(run, _spawn(run, [], env), reports=checked.reports)  # the process writes its own state


def _import_training_stack() -> None:
    """Finish the training stack's imports in this thread: a module imported from two threads
    at once can be seen half-initialised by one of them (the kernel's views import pandas too)."""
    import importlib
    import importlib.util

    for name in ("transformers.trainer", "peft", "pandas", "datasets"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)


def launch_in_kernel(cfg: RunConfig) -> RunHandle:
    """Run in a background thread of this process instead of a process of its own.

    For tiny models and quick experiments: no process start-up, but the run shares the kernel's
    memory and ends with it, and a model trained here should not be one the kernel also uses.
    Same run folder, same Stop, same views.
    """
    import threading

    from .train import run_training

    _import_training_stack()
    cfg = cfg.with_paths_from(Path.cwd())
    checked = preflight(cfg)
    check_device_free(cfg)
    run = _new_run_folder(cfg, "starting the run thread")
    thread = threading.Thread(target=run_training, args=(cfg, run), name=f"sftkit-run-{run.name}", daemon=True)
    thread.start()
    return RunHandle(run, thread=thread, reports=checked.reports)


def resume(run: RunFolder | str | Path, *, env: dict | None = None, max_steps: int | None = None,
           allow_changed_data: bool = False) -> RunHandle:
    """Continue a run that is not active from its last complete checkpoint.

    max_steps: a new total step count (to train a finished run further).
    allow_changed_data: resume even though the rows' content changed since the run started.
    Every check comes before anything is written: a refused resume leaves the run as it was.
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    if not run.exists():
        raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
    reading = run.reading()
    if reading.state.active:
        raise RunStateError(f"run {run.name} is {reading.state}; only a run that has ended can be resumed")
    if run.last_checkpoint() is None:
        raise RunStateError(f"run {run.name} has no complete checkpoint to resume from "
                            "(checkpoints are written every training.checkpoint_every steps)")
    cfg = run.config()
    if max_steps is not None:
        cfg = cfg.with_changes(training={"max_steps": max_steps})
    checked = preflight(cfg)
    check_data_unchanged(run, checked.fingerprint, allow_changed_data=allow_changed_data)
    check_device_free(cfg)
    if max_steps is not None:
        cfg.save(run.config_path)
    run.clear_stop()
    run.write_launch_status("resuming")
    extra = ["--resume"] + (["--allow-changed-data"] if allow_changed_data else [])
    return RunHandle(run, _spawn(run, extra, env), reports=checked.reports)


def attach(run: RunFolder | str | Path) -> RunHandle:
    """Follow a run started elsewhere (another kernel, the command line)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    if not run.exists():
        raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
    return RunHandle(run)


def wait_until(handle: RunHandle, predicate, timeout: float = 60.0, interval: float = 0.2) -> bool:
    """Poll until ``predicate(handle)`` is true or the run ends; True if it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(handle):
            return True
        if RunState(handle.reconcile()).ended:
            return bool(predicate(handle))
        time.sleep(interval)
    return False

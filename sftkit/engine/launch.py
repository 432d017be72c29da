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
from ..core.runconfig import RunConfig
from ..core.rundata import RowReport, render_rows, rows_fingerprint, run_rows
from ..core.runopen import check_data_unchanged
from ..core.runproto import RunState, reconcile
from ..core.runstore import DeviceBusyError, DeviceLock, RunFolder, RunStateError, RunStore, busy_message


class RunHandle:
    """A run started (or found) from this process: follow it, stop it, wait for it.

    ``state`` only reads. ``reconcile()`` (called by ``poll`` and ``wait``) is the one write a
    handle makes: when the process or thread it started has ended without a final state, it
    records why, and only while the status is still the one this handle's launch wrote or its
    own process wrote (a run resumed meanwhile by someone else is left alone)."""

    def __init__(self, run: RunFolder, process: subprocess.Popen | None = None, thread=None,
                 reports: tuple[RowReport, ...] = (), launch_status=None):
        self.run = run
        self.process = process
        self.thread = thread  # in-kernel mode: the thread running the job
        self.error: BaseException | None = None  # in-kernel mode: what ended the thread, if it raised
        self.follower = RunFollower(run)
        self.reports = reports  # what rendering the rows found before the start
        self.launch_status = launch_status  # the pending status this handle's launch wrote

    def __repr__(self) -> str:
        return f"RunHandle({self.run.name}, state={self.state})"

    def _own_child_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def state(self) -> str:
        state = self.run.state()
        if state == "interrupted" and self._own_child_alive():
            return "pending"  # our own process is still starting (slow data): not interrupted
        return state

    def _owns(self, status) -> bool:
        if status.process is None:
            return self.launch_status is not None and status == self.launch_status
        if self.process is not None:
            return status.process.pid == self.process.pid
        return status.mode == "thread" and status.process.pid == os.getpid()

    def reconcile(self) -> str:
        """Record how this handle's process or thread ended, if it ended without saying so."""
        if self.process is not None:
            if self.process.poll() is None:
                return self.state
            code = self.process.returncode
            tail = self.run.log_path.read_text(encoding="utf-8", errors="replace")[-600:] \
                if self.run.log_path.exists() else ""
            detail = f"the run process exited (code {code}) without finishing; the end of run.log: {tail.strip()}"
        elif self.thread is not None:
            if self.thread.is_alive():
                return self.state
            code = 1 if self.error is not None else 0
            detail = (f"the run thread ended without finishing: {type(self.error).__name__}: {self.error}"
                      if self.error is not None else "the run thread ended without finishing")
        else:
            return self.state
        reading = self.run.reading()
        if reading.status.state is None or reading.status.state.ended or not self._owns(reading.status):
            return self.state
        verdict = reconcile(reading, exit_code=code, detail=detail)
        if verdict is not None:
            self.run.write_reconciled(verdict, reading.status)
        return self.state

    def poll(self):
        self.reconcile()
        update = self.follower.poll()
        if update.state == "interrupted" and self._own_child_alive():
            update.state = "pending"
        return update

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary; it saves the adapter first."""
        self.run.request_stop("stop requested from the notebook")

    def kill(self) -> None:
        """End the run process now (no adapter saved; the last checkpoint stays loadable).

        Only a process this handle started (its whole session), or, for an attached run, the
        process the status names when its recorded start time still matches: a reused pid, a
        status without a start time, or a run inside a kernel is never signalled."""
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
        status = self.run.status()
        proc = status.process
        if status.mode == "thread":
            raise RunStateError(f"run {self.run.name} runs inside a notebook kernel; stop it (killing would end "
                                "that kernel)")
        if proc is None or proc.start is None or proc.alive() is not True:
            raise RunStateError(f"run {self.run.name} has no live process of its own to kill (a process is "
                                "killed only when its pid and start time both match the run's)")
        if proc.pid == os.getpid():
            raise RunStateError("the run is in this process; use stop()")
        os.kill(proc.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> str:
        if self.thread is not None:
            self.thread.join(timeout)
            return self.reconcile()
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


def _new_run_folder(cfg: RunConfig, message: str):
    run = RunStore(cfg.store).new_run(cfg.name)
    cfg.save(run.config_path)
    return run, run.write_launch_status(message)


def launch(cfg: RunConfig, *, env: dict | None = None) -> RunHandle:
    """Check the config's data (rendered), template and device, make the run folder, start
    ``sftkit train`` on it."""
    cfg = cfg.with_paths_from(Path.cwd())  # the run folder's config must not depend on a working directory
    checked = preflight(cfg)
    check_device_free(cfg)
    run, launched = _new_run_folder(cfg, "starting the run process")
    return RunHandle(run, _spawn(run, [], env), reports=checked.reports, launch_status=launched)


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
    Same run folder, same Stop, same views. The folder is opened (checked, locked, given its
    first status) here, so every refusal is raised in the notebook.
    """
    import threading

    from ..core.runopen import open_run
    from .train import run_training

    _import_training_stack()
    cfg = cfg.with_paths_from(Path.cwd())
    checked = preflight(cfg)
    check_device_free(cfg)
    opened = open_run(cfg, mode="thread")
    handle = RunHandle(opened.run, reports=checked.reports)

    def target():
        try:
            run_training(opened.cfg, opened.run, opened=opened)
        except BaseException as exc:  # noqa: BLE001 - kept for the handle to record (reconcile)
            handle.error = exc
        finally:
            opened.close()

    handle.thread = threading.Thread(target=target, name=f"sftkit-run-{opened.run.name}", daemon=True)
    handle.thread.start()
    return handle


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
        cfg = cfg.with_changes(training={"max_steps": max_steps})  # saved by the run process, under its lock
    checked = preflight(cfg)
    check_data_unchanged(run, checked.fingerprint, allow_changed_data=allow_changed_data)
    check_device_free(cfg)
    launched = run.write_launch_status("resuming")  # re-checks the state under the run's lock
    run.clear_stop()
    extra = ["--resume"] + (["--allow-changed-data"] if allow_changed_data else []) + \
        (["--max-steps", str(max_steps)] if max_steps is not None else [])
    return RunHandle(run, _spawn(run, extra, env), reports=checked.reports, launch_status=launched)


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

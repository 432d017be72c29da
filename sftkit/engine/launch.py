"""Start a run as its own process (the same ``sftkit train`` the command line runs).

The notebook kernel only starts the process and follows the run folder, so the kernel stays
responsive, the run survives a browser disconnect or a kernel restart, and the GPU memory
goes back when the process ends. Data and template errors are raised here, before any
process starts; so is the refusal of a second run on a busy device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..core.follow import RunFollower
from ..core.rundata import run_rows
from ..core.runconfig import RunConfig
from ..core.runstore import DeviceBusyError, DeviceLock, RunFolder, RunStateError, RunStore, busy_message


class RunHandle:
    """A run started (or found) from this process: follow it, stop it, wait for it."""

    def __init__(self, run: RunFolder, process: subprocess.Popen | None = None, thread=None):
        self.run = run
        self.process = process
        self.thread = thread  # in-kernel mode: the thread running the job
        self.follower = RunFollower(run)

    def __repr__(self) -> str:
        return f"RunHandle({self.run.name}, state={self.state})"

    @property
    def state(self) -> str:
        state = self.run.state()
        if self.process is not None and self.process.poll() is not None and state in ("pending", "running",
                                                                                      "stopping"):
            state = self.run.state()  # it may have written its last status just before exiting
            if state in ("pending", "running", "stopping"):
                tail = self.run.log_path.read_text(encoding="utf-8", errors="replace")[-600:] \
                    if self.run.log_path.exists() else ""
                message = (f"the run process exited (code {self.process.returncode}) without finishing; "
                           f"the end of run.log: {tail.strip()}")
                self.run.write_status(state="failed", message=message)
                state = "failed"
        return state

    def poll(self):
        _ = self.state  # notices a process that died before it could say so
        return self.follower.poll()

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary; it saves the adapter first."""
        self.run.request_stop("stop requested from the notebook")

    def kill(self) -> None:
        """End the process now (no adapter saved; the last checkpoint stays loadable)."""
        if self.thread is not None:
            raise RunStateError("an in-kernel run can't be killed; use stop() (or restart the kernel)")
        pid = self.run.read_status().get("pid") or (self.process.pid if self.process else None)
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.process.wait()

    def wait(self, timeout: float | None = None) -> str:
        if self.thread is not None:
            self.thread.join(timeout)
            return self.state
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return self.state
            return self.state
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
        if other.is_active() and other.read_status().get("device", "cpu") == key.split(":")[0]:
            raise DeviceBusyError(busy_message(key, {"run": str(other.path), "pid": other.read_status().get("pid")}))
    return key


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


def launch(cfg: RunConfig, *, env: dict | None = None) -> RunHandle:
    """Check the config's data and device, make the run folder, start ``sftkit train`` on it."""
    cfg = cfg.with_paths_from(Path.cwd())  # the run folder's config must not depend on a working directory
    run_rows(cfg)  # data / template errors surface here, naming the row or field
    check_device_free(cfg)
    run = RunStore(cfg.store).new_run(cfg.name)
    cfg.save(run.config_path)
    run.write_status(state="pending", message="starting the run process", pid=None)
    return RunHandle(run, _spawn(run, [], env))  # the process writes its own pid and state


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
    run_rows(cfg)
    check_device_free(cfg)
    run = RunStore(cfg.store).new_run(cfg.name)
    cfg.save(run.config_path)
    run.write_status(state="pending", message="starting the run thread", pid=None)
    thread = threading.Thread(target=run_training, args=(cfg, run), name=f"sftkit-run-{run.name}", daemon=True)
    thread.start()
    return RunHandle(run, thread=thread)


def resume(run: RunFolder | str | Path, *, env: dict | None = None, max_steps: int | None = None) -> RunHandle:
    """Continue a run that is not active from its last complete checkpoint.

    max_steps: a new total step count (to train a finished run further).
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    if not run.exists():
        raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
    state = run.state()
    if state in ("pending", "running", "stopping"):
        raise RunStateError(f"run {run.name} is {state}; only a run that has ended can be resumed")
    if run.last_checkpoint() is None:
        raise RunStateError(f"run {run.name} has no complete checkpoint to resume from "
                            "(checkpoints are written every training.checkpoint_every steps)")
    cfg = run.config()
    if max_steps is not None:
        cfg = cfg.with_changes(training={"max_steps": max_steps})
        cfg.save(run.config_path)
    check_device_free(cfg)
    run.clear_stop()
    run.write_status(state="pending", message="resuming", pid=None)
    return RunHandle(run, _spawn(run, ["--resume"], env))


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
        if handle.state in ("finished", "stopped", "failed", "interrupted"):
            return bool(predicate(handle))
        time.sleep(interval)
    return False

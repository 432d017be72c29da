"""Opening a run folder for writing: the run process's first act, before any heavy import.

``open_run`` checks that the process may write the folder, takes the run's lock for the
process's life, saves the config (only after the checks) and writes the first status with the
process's pid + start time. Every refusal happens before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .runconfig import RunConfig
from .rundata import RunRows, rows_fingerprint, run_rows
from .runproto import RunState
from .runstore import RunFolder, RunLock, RunStateError, RunStore, RunWriter


class DataChangedError(RunStateError):
    """A resumed run's data differs from what it trained on."""


@dataclass
class OpenRun:
    run: RunFolder
    lock: RunLock
    writer: RunWriter
    rows: RunRows
    fingerprint: str
    cfg: RunConfig  # the config to train with (a resume's own, with a new max_steps if given)

    def close(self) -> None:
        self.writer.stop_heartbeat()
        self.lock.release()


def _launched_by_launcher(run: RunFolder) -> bool:
    """A folder a launcher made for this process: config + a pending status no process took."""
    status = run.status()
    return status.state is RunState.PENDING and status.process is None


def check_data_unchanged(run: RunFolder, fingerprint: str, *, allow_changed_data: bool = False) -> None:
    recorded = run.status().data_sha256
    if recorded and recorded != fingerprint and not allow_changed_data:
        raise DataChangedError(
            f"run {run.name} trained on different data: the rows' content hash was {recorded[:12]}, now "
            f"{fingerprint[:12]} (data.source {run.config().data.source!r} changed). Resuming would train on "
            "changed data without saying so: restore the data, start a new run, or resume with "
            "allow_changed_data (--allow-changed-data) to accept it.")


# Long on purpose: the checks before the lock and again under it must read together.
def open_run(cfg: RunConfig, run: RunFolder | str | Path | None = None, *, resume: bool = False,
             allow_changed_data: bool = False, max_steps: int | None = None, mode: str = "process") -> OpenRun:
    """Take ``run`` (a new folder in the config's store when None) for this process.

    resume: continue ``run``; ``cfg`` must be the run's own config (``max_steps`` may give a new
    total, saved here under the run's lock once every check has passed).
    mode: "thread" for a run inside the notebook kernel (its process is the kernel's).
    Every refusal comes before anything is written. The config to train with is ``OpenRun.cfg``.
    """
    if run is not None and not isinstance(run, RunFolder):
        run = RunFolder(run)
    if resume:
        if run is None or not run.exists():
            raise RunStateError(f"{run.path if run else '(no folder)'} is not a run folder (no config.yaml); "
                                "--resume continues an existing run")
        own = run.config()
        if cfg.to_dict() != own.to_dict():
            raise RunStateError(f"the config given is not run {run.name}'s own ({run.config_path}): a resume "
                                "continues with the run's settings (only training.max_steps may change, with "
                                "--max-steps); start a new run for other settings")
        if max_steps is not None:
            cfg = own.with_changes(training={"max_steps": max_steps})
    elif run is not None and run.path.exists():
        if run.exists():
            _check_launched(run, cfg)
        elif not run.path.is_dir() or any(run.path.iterdir()):
            raise RunStateError(f"--run-dir {run.path} exists and is not an empty folder; sftkit writes a run only "
                                "into a new or empty folder")
    rows = run_rows(cfg)  # data and template errors name the row or field, before anything is written
    fingerprint = rows_fingerprint(rows)
    if run is None:
        run = RunStore(cfg.store).new_run(cfg.name)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run)
    lock.acquire()
    try:
        # the checks again, now that no other process can change the folder
        reading = run.reading()
        if resume:
            if reading.state.active and not _launched_by_launcher(run):
                raise RunStateError(f"run {run.name} is {reading.state}; only a run that has ended can be resumed")
            if run.last_checkpoint() is None:
                raise RunStateError(f"run {run.name} has no complete checkpoint to resume from "
                                    "(checkpoints are written every training.checkpoint_every steps)")
            check_data_unchanged(run, fingerprint, allow_changed_data=allow_changed_data)
        elif run.exists():
            _check_launched(run, cfg)
        elif any(p.name != run.lock_path.name for p in run.path.iterdir()):
            raise RunStateError(f"--run-dir {run.path} is no longer empty; sftkit writes a run only into a new or "
                                "empty folder")
        if not run.exists() or (resume and max_steps is not None):
            cfg.save(run.config_path)
        writer = RunWriter(run, resume=resume)
        fields = dict(message="loading the model", step=writer.current.step if resume else 0, mode=mode)
        if not resume:
            fields.update(started_at=datetime.now().isoformat(timespec="seconds"), data_sha256=fingerprint)
        elif writer.current.data_sha256 != fingerprint:
            fields["data_sha256"] = fingerprint
        writer.status(RunState.PENDING, **fields)
        writer.start_heartbeat()
    except BaseException:
        lock.release()
        raise
    return OpenRun(run, lock, writer, rows, fingerprint, cfg)


def _check_launched(run: RunFolder, cfg: RunConfig) -> None:
    """A new run may use an existing folder only if a launcher made it for this config."""
    if not _launched_by_launcher(run):
        raise RunStateError(
            f"{run.path} already holds run {run.name} ({run.state()}); continue it with --resume, or "
            "give a new folder: sftkit never trains one config into another run's folder")
    if run.config().to_dict() != cfg.to_dict():
        raise RunStateError(f"{run.path} holds another config than the one given; continue it with "
                            "--resume, or give a new folder")

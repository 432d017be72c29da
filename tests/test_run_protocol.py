"""The run protocol on real folders, without models: states and transitions, liveness by pid +
start time, folders that never got a status, a heartbeat from a thread, whole JSONL lines on a
full disk, a follower that sees a replaced file, refusals that write nothing, safe removal."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sftkit.core import runstore
from sftkit.core.examples import example_config
from sftkit.core.follow import RunFollower
from sftkit.core.runopen import DataChangedError, open_run
from sftkit.core.runproto import (
    START_GRACE_S,
    ProcessId,
    ProtocolError,
    RunState,
    Status,
    check_transition,
    effective_state,
    reconcile,
)
from sftkit.core.runstore import CHECKPOINT_MARKER, RunBusyError, RunFolder, RunLock, RunStateError, RunStore, RunWriter

from helpers import make_run


def dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_transitions_are_checked():
    check_transition(None, RunState.PENDING)
    check_transition(RunState.RUNNING, RunState.FINISHED)
    check_transition(RunState.FINISHED, RunState.PENDING)  # a resume
    for old, new in ((RunState.FINISHED, RunState.RUNNING), (RunState.FAILED, RunState.FINISHED),
                     (None, RunState.RUNNING), (RunState.STOPPING, RunState.RUNNING)):
        with pytest.raises(ProtocolError):
            check_transition(old, new)


def test_a_reused_pid_is_not_the_run_process(tmp_path):
    run = make_run(tmp_path)
    me = ProcessId.current()
    writer = RunWriter(run, process=me)
    writer.status("pending")
    writer.status("running")
    assert run.state() == "running"
    # the same pid, another start time: the pid was reused by an unrelated process
    reused = RunWriter(make_run(tmp_path, "reused"), process=ProcessId(me.pid, me.start - 1000.0, me.host))
    reused.status("pending")
    reused.status("running")
    assert reused.run.state() == "interrupted"
    assert "is gone" in reused.run.reading().message
    gone = RunWriter(make_run(tmp_path, "gone"), process=ProcessId(dead_pid(), None, me.host))
    gone.status("pending")
    assert gone.run.state() == "interrupted"
    # a writer on another host: its heartbeat decides
    far = Status(state=RunState.RUNNING, process=ProcessId(1, 1.0, "another-host"), heartbeat=time.time())
    assert effective_state(far, folder_age_s=10).state is RunState.RUNNING
    stale = far.with_changes(heartbeat=time.time() - 10_000)
    assert effective_state(stale, folder_age_s=10).state is RunState.INTERRUPTED


def test_a_folder_without_status_is_interrupted_after_the_grace_period(tmp_path):
    run = make_run(tmp_path)  # config.yaml and nothing else: `sftkit train` cut short before its first status
    assert run.state() == "pending"
    old = time.time() - START_GRACE_S - 5
    os.utime(run.config_path, (old, old))
    assert run.state() == "interrupted" and not run.is_active()
    # an empty status.json is the same
    run.status_path.write_text("")
    assert run.state() == "interrupted"
    # a launcher's pending that no process took over
    launched = make_run(tmp_path, "launched")
    launched.write_launch_status("starting the run process")
    assert launched.state() == "pending"
    data = json.loads(launched.status_path.read_text())
    data["heartbeat"] -= START_GRACE_S + 5
    launched.status_path.write_text(json.dumps(data))
    assert launched.state() == "interrupted"
    # such a folder no longer blocks the device for later runs
    from sftkit.engine.launch import check_device_free

    check_device_free(example_config().with_changes(store=str(tmp_path / "runs")))


def test_reading_never_writes(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run, process=ProcessId(dead_pid(), None, socket.gethostname()))
    writer.status("pending")
    writer.status("running", step=3)
    before = snapshot(run.path)
    assert run.state() == "interrupted"
    run.summary(), run.metrics(), run.events(), RunFollower(run).poll(), RunStore(run.path.parent).table()
    assert snapshot(run.path) == before
    # reconcile says what to record; the caller decides to write it
    reading = run.reading()
    verdict = reconcile(reading)
    assert verdict.state is RunState.INTERRUPTED and "gone" in verdict.message and verdict.step == 3
    assert reconcile(reading, exit_code=1, detail="exit 1").state is RunState.FAILED
    assert snapshot(run.path) == before
    assert run.write_reconciled(verdict, reading.status) and run.state() == "interrupted"
    assert not run.write_reconciled(verdict, reading.status)  # the status is no longer what was judged


def test_heartbeat_beats_from_a_thread(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    first = run.status().heartbeat
    writer.start_heartbeat(interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while run.status().heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.status().heartbeat > first  # no status call in between: the thread beat
    finally:
        writer.stop_heartbeat()


def test_writer_refuses_a_transition_the_protocol_does_not_allow(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    writer.status("running")
    writer.status("finished")
    with pytest.raises(ProtocolError):
        writer.status("running")
    assert run.state() == "finished"


def test_a_short_write_is_finished_and_a_failed_one_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    runstore.append_jsonl(path, {"step": 1})
    real_write = os.write
    calls = []

    def short_then(fail: bool):
        def write(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, data[: len(data) // 2])  # the disk took half the line
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)
        return write

    monkeypatch.setattr(runstore.os, "write", short_then(fail=False))
    runstore.append_jsonl(path, {"step": 2, "loss": 0.5})
    calls.clear()
    monkeypatch.setattr(runstore.os, "write", short_then(fail=True))
    with pytest.raises(OSError):
        runstore.append_jsonl(path, {"step": 3, "loss": 0.25})
    monkeypatch.setattr(runstore.os, "write", real_write)
    runstore.append_jsonl(path, {"step": 4})
    rows, _ = runstore.read_jsonl(path)
    assert rows == [{"step": 1}, {"step": 2, "loss": 0.5}, {"step": 4}]
    assert path.read_bytes().count(b"\n") == 3


def test_follower_sees_a_replaced_file_even_when_it_grew_past_the_old_size(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    for step in range(1, 4):
        writer.metric({"step": step, "loss": 1.0})
    follower = RunFollower(run)
    assert [m["step"] for m in follower.poll().metrics] == [1, 2, 3]
    # a resume from step 1 replaces the file; the new process appends past the old size before the next look
    run.truncate_metrics(1)
    for step in range(2, 9):
        writer.metric({"step": step, "loss": 0.5})
    update = follower.poll()
    assert update.rewound
    assert [m["step"] for m in update.metrics] == list(range(1, 9))
    assert [m["loss"] for m in update.metrics][1:] == [0.5] * 7
    # a new attempt in the status is a rewind too
    RunWriter(run, resume=True).status("pending")
    assert follower.poll().rewound and not follower.poll().rewound


def test_follower_polled_from_two_threads_yields_each_row_once(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    follower = RunFollower(run)
    seen: list[int] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            seen.extend(m["step"] for m in follower.poll().metrics)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for t in threads:
        t.start()
    for step in range(300):
        writer.metric({"step": step, "loss": 1.0})
    done.set()
    for t in threads:
        t.join()
    seen.extend(m["step"] for m in follower.poll().metrics)
    assert sorted(seen) == list(range(300))


def test_open_run_refuses_without_writing(tmp_path):
    store = tmp_path / "runs"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(10)))
    cfg = example_config().with_changes(store=str(store), data={"source": str(data), "rows": None},
                                        template={"user_pattern": "{q}", "answer_field": "a"})
    first = open_run(cfg)
    run = first.run
    # a live run's folder can't be taken by another process, nor trained into with another config
    with pytest.raises(RunBusyError):
        RunLock(run).acquire()
    before = snapshot(run.path)
    other = cfg.with_changes(training={"learning_rate": 1e-5})
    with pytest.raises(RunStateError, match="already holds run"):
        open_run(other, run)
    with pytest.raises(RunStateError):
        open_run(cfg, run, resume=True)
    assert snapshot(run.path) == before
    first.writer.status("running")
    (run.checkpoints_dir / "checkpoint-2").mkdir(parents=True)
    (run.checkpoints_dir / "checkpoint-2" / CHECKPOINT_MARKER).write_text("{}")
    first.writer.status("stopped")
    first.close()
    # changed data: the resume is refused and nothing is written
    data.write_text(data.read_text().replace("answer 3", "changed"))
    before = snapshot(run.path)
    with pytest.raises(DataChangedError, match="different data"):
        open_run(cfg, run, resume=True)
    assert snapshot(run.path) == before
    again = open_run(cfg, run, resume=True, allow_changed_data=True)
    assert again.writer.current.attempt == 1 and run.status().data_sha256 == again.fingerprint
    again.close()
    # a folder of the user's: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RunStateError, match="not an empty folder"):
        open_run(cfg, RunFolder(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_store_removes_only_its_own_ended_runs(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    with pytest.raises(RunStateError, match="stop it"):
        store.remove(run.name)
    writer.status("failed")
    # a folder outside the store, reached by a path, is not the store's to delete
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.yaml").write_text(run.config_path.read_text())
    with pytest.raises(RunStateError, match="not a folder of the store"):
        store.remove(str(outside))
    link = store.root / "link"
    link.symlink_to(outside)
    with pytest.raises(RunStateError, match="not a folder of the store"):
        store.remove("link")
    not_a_run = store.root / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "config.yaml").write_text("just: some yaml of mine\n")
    with pytest.raises(RunStateError, match="not an sftkit run"):
        store.remove("not-a-run")
    assert (outside / "config.yaml").exists() and (not_a_run / "config.yaml").exists()
    store.remove(run.name)
    assert not run.path.exists()

"""Faults at named moments, on tiny real models through the real run process: kill -9 at each
checkpoint phase, non-finite values between logging steps, rows that train nothing, Stop and
device locks under two processes, a second process on a live run, merge into an existing
folder, kill only what is ours, a failing sample generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftkit.core.runproto import ProcessId
from sftkit.core.runstore import CHECKPOINT_MARKER, DeviceLock, RunFolder, RunLock, RunStateError, RunStore, RunWriter

from helpers import losses, make_run, tiny_config, wait_for

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "trainer_state.json")


def assert_loadable(run: RunFolder):
    """Every marked checkpoint has all its files; the last one exists."""
    found = run.checkpoints()
    assert found, "no complete checkpoint left"
    for step, path in found:
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        assert not missing, f"{path.name} is marked complete but lacks {missing}"
        assert json.loads((path / "trainer_state.json").read_text())["global_step"] == step
    return found[-1]


@pytest.mark.parametrize("phase", ["checkpoint_saved@4", "checkpoint_marked@4", "rotation_unmarked@2",
                                   "rotation_partial@2"])
def test_kill_9_at_each_checkpoint_phase_leaves_the_last_checkpoint_loadable(phase, tiny_llama_dir, tmp_path,
                                                                               cache):  # noqa: F811
    from sftkit.engine.launch import launch
    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=6, eval_every=0, sample_every=0,
                      checkpoint_every=2, keep_checkpoints=1)
    ready = tmp_path / "ready"
    handle = launch(cfg, env={"SFTKIT_FAULT_PAUSE_AT": phase, "SFTKIT_FAULT_READY": str(ready)})
    wait_for(ready.exists, what=f"the run to reach {phase}")
    handle.kill()
    run = handle.run
    # the device policy was decided once, by the run process, and its status carries it
    assert run.status().device == "cpu" and run.status().plan.startswith("CPU")
    assert run.state() == "interrupted"
    step, _ = assert_loadable(run)
    assert step == (2 if phase == "checkpoint_saved@4" else 4)
    # resume continues from it and finishes (it also clears what the kill left half done)
    result = run_training(cfg, run, resume=True)
    assert result.state == "finished", run.read_status()
    assert sorted(losses(run)) == list(range(1, 7))
    assert [s for s, _ in run.checkpoints()] == [6] and assert_loadable(run)[0] == 6
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-6"]


def test_a_non_finite_update_between_logging_steps_is_never_checkpointed(tiny_llama_dir, tmp_path):
    from sftkit.engine.train import run_training

    os.environ["SFTKIT_FAULT_NAN_AT_STEP"] = "3"
    try:
        cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=8, eval_every=0, sample_every=0,
                          checkpoint_every=1, keep_checkpoints=8, logging_every=5, max_grad_norm=0.0)
        result = run_training(cfg)
    finally:
        del os.environ["SFTKIT_FAULT_NAN_AT_STEP"]
    run = result.run
    assert result.state == "failed"
    assert "non-finite (NaN or inf) at step 3" in result.message and "checkpoint-2" in result.message
    assert [s for s, _ in run.checkpoints()] == [1, 2]
    assert not (run.checkpoints_dir / "checkpoint-3" / CHECKPOINT_MARKER).exists()


def test_rows_that_train_nothing_are_reported_and_left_out(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.core.data import DataError
    from sftkit.engine.launch import launch, preflight
    from sftkit.engine.train import run_training

    rows = [{"q": f"what is {i} plus {i}?", "a": str(2 * i)} for i in range(12)]
    for i in (1, 4):
        rows[i]["q"] = "long question " * 60  # the prompt alone fills max_length
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0, sample_every=0).with_changes(
        data={"source": str(data), "rows": None, "eval_fraction": 0.0},
        template={"user_pattern": "{q}", "answer_field": "a", "max_length": 64})
    checked = preflight(cfg)
    train = checked.reports[0]
    assert len(train.dropped) == 2 and train.n_kept == 10
    assert any("zero trained tokens" in line for line in checked.lines())
    result = run_training(cfg)
    assert result.state == "finished", result.message
    dropped = [e for e in result.run.events() if e["event"] == "rows_dropped"]
    assert len(dropped) == 1 and len(dropped[0]["dropped"]) == 2
    assert all(m["loss"] == m["loss"] for m in result.run.metrics() if "loss" in m)  # no 0/0 NaN
    # nothing trained at all: refused in the kernel, before any folder or process
    nothing = cfg.with_changes(template={"user_pattern": "long question " * 60 + "{q}", "answer_field": "a",
                                         "max_length": 64}, store=str(tmp_path / "other"))
    with pytest.raises(DataError, match="no train row has a trained token"):
        launch(nothing)
    assert not (tmp_path / "other").exists()


def test_stop_is_agreed_and_the_device_locked_under_two_processes(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=0, sample_every=0,
                      checkpoint_every=100000)
    path = cfg.save(tmp_path / "run.yaml")
    # only rank 1 sees a Stop, at step 3: without agreement it leaves and rank 0 waits for ever
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "SFTKIT_FAULT_STOP_RANK": "1@3"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "sftkit", "train", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            start_new_session=True)
    try:
        # the lock is taken before the model loads and held to the end; the tiny model's three steps take
        # milliseconds, so the check is made while the run is still before or at its first steps
        def locked_by_the_run():
            runs = RunStore(tmp_path / "runs")
            holder = DeviceLock("cpu").holder()
            return bool(runs.runs()) and holder is not None and holder["run"] == str(runs.latest().path)

        wait_for(locked_by_the_run, timeout=240, what="the device lock held by the run under two processes")
        run = RunStore(tmp_path / "runs").latest()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert run.state() == "stopped" and run.status().world_size == 2 and run.has_adapter()
    assert run.status().step == 3 and max(losses(run)) == 3
    assert DeviceLock("cpu").holder() is None


def test_a_second_process_never_writes_into_a_live_run(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs")
    live = RunStore(tmp_path / "runs").new_run("live")
    cfg.save(live.config_path)
    lock = RunLock(live)  # this test process plays the live run: it holds the run's lock
    lock.acquire()
    writer = RunWriter(live)
    writer.status("pending")
    writer.status("running", step=3)
    before = {p.name: p.read_bytes() for p in live.path.iterdir() if p.is_file()}
    other = cfg.with_changes(training={"learning_rate": 1e-5}).save(tmp_path / "other.yaml")
    for extra in ([str(other)], [str(live.config_path)], ["--resume"]):
        out = subprocess.run([sys.executable, "-m", "sftkit", "train", *extra, "--run-dir", str(live.path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "error:" in out.stderr, out.stdout + out.stderr
    assert {p.name: p.read_bytes() for p in live.path.iterdir() if p.is_file()} == before
    assert live.state() == "running"
    lock.release()


def test_resume_refused_on_a_busy_device_leaves_the_config_alone(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.core.runstore import DeviceBusyError
    from sftkit.engine.launch import resume
    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0, sample_every=0)
    run = run_training(cfg).run
    before = run.config_path.read_bytes(), run.status_path.read_bytes()
    busy = DeviceLock("cpu")
    busy.acquire(RunFolder(tmp_path / "someone-else"))
    try:
        with pytest.raises(DeviceBusyError):
            resume(run, max_steps=10)
    finally:
        busy.release()
    assert (run.config_path.read_bytes(), run.status_path.read_bytes()) == before


def test_merge_never_replaces_a_folder_it_did_not_write(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.engine.output import MERGE_MARKER, merge_and_save
    from sftkit.engine.train import run_training

    run = run_training(tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0,
                                   sample_every=0)).run
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "thesis.tex").write_text("years of work")
    with pytest.raises(RunStateError, match="non-empty folder that sftkit did not write"):
        merge_and_save(run, projects)
    out = subprocess.run([sys.executable, "-m", "sftkit", "merge", str(run.path), str(projects)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "did not write" in out.stderr
    assert [p.name for p in projects.iterdir()] == ["thesis.tex"]
    for inside in (run.path, run.adapter_dir, run.path.parent):
        with pytest.raises(RunStateError, match="run folder"):
            merge_and_save(run, inside, force=True)
    assert run.has_adapter()
    merged = merge_and_save(run, tmp_path / "merged")
    assert (merged / MERGE_MARKER).is_file() and list(merged.glob("*.safetensors"))
    merge_and_save(run, merged)  # an earlier merge's output is replaced whole
    (merged / "eval-results.txt").write_text("the user's, added after the merge")
    with pytest.raises(RunStateError, match="eval-results.txt"):
        merge_and_save(run, merged)
    assert (merged / "eval-results.txt").exists()
    for never in (Path.home(), Path.cwd(), Path("/")):
        with pytest.raises(RunStateError, match="give a folder of its own"):
            merge_and_save(run, never, force=True)
    merge_and_save(run, projects, force=True)
    assert not (projects / "thesis.tex").exists() and (projects / MERGE_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and "merg" in p.name]


def test_kill_only_hits_the_run_process(tmp_path):
    from sftkit.engine.launch import RunHandle

    # a status naming a live process whose start time is not the recorded one: a reused pid
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = make_run(tmp_path)
        me = ProcessId.of(bystander.pid)
        writer = RunWriter(run, process=ProcessId(me.pid, me.start - 500.0, me.host))
        writer.status("pending")
        with pytest.raises(RunStateError, match="no live process"):
            RunHandle(run).kill()
        assert bystander.poll() is None
        # an in-kernel run names this very process: refused
        RunWriter(make_run(tmp_path, "here")).status("pending")
        with pytest.raises(RunStateError):
            RunHandle(RunFolder(tmp_path / "runs" / "here")).kill()
    finally:
        bystander.kill()
        bystander.wait()
    # a handle's own process is killed with its whole session (the child it started too)
    run = make_run(tmp_path, "own")
    pidfile = tmp_path / "grandchild"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the grandchild")
    grandchild = int(pidfile.read_text())
    RunHandle(run, process=proc).kill()
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: ProcessId(grandchild, None, ProcessId.current().host).alive() is not True,
             what="the grandchild to be gone")


def test_a_failing_sample_generation_is_an_event_and_the_run_goes_on(tiny_llama_dir, tmp_path):
    from sftkit.engine.train import run_training

    os.environ["SFTKIT_FAULT_RAISE_AT"] = "sample"
    try:
        result = run_training(tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=4, sample_every=2,
                                          eval_every=0))
    finally:
        del os.environ["SFTKIT_FAULT_RAISE_AT"]
    assert result.state == "finished", result.message
    failed = [e for e in result.run.events() if e["event"] == "sample_failed"]
    assert [e["step"] for e in failed] == [2, 4] and "fault injected" in failed[0]["message"]
    assert sorted(losses(result.run)) == [1, 2, 3, 4]


def test_resume_never_trains_another_config_into_a_run(tiny_llama_dir, tmp_path):
    from sftkit.core.runopen import open_run
    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0, sample_every=0,
                      checkpoint_every=2)
    run = run_training(cfg).run
    before = run.config_path.read_bytes(), run.status_path.read_bytes()
    other = cfg.with_changes(training={"learning_rate": 0.5})
    with pytest.raises(RunStateError, match="not run .* own"):
        open_run(other, run, resume=True)
    out = subprocess.run([sys.executable, "-m", "sftkit", "train", str(other.save(tmp_path / "other.yaml")),
                          "--run-dir", str(run.path), "--resume"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "own" in out.stderr
    assert (run.config_path.read_bytes(), run.status_path.read_bytes()) == before
    # a new total step count is the one change a resume takes; saved once every check passed
    result = run_training(run.config(), run, resume=True, max_steps=4)
    assert result.state == "finished" and run.config().training.max_steps == 4
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_a_handle_never_records_over_a_run_someone_else_resumed(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.engine.launch import RunHandle, launch

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0, sample_every=0,
                      checkpoint_every=2)
    handle = launch(cfg, env={"PYTHONHOME": str(tmp_path / "nowhere")})  # its process can't even start
    handle.process.wait(60)
    run = handle.run
    # before this handle looks, the grace period passes (the run reads interrupted) and another
    # kernel resumes it: its launcher's pending status
    stale = json.loads(run.status_path.read_text())
    stale["heartbeat"] -= 1000
    run.status_path.write_text(json.dumps(stale))
    assert run.state() == "interrupted"
    other = run.write_launch_status("resuming")
    assert handle.reconcile() == "pending" and run.status() == other
    # its own launch, seen in time, is recorded with the log
    again = launch(cfg.with_changes(name="again", store=str(tmp_path / "other")), env={"PYTHONHOME": str(tmp_path / "nowhere")})
    assert again.wait(60) == "failed" and "exited (code" in again.run.status().message
    assert isinstance(again, RunHandle)


def test_an_old_pid_only_status_is_not_trusted(tmp_path):
    """Run folders from before the protocol name a pid alone: a reused pid must not pass for the run."""
    from sftkit.engine.launch import RunHandle, check_device_free

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = make_run(tmp_path)
        run.status_path.write_text(json.dumps({"state": "running", "pid": bystander.pid,
                                               "heartbeat": time.time() - 90 * 86400, "device": "cpu"}))
        assert run.state() == "interrupted"
        check_device_free(run.config())  # no longer blocks the device
        with pytest.raises(RunStateError):
            RunHandle(run).kill()
        fresh = json.loads(run.status_path.read_text())
        fresh["heartbeat"] = time.time() - 2  # the bystander started before this beat: could be the run
        run.status_path.write_text(json.dumps(fresh))
        with pytest.raises(RunStateError, match="start time"):
            RunHandle(run).kill()  # no start time recorded: never signalled
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_an_in_kernel_run_whose_thread_dies_is_recorded_and_never_killed(tmp_path):
    """A run thread that dies without a final state (an error that escaped the job) is recorded by
    its handle with the error; an attached handle refuses to kill the kernel it runs in."""
    import threading

    from sftkit.engine.launch import RunHandle

    run = make_run(tmp_path)
    writer = RunWriter(run)

    ready, go = threading.Event(), threading.Event()

    def job():
        writer.status("pending", mode="thread")
        writer.status("running", step=2)
        ready.set()
        go.wait(30)
        raise MemoryError("the kernel ran out of memory")

    handle = RunHandle(run)
    handle.thread = threading.Thread(target=lambda: _keep_error(handle, job))
    handle.thread.start()
    assert ready.wait(30)
    with pytest.raises(RunStateError, match="inside a notebook kernel"):
        RunHandle(run).kill()
    go.set()
    assert handle.wait(30) == "failed"
    status = run.status()
    assert "MemoryError: the kernel ran out of memory" in status.message and status.step == 2


def _keep_error(handle, job):
    try:
        job()
    except BaseException as exc:  # noqa: BLE001 - what launch_in_kernel's thread does
        handle.error = exc

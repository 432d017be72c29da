"""RunMonitor and RunControl without any widget: following a run folder (curves, progress, ETA,
rewinds), and the config a Start would run."""

import json
import subprocess
import sys

import pytest

from sftkit.core.errors import SftkitError
from sftkit.core.examples import example_config
from sftkit.core.runstore import RunWriter
from sftkit.engine.launch import attach
from sftkit.state.run_monitor import RunControl, RunMonitor, format_eta, progress_of

from helpers import make_run


def test_progress_and_eta_from_timed_lines():
    metrics = [{"step": s, "loss": 1.0, "steps_per_s": 0.5} for s in range(1, 11)]
    p = progress_of(10, 40, metrics, active=True)
    assert p.seconds_per_step == pytest.approx(2.0) and p.eta_seconds == pytest.approx(60.0)
    assert p.label == "step 10/40 · 2.00 s/step · ETA 1m 00s"
    assert progress_of(10, 40, metrics, active=False).eta_seconds is None  # an ended run has no ETA
    assert progress_of(3, 0, [], active=True).label == "step 3"
    assert format_eta(3725) == "1h 02m"


def test_monitor_follows_a_run_and_starts_over_on_a_rewind(tmp_path):
    run = make_run(tmp_path)
    writer = RunWriter(run)  # this test plays the run process
    writer.status("pending")
    writer.status("running", step=3, max_steps=10)
    for step in (1, 2, 3):
        writer.metric({"step": step, "loss": 1.0 / step, "steps_per_s": 1.0, "memory_rss": 2**20})
    monitor = RunMonitor(attach(run.path))
    change = monitor.refresh()
    assert change.data and change.state == "running" and monitor.active
    x, y = monitor.curves()[0]
    assert x.tolist() == [1.0, 2.0, 3.0] and y.tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert monitor.curves()[5][1].tolist() == [1.0, 1.0, 1.0]  # memory in MiB
    assert monitor.progress().label.startswith("step 3/10")
    assert not monitor.refresh().data  # nothing new
    assert monitor.batching == ""
    writer.event("batching", packing=True, padding_share=0.6, message="packing: on (auto): <60%> padding",
                 fast_loss=True, loss="the head at trained positions", max_pass_tokens=512)
    monitor.refresh()
    assert monitor.batching == ("packing: on (auto): <60%> padding; loss: the head at trained positions; "
                                "passes of at most 512 tokens")
    writer.event("warning", message="resumed in <b>another</b> precision")
    monitor.refresh()
    assert monitor.warnings == ["resumed in <b>another</b> precision"]
    # a resume from step 1 replaces the curves: the monitor starts over
    run.truncate_metrics(1)
    writer.metric({"step": 2, "loss": 0.25})
    change = monitor.refresh()
    assert change.rewound and [m["step"] for m in monitor.metrics] == [1, 2]
    writer.status("finished", step=2)
    assert monitor.refresh().state == "finished" and not monitor.active


def test_monitor_counts_errors_and_keeps_going(tmp_path):
    run = make_run(tmp_path)
    RunWriter(run).status("pending")
    run.metrics_path.mkdir()
    monitor = RunMonitor(attach(run.path))
    assert monitor.safe_refresh() is None and monitor.errors == 1
    assert isinstance(monitor.last_error, IsADirectoryError)
    run.metrics_path.rmdir()
    assert monitor.safe_refresh() is not None and monitor.errors == 1


def test_control_applies_knobs_and_writes_notebook_rows_to_the_store(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    control = RunControl.create(example_config().with_changes(store=str(tmp_path / "runs")), data=rows,
                                template={"user_pattern": "{question}", "answer_field": "answer"})
    control.knobs = {"name": "mine", "training.max_steps": 5, "training.learning_rate": 3e-4}
    cfg = control.config
    assert (cfg.name, cfg.training.max_steps, cfg.training.learning_rate) == ("mine", 5, 3e-4)
    launched = control.config_for_launch()
    path = launched.data.source
    assert path.startswith(str(tmp_path / "runs" / "data")) and [json.loads(x) for x in open(path)] == rows
    assert control.config_for_launch().data.source == path  # content-addressed: the same rows, the same file
    control.knobs = {"training.batch_size": 0}
    with pytest.raises(SftkitError, match="training.batch_size=0"):
        control.config


def test_export_never_overwrites_a_file_it_did_not_write(tmp_path):
    control = RunControl.create(example_config().with_changes(store=str(tmp_path / "runs")))
    mine = tmp_path / "notes.yaml"
    mine.write_text("my: own notes\n")
    with pytest.raises(SftkitError, match="not a run config"):
        control.export_yaml(mine)
    assert mine.read_text() == "my: own notes\n"
    out = control.export_yaml(tmp_path / "run.yaml")
    assert control.export_yaml(out) == out  # an earlier export is replaced


def test_state_modules_import_no_widgets():
    code = ("import sys; import sftkit.state.run_monitor, sftkit.state.plan_editor, sftkit.state.prompt_draft; "
            "print(sorted(m for m in ('ipywidgets', 'plotly', 'sftkit.ui') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_run_view_shows_the_runs_warnings_escaped_as_they_come(tmp_path):
    from sftkit.ui.run_view import RunView

    run = make_run(tmp_path)
    writer = RunWriter(run)
    writer.status("pending")
    writer.status("running", step=1, max_steps=2)
    writer.event("warning", message="the frozen weights are now <i>float32</i>")
    view = RunView(poll_s=60)
    view.follow(attach(run.path))
    assert "&#9888; the frozen weights are now &lt;i&gt;float32&lt;/i&gt;" in view.message.value
    writer.event("warning", message="a second one")
    view.refresh(force=True)
    assert view.message.value.count("&#9888;") == 2 and "a second one" in view.message.value
    if view._poller is not None:
        view._poller.stop()

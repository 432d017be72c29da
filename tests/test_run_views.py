"""RunLauncher and RunHistory headless: click the buttons, watch the traces grow."""


import numpy as np

from sftkit.core.runstore import RunStore, append_jsonl
from sftkit.ui import run_figures

from helpers import tiny_config, wait_for


def test_curve_arrays_and_figures_are_pure():
    metrics = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "memory_rss": 2**21},
               {"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 110.0, "memory_rss": 2**21},
               {"step": 2, "eval_loss": 1.7}]
    arrays = run_figures.curve_arrays(metrics)
    assert [len(x) for x, _ in arrays] == [2, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0]  # no preference curves in an sft run
    assert arrays[5][1].tolist() == [2.0, 2.0]  # memory in MiB
    assert all(isinstance(x, np.ndarray) for x, _ in arrays)
    fig = run_figures.run_figure(metrics, title="t")
    assert [t.name for t in fig.data] == [c[0] for c in run_figures.CURVES]
    assert "<td>1.5000</td>" in run_figures.metrics_table_html(metrics)
    html = run_figures.samples_html([{"step": 4, "prompt": "p", "target": "x", "output": "x"},
                                     {"step": 4, "prompt": "q", "target": "y", "output": "z"}])
    assert html.count("#047857") == 1 and html.count("#b91c1c") == 1


def test_launcher_start_stop_and_traces_grow(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.core.teaching import teaching_task
    from sftkit.ui import RunHistory, RunLauncher

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=5, sample_every=5,
                      checkpoint_every=5)
    tpl = teaching_task("dates").template
    launcher = RunLauncher(cfg, template=tpl, poll_s=0.2, min_redraw_s=0.2)
    assert "CPU" in launcher.policy.value and "max_steps: 100000" in launcher.yaml_view.value
    launcher.start_button.click()
    assert launcher.handle is not None, launcher.message.value
    assert launcher.stop_button.disabled is False and launcher.start_button.disabled is True
    wait_for(lambda: len(launcher.figure.data[0].x) >= 6, what="six points on the loss curve")
    grown = len(launcher.figure.data[0].x)
    wait_for(lambda: len(launcher.figure.data[0].x) > grown, what="the loss curve to grow further")
    assert len(launcher.figure.data[2].x) > 0 and "step" in launcher.progress_label.value
    # how the run batches (packing chosen from the rows) and computes its loss, from its events
    assert "packing: off (auto)" in launcher.message.value and "trained positions only" in launcher.message.value
    # a second Start while it runs is refused (button disabled; the call reports why)
    assert launcher.start_button.disabled
    launcher.stop_button.click()
    assert launcher.wait(120) == "stopped"
    assert "stopped" in launcher.state_label.value
    assert launcher.start_button.disabled is False and launcher.resume_button.disabled is False
    points = len(launcher.figure.data[0].x)
    assert points == len([m for m in launcher.handle.run.metrics() if "loss" in m])
    assert launcher.handle.run.has_adapter()
    # after a "kernel restart": a new launcher attaches to the folder and shows the same curves
    again = RunLauncher(run=launcher.handle.run.path, min_redraw_s=3600)
    assert len(again.figure.data[0].x) == points
    # redraws are throttled: new lines within the interval wait for the next redraw
    drawn = again.redraws
    for step in range(points + 1, points + 11):
        append_jsonl(again.handle.run.metrics_path, {"step": step, "loss": 1.0})
        again.refresh()
    assert again.redraws == drawn and len(again.figure.data[0].x) == points
    again.refresh(force=True)
    assert again.redraws == drawn + 1 and len(again.figure.data[0].x) == points + 10
    points += 10
    static = again.static_figure()
    assert len(static.data[0].x) == points
    # the history lists it; a second short run gives an overlay and a config diff
    launcher.max_steps.value = 3
    launcher.name.value = "short"
    launcher.start_button.click()
    assert launcher.wait(120) == "finished", launcher.handle.run.read_status()
    history = RunHistory(tmp_path / "runs")
    assert len(history.picker.options) == 2 and "finished" in history.table.value
    assert len(history.figure.data) == 4  # train + eval per run
    assert "training.max_steps" in history.diff.value and "name" in history.diff.value
    assert RunStore(tmp_path / "runs").latest().name.endswith("short")


def test_launcher_shows_data_errors_without_starting(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    from sftkit.core.template import Template
    from sftkit.ui import RunLauncher

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs")
    launcher = RunLauncher(cfg, template=Template(user_pattern="{question}", answer_field="answer"),
                           data=[{"question": "a", "answer": "b"}, {"question": "c", "answer": ""}])
    launcher.start_button.click()
    assert launcher.handle is None
    assert "Not started" in launcher.message.value and "rows 1" in launcher.message.value
    assert not (tmp_path / "runs").exists() or RunStore(tmp_path / "runs").runs() == []


def test_in_kernel_mode_runs_in_a_thread_and_stops(tiny_llama_dir, tmp_path, cache):  # noqa: F811
    import os
    import threading

    from sftkit.ui import RunLauncher

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=0, sample_every=0,
                      checkpoint_every=1000)
    launcher = RunLauncher(cfg, in_kernel=True, poll_s=0.2, min_redraw_s=0.2)
    launcher.start_button.click()
    assert isinstance(launcher.handle.thread, threading.Thread) and launcher.handle.process is None
    wait_for(lambda: len(launcher.figure.data[0].x) >= 3, what="three points from the in-kernel run")
    assert launcher.handle.run.status().process.pid == os.getpid()
    launcher.stop_button.click()
    assert launcher.wait(120) == "stopped"
    assert launcher.handle.run.has_adapter()


HOSTILE = "<img src=x onerror=alert(1)>"


def _all_html(widget) -> list[str]:
    """Every HTML string a widget tree sends to the browser (HTML widgets, labels, plotly text)."""
    import ipywidgets as W
    import plotly.graph_objects as go

    out = []
    stack = [widget]
    while stack:
        w = stack.pop()
        if isinstance(w, (W.HTML, W.Label)):
            out.append(w.value)
        if isinstance(w, go.FigureWidget):
            out.append(str(w.layout.title.text or ""))
            out.extend(str(t.name or "") for t in w.data)
        for child in getattr(w, "children", ()):
            stack.append(child)
    return out


def test_hostile_run_folders_never_reach_the_views_unescaped(tmp_path):
    """A shared or downloaded run folder with markup in every field: no view shows it as HTML."""
    import json

    from sftkit.core.examples import example_config
    from sftkit.ui import RunHistory, RunLauncher
    from sftkit.ui.run_figures import metrics_table_html, samples_html

    store = RunStore(tmp_path / "runs")
    run_path = store.root / f"20260101-000000-{HOSTILE.replace('/', '')}"
    run_path.mkdir(parents=True)
    example_config().with_changes(store=str(store.root)).save(run_path / "config.yaml")
    status = {k: HOSTILE for k in ("state", "step", "max_steps", "message", "heartbeat", "started_at", "ended_at",
                                   "seconds", "device", "plan", "output", "attempt", "world_size")}
    status["process"] = {"pid": HOSTILE, "start": HOSTILE, "host": HOSTILE}
    (run_path / "status.json").write_text(json.dumps(status))
    lines = [{"step": 1, **{k: HOSTILE for k in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")}},
             {"step": HOSTILE, "loss": 1.0}, {"step": 2, "loss": 0.5, "memory_rss": HOSTILE}]
    (run_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    samples = [{"step": 1, "prompt": HOSTILE, "target": HOSTILE, "output": HOSTILE, "index": HOSTILE},
               {"step": HOSTILE, "prompt": "p", "output": "o"}]
    (run_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    events = [{"event": HOSTILE, "time": HOSTILE}, {"event": "failed", "message": HOSTILE, "time": 1.0}]
    (run_path / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in events))

    launcher = RunLauncher(run=run_path, poll_s=0.1, min_redraw_s=0)
    history = RunHistory(store)
    history.select(run_path.name)
    texts = _all_html(launcher.widget) + _all_html(history.widget)
    texts += [metrics_table_html(launcher.handle.run.metrics()), samples_html(launcher.handle.run.samples()),
              history.overlay(run_path.name).layout.title.text or ""]
    texts += [t.name for t in history.overlay(run_path.name).data]
    joined = "\n".join(texts)
    assert "&lt;img src=x onerror=alert(1)&gt;" in joined  # the text is shown, as text
    assert "<img" not in joined
    assert launcher.state in ("failed", "interrupted")  # an unknown state is never trusted
    assert [m["step"] for m in launcher.handle.run.metrics()] == [1, 2]


def test_launcher_poller_shows_errors_and_keeps_polling(tmp_path):
    """A failing look at the folder is shown in the message area; the next ones go on."""
    from sftkit.core.examples import example_config
    from sftkit.core.runstore import RunFolder, RunWriter
    from sftkit.ui import RunLauncher

    run = RunFolder(tmp_path / "runs" / "r")
    run.path.mkdir(parents=True)
    example_config().with_changes(store=str(tmp_path / "runs")).save(run.config_path)
    writer = RunWriter(run)  # this test process plays the run process
    writer.status("pending")
    writer.status("running", step=1, max_steps=10)
    run.metrics_path.mkdir()  # reading it fails (IsADirectoryError) until it is a file again
    launcher = RunLauncher(run=run.path, poll_s=0.05, min_redraw_s=0)
    wait_for(lambda: launcher.errors >= 2, timeout=30, what="the poller to report errors")
    assert "still trying" in launcher.message.value and "IsADirectoryError" in launcher.message.value
    run.metrics_path.rmdir()
    for step in (1, 2, 3):
        writer.metric({"step": step, "loss": 1.0 / step})
    wait_for(lambda: len(launcher.figure.data[0].x) == 3, timeout=30, what="the curve after the error")
    writer.status("finished", step=3)
    wait_for(lambda: launcher._poller is None or not launcher._poller.is_alive(), timeout=30,
             what="the poller to end with the run")
    assert "finished" in launcher.state_label.value

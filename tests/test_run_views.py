"""RunLauncher and RunHistory headless: click the buttons, watch the traces grow."""

import time

import numpy as np
import pytest

from sftkit.core.runstore import RunStore
from sftkit.ui import run_figures

from test_runs import cache, tiny_config, wait_for  # noqa: F401 - fixture reused


def test_curve_arrays_and_figures_are_pure():
    metrics = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "memory_rss": 2**21},
               {"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 110.0, "memory_rss": 2**21},
               {"step": 2, "eval_loss": 1.7}]
    arrays = run_figures.curve_arrays(metrics)
    assert [len(x) for x, _ in arrays] == [2, 1, 2, 2, 2, 2]
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
        again.handle.run.log_metric({"step": step, "loss": 1.0})
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
    assert launcher.handle.run.read_status()["pid"] == os.getpid()
    launcher.stop_button.click()
    assert launcher.wait(120) == "stopped"
    assert launcher.handle.run.has_adapter()

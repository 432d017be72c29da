"""sftkit doctor: versions, device, front ends, default model, and fix lines."""

import subprocess
import sys

import torch

from sftkit.engine.doctor import run_doctor


def by_name(report):
    return {c.name: c for c in report.checks}


def test_doctor_reports_stack_device_front_ends_and_model(default_model_folder):
    report = run_doctor()
    checks = by_name(report)
    for name in ("torch", "transformers", "peft", "bitsandbytes", "jupyterlab", "ipywidgets",
                 "jupyterlab_widgets", "plotly", "anywidget"):
        assert checks[name].status == "ok", checks[name]
    assert checks["torch"].detail.startswith(torch.__version__.split("+")[0])
    assert "cores" in checks["cpu"].detail and "GiB RAM" in checks["cpu"].detail
    if torch.cuda.is_available():
        assert "free of" in checks["gpu"].detail
    else:
        assert checks["gpu"].detail.startswith("none")
    assert checks["default model"].status == "ok" and str(default_model_folder) in checks["default model"].detail
    assert report.ok and "All good." in report.text()


def test_doctor_gives_a_fix_line_when_the_model_is_not_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path))
    report = run_doctor()
    model = by_name(report)["default model"]
    assert model.status == "warn" and model.fix == "sftkit prepare"
    text = report.text()
    assert "fix: sftkit prepare" in text and "1 problem(s) above" in text


def test_doctor_command_line_exit_code(default_model_folder):
    out = subprocess.run([sys.executable, "-m", "sftkit", "doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "auto policy" in out.stdout and "default model" in out.stdout

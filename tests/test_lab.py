"""`make lab`'s start script: JupyterLab on 127.0.0.1, token auth, notebooks/, lab/ settings.

The script runs from a temporary copy of the project's lab/ and notebooks/ (it finds its folders
from its own location), so the tests neither read nor change the repository's .lab-state or
notebooks/ (kernels write run folders and exports next to their notebook), and the kernels use a
private sftkit cache that links the converted default model.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"token {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def linked_cache(folder: Path, default_model_folder: Path) -> Path:
    """An sftkit cache of its own (device locks, ...) that links the converted default model."""
    folder.mkdir(parents=True, exist_ok=True)
    models = default_model_folder.parent.resolve()  # the shared models folder itself, not a link to it
    (folder / "models").symlink_to(models, target_is_directory=True)
    return folder


def project_copy(folder: Path) -> Path:
    """lab/ (start.sh and its settings) and the notebooks, as the project lays them out."""
    shutil.copytree(ROOT / "lab", folder / "lab", ignore=shutil.ignore_patterns("build_notebooks.py"))
    (folder / "notebooks").mkdir()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(nb, folder / "notebooks" / nb.name)
    return folder


@contextlib.contextmanager
def running_lab(folder: Path, cache: Path):
    """lab/start.sh of a project copy in ``folder``; yields base URL, token, log and the notebooks folder."""
    port = free_port()
    log = folder / "lab.log"
    env = dict(os.environ, CI="true", VENV=str(ROOT / ".venv"), SFTKIT_CACHE_DIR=str(cache))
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(folder / "lab" / "start.sh"), "--no-browser", f"--port={port}"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        url = None
        while time.time() < deadline and url is None:
            m = re.search(r"(http://127\.0\.0\.1:%d/lab\?token=([0-9a-f]+))" % port, log.read_text())
            if m:
                url, token = m.group(1), m.group(2)
            elif proc.poll() is not None:
                pytest.fail(f"lab/start.sh exited early:\n{log.read_text()}")
            else:
                time.sleep(0.5)  # polling the log for the URL, not a fixed wait
        assert url, f"no URL with a token in the log:\n{log.read_text()}"
        yield {"base": f"http://127.0.0.1:{port}", "token": token, "log": log,
               "notebooks": (folder / "notebooks").resolve(), "cache": cache}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, default_model_folder):
    work = tmp_path_factory.mktemp("lab")
    cache = linked_cache(work / "cache", default_model_folder)
    with running_lab(project_copy(work / "project"), cache) as info:
        yield info


def test_lab_serves_notebooks_on_loopback_with_token(lab):
    status, body = get(f"{lab['base']}/api/contents", lab["token"])
    names = {item["name"] for item in json.loads(body)["content"]}
    assert "00_start_here.ipynb" in names
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f"{lab['base']}/api/contents")
    assert err.value.code == 403
    # start.sh ran the doctor first, and it found the model in the lab's cache.
    log = lab["log"].read_text()
    doctor = next((line for line in log.splitlines() if "default model" in line), "")
    assert doctor.startswith("[ok  ]") and str(lab["cache"]) in doctor, log


def test_lab_has_the_project_kernel_and_workshop_settings(lab):
    _, body = get(f"{lab['base']}/api/kernelspecs", lab["token"])
    assert "sftkit" in json.loads(body)["kernelspecs"]
    _, body = get(f"{lab['base']}/lab/api/settings/@jupyterlab/apputils-extension:notification", lab["token"])
    # lab/overrides.json changes the defaults the front end starts from.
    props = json.loads(body)["schema"]["properties"]
    assert props["fetchNews"]["default"] == "false" and props["checkForUpdates"]["default"] is False


def test_lab_workspace_opens_the_start_notebook(lab):
    _, body = get(f"{lab['base']}/lab/api/workspaces/default", lab["token"])
    data = json.loads(body)["data"]
    assert data["layout-restorer:data"]["main"]["current"] == "notebook:00_start_here.ipynb"
    # The state start.sh keeps sits next to the copy it ran from, not in the repository.
    assert (lab["notebooks"].parent / ".lab-state" / "workspaces").is_dir()


def test_lab_serves_the_notebooks_folder_next_to_its_script(lab):
    _, body = get(f"{lab['base']}/api/contents/00_start_here.ipynb", lab["token"])
    nb = json.loads(body)
    assert nb["type"] == "notebook" and nb["content"]["metadata"]["kernelspec"]["name"] == "sftkit"
    _, body = get(f"{lab['base']}/api/contents", lab["token"])
    names = {item["name"] for item in json.loads(body)["content"]}
    assert names == {p.name for p in lab["notebooks"].iterdir()} and "lab" not in names

"""`make lab`'s start script: JupyterLab on 127.0.0.1, token auth, notebooks/, lab/ settings."""

import json
import os
import re
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("lab") / "lab.log"
    env = dict(os.environ, CI="true")
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(ROOT / "lab" / "start.sh"), "--no-browser", f"--port={port}"],
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
                time.sleep(0.5)
        assert url, f"no URL with a token in the log:\n{log.read_text()}"
        yield {"base": f"http://127.0.0.1:{port}", "token": token, "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_lab_serves_notebooks_on_loopback_with_token(lab):
    status, body = get(f"{lab['base']}/api/contents", lab["token"])
    names = {item["name"] for item in json.loads(body)["content"]}
    assert "00_start_here.ipynb" in names
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f"{lab['base']}/api/contents")
    assert err.value.code == 403
    assert "sftkit doctor" in lab["log"].read_text() or "[ok  ]" in lab["log"].read_text()


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

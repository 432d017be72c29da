"""`make lab`'s start script: JupyterLab on 127.0.0.1, token auth, notebooks/, lab/ settings.

The script runs from a temporary copy of the project's lab/ and notebooks/ (it finds its folders
from its own location), so the tests neither read nor change the repository's .lab-state or
notebooks/ (kernels write run folders and exports next to their notebook), and the kernels use a
private sftkit cache that links the converted default model.
"""

import json
import urllib.error
import urllib.request

import pytest

from helpers import ROOT, free_port, get, linked_cache, project_copy, running_lab  # noqa: F401


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

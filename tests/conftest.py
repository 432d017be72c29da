import os
import subprocess
from pathlib import Path

import pytest

# Tests never reach a model hub: cached files only, and no telemetry.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
# the tree the session-end guard watches (tests/test_tree_guard.py points it at a scratch repository)
REPO = Path(os.environ.get("SFTKIT_TREE_GUARD_REPO") or REPO)
# the converted default model lives in the user's sftkit cache (`make test` converts it once);
# everything else a test makes (device locks, temporary folders) goes to a cache of its own
from sftkit.core.paths import models_cache_dir  # noqa: E402

SHARED_MODELS = models_cache_dir()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test gets its own sftkit cache (locks included); converted models are shared by a link."""
    cache = tmp_path_factory.mktemp("sftkit-cache")
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def cache(private_cache) -> Path:
    """The test's own sftkit cache (device locks in it; converted models through a link)."""
    return private_cache


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    """The bundled model converted into the sftkit cache (done once by `make test`'s install)."""
    from sftkit.engine.models import prepare_default_model

    return prepare_default_model(progress=None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_folder) -> Path:
    """A 2-layer, hidden-64 random Llama with the default model's tokenizer and chat template."""
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", default_model_folder)


# ---- the clone stays clean ----------------------------------------------------------------------
_EXPECTED = ("__pycache__", ".pytest_cache", ".ipynb_checkpoints")


def _tree_state() -> set[str] | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line[3:] for line in out.stdout.splitlines()
            if not any(part in line for part in _EXPECTED) and not line[3:].startswith(".venv/")
            and not (_SHOTS and line[3:].startswith(_SHOTS))}


def _screenshots_folder() -> str | None:
    """`make screenshots` asks for the browser tests' pictures in the repository (SFTKIT_SCREENSHOTS):
    the one folder the tests may then change."""
    folder = os.environ.get("SFTKIT_SCREENSHOTS")
    if not folder:
        return None
    try:
        return Path(folder).resolve().relative_to(REPO.resolve()).as_posix().rstrip("/") + "/"
    except ValueError:
        return None  # outside the repository: the guard has nothing to allow


_SHOTS = _screenshots_folder()


def pytest_sessionstart(session):
    session.config._sftkit_tree = _tree_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_sftkit_tree", None)
    after = _tree_state()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("tests left files in the repository (they belong in temporary folders): "
                                + ", ".join(new[:20]), red=True)
        session.exitstatus = 1

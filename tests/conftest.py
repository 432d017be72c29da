import os
from pathlib import Path

import pytest

# Tests never reach a model hub: cached files only, and no telemetry.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


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

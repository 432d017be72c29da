"""Classifying what the user passed to load_model, with clear errors for paths."""

import pytest

from sftkit.core import modelspec
from sftkit.core.errors import ModelNotFoundError
from sftkit.core.modelspec import resolve_model_spec


def test_default_resolves_to_the_bundled_gguf():
    src = resolve_model_spec("default")
    assert src.kind == "default" and src.location.endswith(modelspec.DEFAULT_MODEL_FILE)


def test_default_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(modelspec, "DEFAULT_MODEL_PACKAGE", "sftkit-no-such-model-package")
    with pytest.raises(ModelNotFoundError, match=r"default model .* not installed.*sftkit prepare"):
        resolve_model_spec("default")


def test_hub_ids_and_paths(tmp_path):
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve_model_spec("gpt2").kind == "hub"
    with pytest.raises(ModelNotFoundError, match=r"model path './nope/model' not found"):
        resolve_model_spec("./nope/model")
    with pytest.raises(ModelNotFoundError, match=r"not found"):
        resolve_model_spec(str(tmp_path / "missing.gguf"))


def test_folder_and_file_shapes(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model_spec(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFoundError, match=r"needs config.json"):
        resolve_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_spec(str(tmp_path)).kind == "folder"


def test_empty_and_garbage_specs():
    with pytest.raises(ModelNotFoundError, match="empty"):
        resolve_model_spec("  ")
    with pytest.raises(ModelNotFoundError, match="neither an existing path nor a hub id"):
        resolve_model_spec("what is this?")

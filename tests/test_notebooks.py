"""The workshop notebooks run top to bottom in the project's kernel."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def test_every_notebook_names_the_project_kernel():
    nbs = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert nbs
    for path in nbs:
        nb = nbformat.read(str(path), as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "sftkit", path.name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
            f"{path.name} is committed with outputs"


@pytest.mark.slow
def test_start_here_runs_and_the_model_answers(default_model_folder, tmp_path):
    path = NOTEBOOKS / "00_start_here.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="sftkit",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = outputs_text(nb)
    assert "All good." in text
    assert "Paris" in text
    assert "4-bit:" in text and "<|im_start|>assistant" in text


@pytest.mark.slow
def test_prompt_builder_notebook_runs_shows_the_widget_and_scores(default_model_folder):
    path = NOTEBOOKS / "01_prompt_builder.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="sftkit",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    widget_outputs = [o for c in nb.cells for o in c.get("outputs", [])
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget_outputs, "the PromptBuilder did not display"
    text = outputs_text(nb)
    assert "trained: '" in text and "<|im_end|>'" in text
    assert "zero-shot:" in text and "few-shot:" in text and "95% CI" in text


@pytest.mark.slow
def test_layer_picker_notebook_runs_and_reports(default_model_folder):
    path = NOTEBOOKS / "02_layer_picker.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="sftkit",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))
    text = outputs_text(nb)
    assert "30 blocks under model.layers" in text and "LoraConfig" in text
    assert "freeze_tuning(top 4)" in text and "activations: estimated" in text

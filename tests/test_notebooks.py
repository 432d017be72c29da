"""The workshop notebooks run top to bottom in the project's kernel.

Each runs with its working folder in a temporary folder (the notebooks write templates/,
exports/ and the run store runs/ relative to it) and with a private sftkit cache that links
the converted default model, so a test run leaves nothing in notebooks/ or the user's cache.
"""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import linked_cache

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


@pytest.fixture()
def workdir(tmp_path, monkeypatch, default_model_folder):
    """The kernel's working folder; its environment points the sftkit cache at a private one."""
    cache = linked_cache(tmp_path / "cache", default_model_folder)
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(cache))  # the kernel inherits this environment
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    yield work
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "the notebook wrote into notebooks/"


def run_notebook(name: str, workdir: Path):
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="sftkit",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def shows_a_widget(nb) -> bool:
    return any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


def test_every_notebook_names_the_project_kernel():
    nbs = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert nbs
    for path in nbs:
        nb = nbformat.read(str(path), as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "sftkit", path.name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
            f"{path.name} is committed with outputs"


@pytest.mark.slow
def test_start_here_runs_and_the_model_answers(workdir):
    nb = run_notebook("00_start_here.ipynb", workdir)
    text = outputs_text(nb)
    assert "All good." in text
    assert f"cached at {workdir.parent / 'cache'}" in text  # the kernel used the private cache
    assert "Paris" in text
    assert "4-bit:" in text and "<|im_start|>assistant" in text


@pytest.mark.slow
def test_prompt_builder_notebook_runs_shows_the_widget_and_scores(workdir):
    nb = run_notebook("01_prompt_builder.ipynb", workdir)
    assert shows_a_widget(nb), "the PromptBuilder did not display"
    text = outputs_text(nb)
    assert "trained: '" in text and "<|im_end|>'" in text
    assert "zero-shot:" in text and "few-shot:" in text and "95% CI" in text
    assert (workdir / "templates" / "dates.yaml").is_file()


@pytest.mark.slow
def test_layer_picker_notebook_runs_and_reports(workdir):
    nb = run_notebook("02_layer_picker.ipynb", workdir)
    assert shows_a_widget(nb), "the LayerPicker did not display"
    text = outputs_text(nb)
    assert "30 blocks under model.layers" in text and "LoraConfig" in text
    assert "freeze_tuning(top 4)" in text and "activations: estimated" in text


@pytest.mark.slow
def test_attention_notebook_runs_trains_and_diffs(workdir):
    nb = run_notebook("03_attention.ipynb", workdir)
    assert shows_a_widget(nb), "the AttentionView did not display"
    text = outputs_text(nb)
    assert "30 layers x 9 heads" in text and "step 11: loss" in text
    assert "heads that moved most" in text and "attention_diff.html" in text
    assert any("application/vnd.plotly.v1+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", [])), "no static figure was left"
    assert (workdir / "exports" / "attention_diff.html").is_file()


@pytest.mark.slow
def test_training_notebook_trains_snapshots_and_merges(workdir, monkeypatch):
    monkeypatch.setenv("SFTKIT_NOTEBOOK_STEPS", "4")
    nb = run_notebook("04_training.ipynb", workdir)
    assert shows_a_widget(nb), "the RunLauncher did not display"
    text = outputs_text(nb)
    assert "finished\n" in text and "finished 4 steps" in text
    assert "tuned: '" in text and "spec: default" in text and "model.safetensors" in text
    assert any("application/vnd.plotly.v1+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", [])), "no static figure was left"
    assert "<table class='sftkit-metrics'>" in text
    # The run store and the exports are in the working folder.
    runs = [p for p in (workdir / "runs").iterdir() if p.is_dir() and (p / "adapter").is_dir()]
    assert len(runs) == 1, sorted((workdir / "runs").iterdir())
    assert (workdir / "exports" / "dates-merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_prompt_vs_finetune_notebook_gives_verdicts_and_forgetting(workdir, monkeypatch):
    monkeypatch.setenv("SFTKIT_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("SFTKIT_NOTEBOOK_ITEMS", "12")
    nb = run_notebook("05_prompt_vs_finetune.ipynb", workdir)
    assert shows_a_widget(nb), "the CompareView did not display"
    text = outputs_text(nb)
    assert text.count(" on 12 items") >= 3, text[-3000:]  # a verdict per pair
    assert "forgetting: general-text perplexity" in text and "KL(base || adapter)" in text
    assert "<table class='sftkit-compare-pairs'" in text and "sftkit-compare-items" in text
    assert any("application/vnd.plotly.v1+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", [])), "no static chart was left"
    assert (workdir / "exports" / "prompt-vs-finetune.html").is_file()
    run = next(p for p in (workdir / "runs").iterdir() if (p / "adapter").is_dir())
    assert (run / "compare" / "compare.jsonl").is_file()  # per-item results cached in the run folder


@pytest.mark.slow
def test_feedback_notebook_labels_rates_trains_dpo_and_compares(workdir, monkeypatch):
    monkeypatch.setenv("SFTKIT_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("SFTKIT_NOTEBOOK_PROMPTS", "24")
    monkeypatch.setenv("SFTKIT_NOTEBOOK_ITEMS", "8")
    nb = run_notebook("06_feedback.ipynb", workdir)
    assert shows_a_widget(nb), "the FeedbackCollector did not display"
    text = outputs_text(nb)
    assert "by hand" in text and "by the scorer" in text and "'pairs':" in text
    assert "finished 4 steps" in text and " on 8 items" in text, text[-3000:]
    assert "Dataset({" in text and "'chosen'" in text
    ratings = workdir / "runs" / "feedback" / "dates" / "ratings.jsonl"
    lines = [json.loads(line) for line in ratings.read_text().splitlines()]
    # the three written answers: each gives a pair per differing candidate, or a tie when the model had it right
    written = {r["group"] for r in lines if r.get("source") == "person" and r["kind"] in ("pair", "tie")}
    assert len(written) == 3, lines
    assert all(r["chosen"] == r["row"]["iso"] for r in lines if r.get("source") == "person" and r["kind"] == "pair")
    assert (workdir / "exports" / "dates-pairs.parquet").is_file()
    dpo = [p for p in (workdir / "runs").iterdir() if p.name.endswith("-dates-dpo")]
    assert len(dpo) == 1 and (dpo[0] / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_peft_methods_notebook_runs_the_shootout_and_reads_the_table(workdir, monkeypatch):
    monkeypatch.setenv("SFTKIT_NOTEBOOK_FAST", "1")  # 3 steps, 8 items, one method a family (all seven: the timings)
    nb = run_notebook("07_peft_methods.ipynb", workdir)

    def stdout_of(marker: str) -> str:
        [cell] = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
        return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")

    try:
        check_peft_methods_notebook(nb, workdir, stdout_of)
    except AssertionError as exc:  # say what the shoot-out and the attention cell printed
        raise AssertionError(f"{exc}\n--- the shoot-out cell printed:\n{stdout_of('result.text()')}\n"
                             f"--- the attention cell printed:\n{stdout_of('virtual_share()')}") from exc


def check_peft_methods_notebook(nb, workdir, stdout_of):
    assert shows_a_widget(nb), "the ShootoutView did not display"
    text = outputs_text(nb)
    for name in ("LoRA", "DoRA", "IA3", "prompt tuning", "prefix tuning", "LLaMA-Adapter", "BitFit"):
        assert name in text, name
    assert "11,520" in text and "0.009%" in text  # a 20-token soft prompt on the default model
    # the soft prompt's attention share: 20 virtual tokens in front, a share strictly between 0 and 100%
    got = re.search(r"20 virtual tokens in front of \d+ real tokens: they get (\d+\.\d)% of the real",
                    stdout_of("virtual_share()"))
    assert got and 0 < float(got.group(1)) < 100, "no share of attention for the soft prompt"
    assert "score [95% CI]" in text and "best:" in text
    assert "refused: run" in text and "nothing to merge" in text and "exported:" in text and "merged:" in text
    assert "sftkit-shootout-table" in text  # the reopened view's table
    runs = [p for p in (workdir / "runs").iterdir() if (p / "config.yaml").is_file()]
    assert len(runs) == 4 and all((p / "status.json").is_file() for p in runs), runs
    table = stdout_of("result.text()")
    assert re.search(r"^BitFit .*\[", table, re.M) and not re.search(r"^DoRA .*\[", table, re.M)  # the four
    assert len(list((workdir / "runs" / "shootouts").glob("*.json"))) == 1
    assert (workdir / "exports" / "prompt-adapter" / "adapter_config.json").is_file()
    assert list((workdir / "exports" / "ia3-merged").glob("*.safetensors"))


@pytest.mark.slow
def test_quickstart_runs_the_whole_loop_and_ends_with_the_verdict(workdir, monkeypatch):
    monkeypatch.setenv("SFTKIT_NOTEBOOK_FAST", "1")  # the one variable of the fast profile: 3 steps, 8 items
    nb = run_notebook("00_quickstart.ipynb", workdir)
    shown = {c.source.splitlines()[-1] for c in nb.cells if c.cell_type == "code" and any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in c.get("outputs", []))}
    assert {"builder", "picker", "launcher", "attention", "view"} <= shown, shown  # each step's widget
    text = outputs_text(nb)
    assert "YYYY-MM-DD" in text and "finished\n" in text and "finished 3 steps" in text
    assert "the head that moved most: layer" in text
    # the verdict table: every variant's score with its interval, then the paired verdicts
    for name in ("zero-shot", "few-shot", "fine-tune"):
        assert re.search(rf"^{name} +\d+% +\d+% to \d+%$", text, re.M), (name, text[-2000:])
    assert "on 8 fresh items" in text
    verdicts = [line for line in text.splitlines() if "fine-tune" in line and " on 8 items" in line]
    assert len(verdicts) == 2 and "few-shot" in verdicts[0] and "zero-shot" in verdicts[1], text[-2000:]
    run = next(p for p in (workdir / "runs").iterdir() if p.name.endswith("-quickstart"))
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "compare" / "compare.jsonl").is_file()
    assert any(json.loads(line).get("event") == "sample" for line in (run / "events.jsonl").read_text().splitlines())


def test_every_notebook_header_says_what_you_learn_and_its_time():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        first = nbformat.read(str(path), as_version=4).cells[0].source
        assert "**What you will learn:**" in first and "**Time, top to bottom:** CPU: " in first, path.name

"""Every control of every view has its line of help (a tooltip), and the attention grid's labels fit.

Each view is built on the tiny random Llama; the test walks the view's whole widget tree, so a control
added later without help fails here, naming the view and the control.
"""

import ipywidgets as W
import pytest

from helpers import tiny_config

DISPLAY_ONLY = (W.HTML, W.HTMLMath, W.Label, W.IntProgress, W.FloatProgress, W.Valid)


def controls(widget):
    """Every control under ``widget``: buttons and value widgets a user changes (not display-only ones)."""
    seen, stack = [], [widget]
    while stack:
        w = stack.pop()
        if isinstance(w, W.Box) or isinstance(w, W.Accordion):
            stack.extend(w.children)
        elif isinstance(w, (W.Button, W.ValueWidget)) and not isinstance(w, DISPLAY_ONLY):
            seen.append(w)
    return seen


def untipped(view) -> list[str]:
    bad = []
    for w in controls(view.widget):
        tips = [w.tooltip] + list(getattr(w, "tooltips", None) or [])
        if not any(t and t.strip() for t in tips):
            bad.append(f"{type(w).__name__}({getattr(w, 'description', '')!r})")
    return bad


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def views(tiny, tiny_llama_dir, tmp_path):
    from sftkit import Budget, Variant, capture_attention, teaching_task
    from sftkit.ui import (
        AttentionView,
        CompareView,
        FeedbackCollector,
        LayerPicker,
        PromptBuilder,
        RunHistory,
        RunLauncher,
        ShootoutView,
    )

    model, tok = tiny
    task = teaching_task("dates")
    rows = task.rows(20)
    builder = PromptBuilder(rows, tok, model, task.template.with_examples(rows[:1]), debounce=0)
    yield builder
    yield LayerPicker(model, device_bytes=2**33, batch_size=4, seq_len=64)
    yield AttentionView(capture_attention(model, tok, "one two three four five six"))
    yield RunLauncher(tiny_config(tiny_llama_dir, tmp_path / "runs"))
    yield RunHistory(tmp_path / "runs")
    yield CompareView([Variant.zero_shot(task.template), Variant.few_shot(task.template, rows[:2], items=rows[10:14])],
                      rows[10:14], model=model, tokenizer=tok, start=False)
    yield FeedbackCollector(model, tok, task.template, rows, store=tmp_path / "runs", name="dates", start=False)
    yield ShootoutView(task="dates", budget=Budget(steps=1, batch_size=2, rows=8, eval_items=2), store=tmp_path / "runs")


def test_every_control_of_every_view_has_a_line_of_help(tiny, tiny_llama_dir, tmp_path):
    missing, names = {}, []
    for view in views(tiny, tiny_llama_dir, tmp_path):
        names.append(type(view).__name__)
        assert controls(view.widget), type(view).__name__
        bad = untipped(view)
        if bad:
            missing[type(view).__name__] = bad
    assert len(names) == 8
    assert not missing, f"controls without a tooltip: {missing}"


def test_the_attention_grid_shows_values_that_fit_the_cell(tiny):
    from sftkit import capture_attention
    from sftkit.ui import AttentionView

    model, tok = tiny
    view = AttentionView(capture_attention(model, tok, "one two three four five six"))
    for cell in view.cells.values():
        assert len(cell.description) <= 4 and cell.layout.padding == "0px", cell.description  # ".52", "1.00"
        assert cell.tooltip.startswith("layer ")

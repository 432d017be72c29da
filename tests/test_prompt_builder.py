"""PromptBuilder headless: type into it, click its buttons, run "Try it" on a tiny model."""

import html
import re
import time

import pytest

import sftkit
from sftkit.core.teaching import teaching_task
from sftkit.ui import PromptBuilder


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return sftkit.load_model(str(tiny_llama_dir))


def visible(builder) -> str:
    """The preview as a reader sees it: tags stripped, entities decoded."""
    text = re.sub(r"<br>", "\n", builder.preview.value)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).replace("\xa0", " ")


def trained_spans(builder):
    return builder.preview.value.count('data-trained="1"')


def test_preview_highlights_exactly_the_trained_tokens(tiny):
    model, tok = tiny
    task = teaching_task("dates")
    b = PromptBuilder(task.rows(40), tok, model, task.template, debounce=0)
    assert b.rendered.n_trained == trained_spans(b) == 11
    assert re.search(r"<b>\d+</b> tokens \(max 128\)", b.stats.value)
    b.train_on.value = "all"
    assert trained_spans(b) == b.rendered.n_tokens
    b.train_on.value = "completion"
    b.row.value = 5
    assert task.rows(40)[5]["text"].split()[0] in visible(b)


def test_typing_updates_the_template_and_errors_name_the_placeholder(tiny):
    model, tok = tiny
    b = PromptBuilder(teaching_task("dates").rows(20), tok, model, debounce=0)
    b.pattern.value = "Rewrite: {text}"
    assert b.template.user_pattern == "Rewrite: {text}" and "Rewrite:" in visible(b)
    b.pattern.value = "Rewrite: {txt}"
    assert b.error and "{txt}" in b.error and "columns: text, iso" in b.error
    assert "sftkit-error" in b.messages.value
    b.pattern.value = "Rewrite: {text}"
    assert b.error is None
    b.system.value = "Only dates."
    assert b.template.system == "Only dates."
    b.max_length.value = 20
    assert "cut at 20 tokens" in b.preview.value and b.warnings


def test_debounced_preview_waits_for_typing_to_stop(tiny):
    model, tok = tiny
    b = PromptBuilder(teaching_task("dates").rows(20), tok, model, debounce=0.2)
    before = b.preview.value
    b.pattern.value = "Typed: {text}"
    assert b.preview.value == before  # not yet
    assert b.template.user_pattern == "Typed: {text}"  # the draft has the edit already
    deadline = time.time() + 5
    while b.preview.value == before and time.time() < deadline:
        time.sleep(0.05)
    assert "Typed:" in visible(b)


def test_few_shot_editor_add_edit_reorder_remove(tiny):
    model, tok = tiny
    rows = teaching_task("dates").rows(20)
    b = PromptBuilder(rows, tok, model, teaching_task("dates").template, debounce=0)
    b.row.value = 4
    zero_len = b.rendered.n_tokens
    b.row.value = 3
    b.add_row_button.click()
    b.row.value = 4
    b.add_row_button.click()
    assert [e["iso"] for e in b.template.examples] == [rows[3]["iso"], rows[4]["iso"]]
    assert b.mode.value == "few-shot" and b.rendered.n_tokens > zero_len
    assert [s.role for s in b.rendered.segments].count("example") == 2
    # the editor rows: label, one Text per field, up, down, remove
    first = b.examples_box.children[0].children
    first[1].value = "June 9, 2001"
    assert b.template.examples[0]["text"] == "June 9, 2001"
    b.examples_box.children[1].children[-3].click()  # move the second up
    assert b.template.examples[0]["iso"] == rows[4]["iso"]
    b.examples_box.children[0].children[-1].click()  # remove the first
    assert [e["iso"] for e in b.template.examples] == [rows[3]["iso"]]
    b.add_blank_button.click()
    assert b.template.examples[-1] == {"text": "", "iso": ""}
    b.mode.value = "zero-shot"
    assert b.rendered.n_tokens == zero_len


def test_controls_write_the_draft_and_draft_changes_redraw_the_view(tiny):
    model, tok = tiny
    rows = teaching_task("dates").rows(20)
    b = PromptBuilder(rows, tok, model, teaching_task("dates").template, debounce=0)
    d = b.draft
    b.prefix.value = "Answer: "
    b.mode.value = "few-shot"
    b.row.value = 2
    assert (d.assistant_prefix, d.mode, d.row_index) == ("Answer: ", "few-shot", 2)
    b.mode.value = "zero-shot"
    d.add_example(rows[2])  # changed on the draft, not through the view
    assert b.mode.value == "few-shot" and len(b.examples_box.children) == 1
    assert b.examples_box.children[0].children[1].value == rows[2]["text"]
    d.update(max_length=20)
    assert "cut at 20 tokens" in b.preview.value and "sftkit-warning" in b.messages.value
    assert b.warnings == d.warnings and b.rendered is d.rendered
    d.report_error(RuntimeError("<i>x</i>"))
    assert "sftkit-error" in b.messages.value and "&lt;i&gt;x" in b.messages.value and b.error


def test_check_all_rows_reports_lengths(tiny):
    model, tok = tiny
    b = PromptBuilder(teaching_task("intent").rows(30), tok, model, teaching_task("intent").template, debounce=0)
    report = b.check_all()
    assert report.n_rows == 30 and "30 rows checked" in b.messages.value


def test_try_it_streams_in_the_background_and_stop_ends_it(tiny):
    model, tok = tiny
    b = PromptBuilder(teaching_task("dates").rows(10), tok, model, debounce=0, max_new_tokens=400)
    b.try_button.click()
    assert b.running and b.try_button.disabled and not b.stop_button.disabled
    # The kernel's thread is free meanwhile: wait for the first streamed text, then Stop.
    deadline = time.time() + 30
    while not b.answer_text and time.time() < deadline:
        time.sleep(0.01)
    b.stop_button.click()
    b.wait(30)
    assert not b.running and not b.try_button.disabled and b.stop_button.disabled
    assert "stopped after" in b.answer.value
    n = int(re.search(r"stopped after (\d+) tokens", b.answer.value).group(1))
    assert 0 < n < 400


def test_try_it_runs_to_the_end_and_compares_with_the_dataset(tiny):
    model, tok = tiny
    b = PromptBuilder(teaching_task("dates").rows(10), tok, model, debounce=0, max_new_tokens=8)
    b.try_button.click()
    b.wait(30)
    assert "8 tokens in" in b.answer.value
    assert "differs from the dataset answer" in b.answer.value or "matches" in b.answer.value

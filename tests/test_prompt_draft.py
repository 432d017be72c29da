"""PromptDraft without widgets: preview and loss mask, warnings in Template's own words,
few-shot edits, notifications, and "try it" on a tiny model."""

import subprocess
import sys
import threading

import pytest
from transformers import AutoTokenizer

import sftkit
from sftkit.core.teaching import teaching_task
from sftkit.core.template import Template, TemplateError
from sftkit.state import PromptDraft
from sftkit.state.prompt_draft import error_text


@pytest.fixture(scope="module")
def tok(default_model_folder):
    return AutoTokenizer.from_pretrained(str(default_model_folder))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return sftkit.load_model(str(tiny_llama_dir))


DATES = teaching_task("dates")


def listen(draft) -> list[str]:
    events: list[str] = []
    draft.on_change(events.append)
    return events


def test_preview_mask_roles_and_stats(tok):
    rows = DATES.rows(20)
    d = PromptDraft(rows, tok, DATES.template)
    p = d.preview
    assert d.error is None and p.row_index == 0 and d.rendered is p.rendered
    assert p.n_trained == sum(p.loss_mask) == 11  # the ISO date and <|im_end|>
    assert len(p.pieces) == len(p.roles) == len(p.loss_mask) == p.n_tokens
    assert p.loss_mask == [1 if r in ("answer", "end") else 0 for r in p.roles]
    assert {"user", "answer", "end"} <= set(p.roles) and p.cut_at is None
    assert rows[0]["text"] in "".join(x.text for x in p.pieces)
    assert 0 < p.prompt_length < p.n_tokens and p.max_length == DATES.template.max_length
    d.update(train_on="all")
    assert d.preview.n_trained == d.preview.n_tokens
    d.update(row_index=5)
    assert d.preview.row_index == 5 and rows[5]["iso"] in "".join(x.text for x in d.preview.pieces)


def test_row_warnings_are_template_validate_words_with_the_row_number(tok):
    rows = DATES.rows(20)
    d = PromptDraft(rows, tok, DATES.template)
    assert d.warnings == [] and d.messages == []
    d.update(max_length=20, row_index=3)
    tpl = d.template
    expected = tpl.validate([rows[3]], tok).warnings
    assert expected and any("longer than max_length=20" in w for w in expected)
    assert d.warnings == [w.replace("(rows 0", "(row 3") for w in expected]
    assert "(row 3; longest" in d.warnings[0] and d.preview.cut_at == 20
    assert [k for k, _ in d.messages] == ["warning"] * len(expected)
    d.update(max_length=8)  # the prompt fills max_length: nothing trained
    assert any("zero trained tokens" in w for w in d.warnings)
    assert d.warnings == [w.replace("(rows 0", "(row 3") for w in d.template.validate([rows[3]], tok).warnings]


def test_check_all_reports_validate_and_an_edit_clears_the_summary(tok):
    rows = DATES.rows(30)
    d = PromptDraft(rows, tok, DATES.template)
    d.update(max_length=24)
    events = listen(d)
    report = d.check_all()
    assert events == ["messages"] and report == d.report
    assert d.warnings == list(d.template.validate(rows, tok).warnings) == list(report.warnings)
    assert d.summary.startswith("30 rows checked: median ") and d.messages[0] == ("info", d.summary)
    d.update(row_index=1)
    assert d.summary is None


def test_data_errors_keep_the_last_preview_and_use_check_rows_words(tok):
    rows = [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}, {"q": "c"}]
    d = PromptDraft(rows, tok, Template(user_pattern="{q}", answer_field="a"))
    with pytest.raises(TemplateError) as err:
        Template(user_pattern="{q}", answer_field="a").check_rows(rows)
    assert d.error == str(err.value) and d.messages == [("error", d.error)] and d.preview is None
    good = PromptDraft(rows[:2], tok, Template(user_pattern="{q}", answer_field="a"))
    shown = good.preview
    good.update(user_pattern="Q: {nope}")
    assert "{nope}" in good.error and "columns: q, a" in good.error and good.preview is shown
    with pytest.raises(TemplateError):
        good.template
    good.update(user_pattern="Q: {q}")
    assert good.error is None and good.preview is not shown and good.template.user_pattern == "Q: {q}"


def test_json_notes_come_from_structured_fields(tok):
    rows = [{"q": "a", "tags": "x", "a": "1"}, {"q": "b", "tags": ["x", "y"], "a": "2"}]
    d = PromptDraft(rows, tok, Template(user_pattern="{q} {tags}", answer_field="a"))
    assert d.template.structured_fields(rows) == {"tags": [1]}
    assert d.notes == ["field 'tags' holds lists/dicts in rows 1 (0-based): shown as JSON"]
    assert ("info", d.notes[0]) in d.messages


def test_few_shot_examples_add_edit_move_remove(tok):
    rows = DATES.rows(20)
    d = PromptDraft(rows, tok, DATES.template)
    assert d.mode == "zero-shot" and not d.few_shot
    zero = d.preview.n_tokens
    events = listen(d)
    d.update(row_index=3)
    d.add_row_example()
    d.add_example(rows[4])
    assert [e["iso"] for e in d.template.examples] == [rows[3]["iso"], rows[4]["iso"]]
    assert d.mode == "few-shot" and d.preview.n_tokens > zero
    assert list(d.preview.roles).count("example") > 0
    assert events == ["preview", "examples", "preview", "examples", "preview"]
    d.edit_example(0, "text", "June 9, 2001")
    assert d.template.examples[0]["text"] == "June 9, 2001" and events[-1] == "preview"
    d.examples[0]["text"] = "changed on a copy"
    assert d.template.examples[0]["text"] == "June 9, 2001"
    d.move_example(1, -1)
    assert d.template.examples[0]["iso"] == rows[4]["iso"]
    n = len(events)
    d.move_example(0, -1)  # past the top: nothing happens
    assert len(events) == n
    d.remove_example(0)
    d.add_example()
    assert d.template.examples == [{"text": "June 9, 2001", "iso": rows[3]["iso"]}, {"text": "", "iso": ""}]
    d.update(mode="zero-shot")
    d.update(row_index=0)
    assert d.preview.n_tokens == zero


def test_update_without_refresh_notifications_and_bad_names(tok):
    d = PromptDraft(DATES.rows(10), tok, DATES.template)
    events = listen(d)
    before = d.preview
    d.update(user_pattern="Typed: {text}", refresh=False)
    assert events == [] and d.preview is before and d.template.user_pattern == "Typed: {text}"
    assert d.refresh() is d.preview and events == ["preview"]
    d.update(user_pattern="Typed: {text}")  # unchanged: no work, no event
    assert events == ["preview"]
    d.update(system="Only dates.")
    assert d.template.system == "Only dates." and events == ["preview", "preview"]
    d.update(system="   ")
    assert d.template.system is None  # blank: the chat template's default
    unsubscribe = d.on_change(lambda e: (_ for _ in ()).throw(RuntimeError("listener broke")))
    with pytest.raises(RuntimeError):
        d.refresh()
    unsubscribe()
    d.refresh()
    with pytest.raises(TypeError, match="colour"):
        d.update(colour="red")
    with pytest.raises(ValueError, match="0 to 9"):
        d.update(row_index=10)
    with pytest.raises(ValueError, match="zero-shot, few-shot"):
        d.update(mode="two-shot")


def test_report_error_and_error_text(tok):
    d = PromptDraft(DATES.rows(5), tok, DATES.template)
    events = listen(d)
    d.report_error(ValueError("<b>bad</b>"))
    assert d.error == "ValueError: <b>bad</b>" and events == ["messages"] and d.messages[0][0] == "error"
    assert error_text(TemplateError("plain words")) == "plain words"
    assert error_text(RuntimeError()) == "RuntimeError"
    d.refresh()
    assert d.error is None


def test_default_template_and_answer_field_fallback(tok):
    d = PromptDraft([{"q": "a", "a": "1"}], tok)
    assert (d.template.user_pattern, d.template.answer_field) == ("{q}", "a")
    d2 = PromptDraft([{"q": "a", "a": "1"}], tok, Template(user_pattern="{q}", answer_field="missing"))
    assert d2.answer_field == "a" and d2.error is None


def test_try_it_answers_the_selected_row(tiny):
    model, tok = tiny
    rows = DATES.rows(10)
    d = PromptDraft(rows, tok, DATES.template)
    d.update(row_index=2)
    result = d.try_it(model, max_new_tokens=4)
    assert result.row_index == 2 and result.expected == rows[2]["iso"] == d.expected_answer()
    assert 0 < result.new_tokens <= 4 and not result.stopped
    assert result.note.startswith(f"{result.new_tokens} tokens in ")
    assert result.matches == (result.text.strip() == rows[2]["iso"])


def test_start_try_runs_in_the_background_and_stops(tiny):
    model, tok = tiny
    d = PromptDraft(DATES.rows(10), tok, DATES.template)
    streamed, done, first = [], [], threading.Event()

    def on_text(piece):
        streamed.append(piece)
        first.set()

    d.start_try(model, max_new_tokens=400, on_text=on_text, on_done=lambda r, e: done.append((r, e)))
    assert d.trying
    with pytest.raises(RuntimeError, match="already running"):
        d.start_try(model)
    assert first.wait(30)
    d.update(user_pattern="Edited meanwhile: {text}")  # the kernel's thread stays free
    d.stop_try()
    d.wait_try(30)
    assert not d.trying and len(done) == 1
    result, error = done[0]
    assert error is None and result.stopped and 0 < result.new_tokens < 400
    assert result.note == f"stopped after {result.new_tokens} tokens"
    d.update(user_pattern="{nope}")
    with pytest.raises(TemplateError, match="nope"):  # raised here, before any thread
        d.start_try(model)
    assert not d.trying


def test_importing_the_draft_loads_no_widgets_and_no_torch():
    code = ("import sys, sftkit.state.prompt_draft\n"
            "bad = {'ipywidgets', 'plotly', 'torch', 'sftkit.ui'} & set(sys.modules)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)

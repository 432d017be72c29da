"""Bad input is refused up front with a message naming the field/row and what is allowed;
odd but legal input (numeric strings, tab-separated files, list/dict values) just works;
the PromptBuilder shows every error in its view and keeps working."""

import html
import re
import threading

import pytest
from transformers import AutoTokenizer

from sftkit.core.data import DataError, load_rows
from sftkit.core.runconfig import RunConfig, RunConfigError, TrainingConfig
from sftkit.core.template import Template, TemplateError, placeholders
from sftkit.ui import PromptBuilder


@pytest.fixture()
def tok(default_model_folder):
    """A fresh tokenizer per test: some tests break its chat template on purpose."""
    return AutoTokenizer.from_pretrained(str(default_model_folder))


# ---- item 13: config values ---------------------------------------------------------------
NUMERIC_STRINGS_YAML = """
data:
  rows: '100'
  eval_fraction: '0.2'
adapter:
  alpha: '16'
  dropout: 5e-2
training:
  learning_rate: 2e-4
  batch_size: '8'
  max_steps: 1e3
  warmup: '3'
  weight_decay: 1e-2
"""


def test_numeric_strings_in_yaml_become_numbers():
    cfg = RunConfig.from_yaml(NUMERIC_STRINGS_YAML)
    t = cfg.training
    assert t.learning_rate == 0.0002 and type(t.learning_rate) is float
    assert t.batch_size == 8 and type(t.batch_size) is int
    assert t.max_steps == 1000 and type(t.max_steps) is int
    assert t.warmup == 3 and type(t.warmup) is int  # a whole number of steps stays an int
    assert t.weight_decay == 0.01
    assert cfg.data.rows == 100 and type(cfg.data.rows) is int and cfg.data.eval_fraction == 0.2
    assert cfg.adapter.alpha == 16 and cfg.adapter.dropout == 0.05
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg  # numbers, not strings, are written back
    assert TrainingConfig(learning_rate="2e-4").learning_rate == 0.0002


@pytest.mark.parametrize("section,values,expected", [
    ("training", {"learning_rate": "fast"}, "training.learning_rate='fast' is not allowed; allowed: a number"),
    ("training", {"batch_size": "8.5"}, "training.batch_size='8.5' is not allowed; allowed: an integer"),
    ("training", {"epochs": "nan"}, "training.epochs='nan' is not allowed"),
    ("data", {"rows": "lots"}, "data.rows='lots' is not allowed"),
    ("adapter", {"rank": "sixteen"}, "adapter.rank='sixteen' is not allowed"),
])
def test_non_numeric_strings_still_name_the_field(section, values, expected):
    with pytest.raises(RunConfigError) as err:
        RunConfig(**{section: values})
    assert expected in str(err.value)


@pytest.mark.parametrize("values,expected", [
    ({"system": 5}, "template.system=5 is not allowed; allowed: a string or null"),
    ({"assistant_prefix": 3}, "template.assistant_prefix=3 is not allowed; allowed: a string"),
    ({"examples": "abc"}, "template.examples='abc' is not allowed; allowed: a list of mappings"),
    ({"examples": ["ab"]}, "template.examples[0]='ab' is not allowed; allowed: a mapping"),
    ({"examples": [{"question": "q", "answer": "a"}, 7]}, "template.examples[1]=7 is not allowed"),
    ({"user_pattern": 5}, "template.user_pattern=5 is not allowed; allowed: a string"),
    ({"answer_field": ["a"]}, "template.answer_field=['a'] is not allowed; allowed: a column name"),
    ({"train_on": ["all"]}, "template.train_on=['all'] is not allowed; allowed: completion, all"),
    ({"max_length": True}, "template.max_length=True is not allowed; allowed: an integer >= 8"),
])
def test_template_field_types_are_checked_up_front(values, expected):
    with pytest.raises(TemplateError) as err:
        Template(**values)
    assert expected in str(err.value)
    with pytest.raises(TemplateError) as err:
        Template.from_dict(values)
    assert expected in str(err.value)
    with pytest.raises(RunConfigError) as err:
        RunConfig(template=values)
    assert expected in str(err.value)


@pytest.mark.parametrize("text", ["template: abc", "template: [1, 2]", "template: 5"])
def test_template_section_that_is_not_a_mapping_is_refused(text):
    with pytest.raises(RunConfigError, match=r"template=.* is not allowed; allowed: a mapping of template fields"):
        RunConfig.from_yaml(text)


@pytest.mark.parametrize("pattern", ["Q: {q:>99999999999}", "{q!r}", "{q!s:^9}", "{q.attr}", "{q[0]}",
                                     "{q:{w}}"])
def test_placeholders_must_be_plain_names(pattern):
    with pytest.raises(TemplateError, match=r"user_pattern .*plain \{name\}"):
        Template(user_pattern=pattern, answer_field="a")
    with pytest.raises(RunConfigError, match=r"user_pattern .*plain \{name\}"):
        RunConfig(template={"user_pattern": pattern, "answer_field": "a"})


def test_plain_placeholders_and_brace_escapes_still_work():
    assert placeholders("{{q}} {q} {a_b}") == ["q", "a_b"]
    assert Template(user_pattern="{{literal}} {q}", answer_field="a").user_text({"q": "x"}) == "{literal} x"


def test_tsv_files_are_read_with_tabs(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("q\ta\nhello, world\t1\n\"quoted\ttab\"\t2\n", encoding="utf-8")
    assert load_rows(p) == [{"q": "hello, world", "a": "1"}, {"q": "quoted\ttab", "a": "2"}]
    p.write_text("q\ta\nx\t1\ty\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv: line 2 has more values than the header's 2 columns"):
        load_rows(p)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"allowed: .*\.tsv"):
        load_rows(tmp_path / "d.txt")


# ---- item 14: row values ----------------------------------------------------------------
def test_list_and_dict_values_are_rendered_as_json(tok):
    tpl = Template(user_pattern="Tags: {tags}", answer_field="out")
    row = {"tags": ["a", "é"], "out": {"k": "ü", "n": [1, 2]}}
    assert tpl.user_text(row) == 'Tags: ["a", "é"]'
    r = tpl.render(row, tok)
    assert 'Tags: ["a", "é"]' in r.text and '{"k": "ü", "n": [1, 2]}<|im_end|>' in r.text
    trained = tok.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m])
    assert trained == '{"k": "ü", "n": [1, 2]}<|im_end|>'
    rows = [{"tags": "x", "out": "1"}, {"tags": ["x"], "out": "2"}, {"tags": "y", "out": "3"},
            {"tags": {"a": 1}, "out": ["z"]}]
    assert tpl.structured_fields(rows) == {"tags": [1, 3], "out": [3]}


def test_a_row_without_the_answer_field_is_reported_missing_not_empty(tok):
    tpl = Template(user_pattern="{q}", answer_field="a")
    rows = [{"q": "0", "a": "x"}, {"q": "1"}, {"q": "2", "a": "y"}, {"q": "3", "a": None}, {"q": "4", "a": ""}]
    with pytest.raises(TemplateError) as err:
        tpl.validate(rows, tok)
    msg = str(err.value)
    assert "2 row(s) lack the answer field 'a': rows 1, 3 (0-based)" in msg
    assert "1 row(s) have an empty 'a': rows 4" in msg
    with pytest.raises(TemplateError, match=r"lack a value for q: rows 1 .*lack the answer field 'a': rows 2"):
        tpl.check_rows([{"q": "0", "a": "x"}, {"a": "y"}, {"q": "2"}])


# ---- PromptBuilder ------------------------------------------------------------------------
def visible(html_text: str) -> str:
    text = re.sub(r"<br>", "\n", html_text)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).replace("\xa0", " ")


def wait_for(widget, predicate, timeout: float = 20.0) -> bool:
    """Wait until ``predicate()`` holds, woken by changes of ``widget.value`` (no fixed sleep)."""
    changed = threading.Event()

    def on_change(_):
        if predicate():
            changed.set()

    widget.observe(on_change, names="value")
    try:
        if not predicate():
            changed.wait(timeout)
    finally:
        widget.unobserve(on_change, names="value")
    return predicate()


DATES = [{"text": "May 1, 2020", "iso": "2020-05-01"}, {"text": "June 2, 2021", "iso": "2021-06-02"},
         {"text": "July 3, 2022", "iso": "2022-07-03"}]
BROKEN_CHAT_TEMPLATE = "{{ raise_exception('chat template <b>broke</b> & stopped') }}"


def test_errors_in_the_debounce_timer_show_in_the_view_and_it_recovers(tok):
    b = PromptBuilder(DATES, tok, template=Template(user_pattern="{text}", answer_field="iso"), debounce=0.05)
    assert b.error is None and "May 1, 2020" in visible(b.preview.value)
    good = tok.chat_template
    tok.chat_template = BROKEN_CHAT_TEMPLATE
    b.pattern.value = "Typed: {text}"  # refresh runs in the timer thread and fails there
    assert wait_for(b.messages, lambda: "broke" in b.messages.value), "the error never reached the view"
    assert "sftkit-error" in b.messages.value and "chat template &lt;b&gt;broke&lt;/b&gt; &amp; stopped" \
        in b.messages.value and "<b>broke</b>" not in b.messages.value
    assert b.error and "broke" in b.error
    tok.chat_template = good
    b.pattern.value = "Fixed: {text}"
    assert wait_for(b.preview, lambda: "Fixed: May 1, 2020" in visible(b.preview.value))
    assert wait_for(b.messages, lambda: "sftkit-error" not in b.messages.value)
    assert b.error is None and b.template.user_pattern == "Fixed: {text}"


def test_errors_in_button_callbacks_show_in_the_view(tok):
    b = PromptBuilder(DATES, tok, template=Template(user_pattern="{text}", answer_field="iso"), debounce=0)
    good = tok.chat_template
    tok.chat_template = BROKEN_CHAT_TEMPLATE
    b.check_button.click()
    assert "sftkit-error" in b.messages.value and "broke" in b.messages.value
    b.messages.value = ""
    b.add_row_button.click()  # adds the example, then the preview fails
    assert "sftkit-error" in b.messages.value and "broke" in b.messages.value
    tok.chat_template = good
    b.check_button.click()
    assert "3 rows checked" in b.messages.value and "sftkit-error" not in b.messages.value
    b.row.value = 1  # the preview renders again, with the example the failed click added
    assert b.error is None and [s.role for s in b.rendered.segments].count("example") == 1
    assert "June 2, 2021" in visible(b.preview.value)


def test_prompt_builder_notes_json_fields_and_missing_answers(tok):
    rows = [{"q": "a", "tags": "x", "a": "1"}, {"q": "b", "tags": ["x", "y"], "a": "2"},
            {"q": "c", "tags": "z", "a": "3"}, {"q": "d", "tags": {"k": "v"}, "a": "4"}]
    b = PromptBuilder(rows, tok, template=Template(user_pattern="{q} {tags}", answer_field="a"), debounce=0)
    assert "field 'tags' holds lists/dicts in rows 1, 3 (0-based): shown as JSON" in visible(b.messages.value)
    b.row.value = 1
    assert 'b ["x", "y"]' in visible(b.preview.value)
    b.check_button.click()
    assert "field 'tags' holds lists/dicts in rows 1, 3" in visible(b.messages.value)
    b2 = PromptBuilder(rows[:2] + [{"q": "c", "tags": "t"}], tok,
                       template=Template(user_pattern="{q}", answer_field="a"), debounce=0)
    assert "1 row(s) lack the answer field 'a': rows 2 (0-based)" in visible(b2.messages.value)
    assert "empty" not in b2.messages.value


def test_prompt_builder_escapes_row_text_and_column_names(tok):
    rows = [{"q": "<script>alert(1)</script> & <b>bold</b>", "<i>c</i>": "1", "a": "<u>x</u>"}]
    b = PromptBuilder(rows, tok, template=Template(user_pattern="{q}", answer_field="a"), debounce=0)
    for value in (b.preview.value, b.messages.value):
        assert "<script>" not in value and "<b>bold" not in value and "<u>x" not in value
    assert "<script>alert(1)</script> & <b>bold</b>" in visible(b.preview.value)
    assert "<u>x</u>" in visible(b.preview.value)
    b.pattern.value = "{nope}"
    assert "columns: q, <i>c</i>, a" in visible(b.messages.value) and "<i>c</i>" not in b.messages.value

"""Template rendering and loss masks, checked against an independent tokenization of the
default model's chat template; validation errors and warnings with their messages."""

import pytest
from transformers import AutoTokenizer

from sftkit.core.template import Template, TemplateError, placeholders
from sftkit.core.tokens import readable_tokens

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok(default_model_folder):
    return AutoTokenizer.from_pretrained(str(default_model_folder))


def chatml(turns):
    """SmolLM2's ChatML written by hand, independent of apply_chat_template."""
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def expected_mask(tok, text, start, end):
    """1 for tokens whose characters lie inside [start, end) of ``text``, from offsets."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [1 if a >= start and b <= end and b > a else 0 for a, b in enc["offset_mapping"]]


def check_against_hand_written(tok, rendered, text, answer):
    answer_at = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert text[answer_at:].startswith(answer + "<|im_end|>")
    ids, mask = expected_mask(tok, text, answer_at, answer_at + len(answer) + len("<|im_end|>"))
    assert rendered.text == text
    assert rendered.input_ids == ids
    assert rendered.loss_mask == mask
    trained = [i for i, m in zip(rendered.input_ids, rendered.loss_mask) if m]
    assert tok.decode(trained) == answer + "<|im_end|>"
    assert trained[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    # the trailing newline after <|im_end|> exists and is not trained
    assert rendered.input_ids[-1] == tok("\n", add_special_tokens=False)["input_ids"][0]
    assert rendered.loss_mask[-1] == 0


def test_zero_shot_mask_matches_hand_written_chatml(tok):
    tpl = Template(system="Rewrite the date as YYYY-MM-DD.", user_pattern="Date: {text}", answer_field="iso")
    row = {"text": "March 5th, 2021", "iso": "2021-03-05"}
    r = tpl.render(row, tok, with_examples=False)
    text = chatml([("system", "Rewrite the date as YYYY-MM-DD."), ("user", "Date: March 5th, 2021"),
                   ("assistant", "2021-03-05")])
    check_against_hand_written(tok, r, text, "2021-03-05")
    assert r.end_trained and not r.truncated and r.n_trained == 11  # 10 characters + <|im_end|>


def test_default_system_prompt_of_the_chat_template_is_kept_and_masked(tok):
    tpl = Template(user_pattern="{q}", answer_field="a")
    r = tpl.render({"q": "Capital of France?", "a": "Paris."}, tok)
    text = chatml([("system", DEFAULT_SYSTEM), ("user", "Capital of France?"), ("assistant", "Paris.")])
    check_against_hand_written(tok, r, text, "Paris.")


def test_few_shot_mask_trains_only_the_final_answer(tok):
    examples = [{"text": "May 1, 2020", "iso": "2020-05-01"}, {"text": "2 Jan 1999", "iso": "1999-01-02"}]
    tpl = Template(system="Dates.", user_pattern="{text}", answer_field="iso", examples=examples,
                   assistant_prefix="")
    r = tpl.render({"text": "July 4, 1976", "iso": "1976-07-04"}, tok)
    text = chatml([("system", "Dates."), ("user", "May 1, 2020"), ("assistant", "2020-05-01"),
                   ("user", "2 Jan 1999"), ("assistant", "1999-01-02"),
                   ("user", "July 4, 1976"), ("assistant", "1976-07-04")])
    check_against_hand_written(tok, r, text, "1976-07-04")
    roles = [s.role for s in r.segments]
    assert roles == ["system", "example", "example", "user", "answer", "end", "other"]
    ex = [s for s in r.segments if s.role == "example"]
    assert tok.decode(r.input_ids[ex[0].start:ex[0].end]).startswith("May 1, 2020")
    assert tok.decode(r.input_ids[ex[1].start:ex[1].end]).endswith("1999-01-02")
    # the prompt generation sees is exactly the untrained prefix
    prompt_ids = tok(tpl.prompt_text({"text": "July 4, 1976"}, tok), add_special_tokens=False)["input_ids"]
    assert r.input_ids[:r.prompt_length] == prompt_ids and not any(r.loss_mask[:r.prompt_length])


def test_assistant_prefix_is_prompt_not_trained(tok):
    tpl = Template(user_pattern="{q}", answer_field="a", system="S", assistant_prefix="Answer: ")
    r = tpl.render({"q": "2+2?", "a": "4"}, tok)
    text = chatml([("system", "S"), ("user", "2+2?"), ("assistant", "Answer: 4")])
    assert r.text == text
    assert tok.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m]) == "4<|im_end|>"
    assert tpl.prompt_text({"q": "2+2?"}, tok).endswith("<|im_start|>assistant\nAnswer: ")


def test_train_on_all_trains_every_token_and_labels_follow_the_mask(tok):
    tpl = Template(user_pattern="{q}", answer_field="a", train_on="all")
    r = tpl.render({"q": "hi", "a": "hello"}, tok)
    assert all(r.loss_mask) and r.labels == r.input_ids
    r2 = Template(user_pattern="{q}", answer_field="a").render({"q": "hi", "a": "hello"}, tok)
    assert r2.labels[:r2.prompt_length] == [-100] * r2.prompt_length


def test_plain_fallback_without_a_chat_template_trains_eos(tok):
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = None
    tpl = Template(user_pattern="{q}", answer_field="a", system="Be brief.")
    r = tpl.render({"q": "Capital of France?", "a": "Paris"}, plain)
    assert r.text == "Be brief.\n\n### Input:\nCapital of France?\n\n### Response:\nParis<|im_end|>\n\n"
    assert plain.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m]) == "Paris<|im_end|>"
    assert r.end_trained


# ---- validation ----------------------------------------------------------------------
ROWS = [{"text": "May 1, 2020", "iso": "2020-05-01"}, {"text": "June 2, 2021", "iso": "2021-06-02"}]


def test_placeholder_not_in_columns_names_it_and_lists_columns(tok):
    tpl = Template(user_pattern="Date: {txt}", answer_field="iso")
    with pytest.raises(TemplateError, match=r"placeholder \{txt\} .* columns: text, iso"):
        tpl.validate(ROWS, tok)
    with pytest.raises(TemplateError, match=r"answer_field 'label' .* columns: text, iso"):
        Template(user_pattern="{text}", answer_field="label").validate(ROWS, tok)


def test_rows_missing_fields_or_with_empty_answers_are_named(tok):
    rows = ROWS + [{"iso": "2000-01-01"}, {"text": "x", "iso": "2000-01-02"}, {"iso": "1"}]
    with pytest.raises(TemplateError, match=r"2 row\(s\) lack a value for text: rows 2, 4 \(0-based\)"):
        Template(user_pattern="{text}", answer_field="iso").validate(rows, tok)
    rows = ROWS + [{"text": "a", "iso": ""}, {"text": "b", "iso": "  "}]
    with pytest.raises(TemplateError, match=r"2 row\(s\) have an empty 'iso': rows 2, 3"):
        Template(user_pattern="{text}", answer_field="iso").validate(rows, tok)


def test_truncation_warnings_explain_why_the_model_would_not_stop(tok):
    long_answer = [{"text": "May 1, 2020", "iso": "2020-05-01 " * 8}]
    tpl = Template(user_pattern="{text}", answer_field="iso", system="S", max_length=40)
    report = tpl.validate(ROWS + long_answer, tok)
    text = " ".join(report.warnings)
    assert report.n_too_long == 1 and "1 of 3 row(s) are longer than max_length=40" in text
    assert "rows 2" in text and "never learn to stop" in text
    no_room = Template(user_pattern="{text} " + "pad " * 40, answer_field="iso", system="S", max_length=40)
    report = no_room.validate(ROWS, tok)
    assert report.n_no_trained == 2
    assert any("zero trained tokens after truncation" in w for w in report.warnings)


def test_untrained_end_of_turn_is_warned_when_nothing_closes_the_turn(tok):
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}" \
                         "{% if add_generation_prompt %}assistant: {% endif %}"
    bare.eos_token = None
    report = Template(user_pattern="{text}", answer_field="iso").validate(ROWS, bare)
    assert any("end-of-turn token is not trained" in w and "never learn to stop" in w for w in report.warnings)


def test_template_field_errors_name_the_field():
    with pytest.raises(TemplateError, match="train_on='answers'.*allowed: completion, all"):
        Template(train_on="answers")
    with pytest.raises(TemplateError, match="max_length=2"):
        Template(max_length=2)
    with pytest.raises(TemplateError, match=r"placeholder \{0\}"):
        Template(user_pattern="{0}")
    with pytest.raises(TemplateError, match="few-shot example 0 lacks answer"):
        Template(user_pattern="{question}", examples=[{"question": "q"}])
    assert placeholders("{a} and {b} and {a} {{literal}}") == ["a", "b"]


def test_yaml_round_trip(tmp_path):
    tpl = Template(system="S: ünïcode", user_pattern="Q: {q}\nContext: {c}", answer_field="a",
                   examples=[{"q": "1", "c": "x", "a": "y"}], assistant_prefix="A: ", train_on="all",
                   max_length=99)
    path = tpl.save(tmp_path / "t.yaml")
    assert Template.load(path) == tpl
    with pytest.raises(TemplateError, match="unknown template field"):
        Template.from_dict({**tpl.to_dict(), "colour": "red"})


def test_readable_tokens_reassemble_the_text(tok):
    text = "<|im_start|>user\nCafé déjà vu 🙂 naïve<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = readable_tokens(tok, ids)
    assert "".join(p.text for p in pieces) == text
    assert [p.special for p in pieces].count(True) == 2

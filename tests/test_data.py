"""Data loading (JSONL, CSV, lists, datasets), errors with line numbers, splits, teaching tasks."""

import json

import pytest

from sftkit.core.data import DataError, load_rows, split_rows
from sftkit.core.teaching import TASKS, teaching_task


def test_jsonl_csv_json_list_and_dataset(tmp_path):
    rows = [{"q": "a", "a": "1"}, {"q": "b, with comma", "a": "2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.csv").write_text('q,a\na,1\n"b, with comma",2\n')
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.csv", "d.json"):
        assert load_rows(tmp_path / name) == rows, name
    assert load_rows(rows) == rows
    import datasets

    assert load_rows(datasets.Dataset.from_list(rows)) == rows


def test_malformed_and_non_utf8_lines_are_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"q": "a"}\n{"q": "b"}\n{"q": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3 is not valid JSON"):
        load_rows(p)
    p.write_text('{"q": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 is a JSON list, expected an object"):
        load_rows(p)
    p.write_bytes('{"q": "a"}\n{"q": "b"}\n'.encode() + b'{"q": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3 is not UTF-8 \(byte 0xe9"):
        load_rows(p)
    c = tmp_path / "bad.csv"
    c.write_text("q,a\nx,1\ny,2,3\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3 has more values than the header's 2 columns"):
        load_rows(c)
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"row 1 is a str"):
        load_rows([{"q": 1}, "oops"])


def test_split_is_deterministic_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    tr1, ev1 = split_rows(rows, eval_fraction=0.2, seed=3)
    tr2, ev2 = split_rows(rows, eval_fraction=0.2, seed=3)
    assert (tr1, ev1) == (tr2, ev2) and len(ev1) == 20 and len(tr1) == 80
    assert {r["i"] for r in tr1}.isdisjoint({r["i"] for r in ev1})
    assert split_rows(rows, eval_fraction=0.2, seed=4)[1] != ev1
    with pytest.raises(DataError, match="eval_size=100"):
        split_rows(rows, eval_size=100)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_teaching_tasks_are_deterministic_valid_and_scored(name, default_model_folder):
    from transformers import AutoTokenizer

    task = teaching_task(name)
    rows = task.rows()
    assert rows == task.rows() and len(rows) == task.default_size
    inputs = [json.dumps([r[f] for f in task.template.input_fields]) for r in rows]
    assert len(set(inputs)) == len(rows)  # distinct inputs: no eval row is also a training row
    tok = AutoTokenizer.from_pretrained(str(default_model_folder))
    report = task.template.validate(rows[:100], tok)
    assert report.ok, report.warnings
    answer = rows[0][task.template.answer_field]
    assert task.score(answer, rows[0]) == 1.0
    assert task.score(" " + answer + "\n", rows[0]) == 1.0
    assert task.score("I think it is " + answer, rows[0]) == 0.0


def test_intent_scorer_needs_the_exact_json():
    task = teaching_task("intent")
    row = {"message": "m", "label": '{"intent": "refund", "urgent": true}'}
    assert task.score('{"urgent": true, "intent": "refund"}', row) == 1.0
    assert task.score('{"intent": "refund", "urgent": false}', row) == 0.0
    assert task.score("refund, urgent", row) == 0.0
    with pytest.raises(KeyError, match="available: dates, intent"):
        teaching_task("nope")

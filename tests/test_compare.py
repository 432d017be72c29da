"""Prompt vs fine-tune: variants of one base model on the same items (tiny random models)."""

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from sftkit.core.rundata import run_rows
from sftkit.core.teaching import teaching_task

from helpers import tiny_config

TOP_KEYS = {"variants", "pairs", "forgetting"}
VARIANT_KEYS = {"name", "score", "ci", "n"}
PAIR_KEYS = {"a", "b", "diff", "ci", "p_value", "wins", "losses", "ties"}
FORGET_KEYS = {"general_ppl_base", "general_ppl_adapter", "kl"}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Two tiny trained runs on the dates task that differ in seed and steps."""
    from sftkit.engine.train import run_training

    root = tmp_path_factory.mktemp("compare-runs")
    cache = root / "cache"
    cache.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTKIT_CACHE_DIR", str(cache))
        out = []
        for seed, steps in ((1, 4), (2, 6)):
            cfg = tiny_config(tiny_llama_dir, root / "runs", max_steps=steps, seed=seed, eval_every=0,
                              sample_every=0, learning_rate=2e-2)
            result = run_training(cfg)
            assert result.run is not None and result.run.has_adapter()
            out.append(result.run)
    return out


@pytest.fixture
def base(tiny_llama_dir):
    from sftkit.engine.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir), quantization="none", device="cpu")
    return model, tokenizer


def _split(run):
    return run_rows(run.config())


def test_adapter_switching_equals_adapter_alone(runs, base, tiny_llama_dir):
    from sftkit.engine.compare import Variant, compare
    from sftkit.engine.models import load_model

    model, tokenizer = base
    items = _split(runs[0]).eval[:4]
    both = compare([Variant.from_run(runs[0]), Variant.from_run(runs[1])], items, model=model,
                   tokenizer=tokenizer, forgetting=False, batch_size=4)
    for run in runs:
        fresh, tok = load_model(str(tiny_llama_dir), quantization="none", device="cpu")
        alone = compare([Variant.from_run(run)], items, model=fresh, tokenizer=tok, forgetting=False, batch_size=4)
        a, b = both.results[run.name], alone.results[run.name]
        assert [r["output"] for r in a] == [r["output"] for r in b]
        for x, y in zip(a, b):
            assert x["ref_loss"] == pytest.approx(y["ref_loss"], abs=1e-5)
    # the two adapters differ (else the check above would prove nothing about switching)
    la = [r["ref_loss"] for r in both.results[runs[0].name]]
    lb = [r["ref_loss"] for r in both.results[runs[1].name]]
    assert max(abs(x - y) for x, y in zip(la, lb)) > 1e-4


def test_base_variant_under_disabled_adapters_equals_plain_base(runs, base, tiny_llama_dir):
    import torch

    from sftkit.engine.compare import Variant, compare
    from sftkit.engine.models import load_model

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:4]
    tpl = split.template
    with_adapters = compare([Variant.zero_shot(tpl), Variant.from_run(runs[0])], items, model=model,
                            tokenizer=tokenizer, forgetting=False, batch_size=4)
    plain, tok = load_model(str(tiny_llama_dir), quantization="none", device="cpu")
    alone = compare([Variant.zero_shot(tpl)], items, model=plain, tokenizer=tok, forgetting=False, batch_size=4)
    a, b = with_adapters.results["zero-shot"], alone.results["zero-shot"]
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["ref_loss"] for r in a] == pytest.approx([r["ref_loss"] for r in b], abs=1e-5)
    # the caller's model comes back without adapter layers
    assert type(model).__name__ == type(plain).__name__
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_few_shot_examples_from_the_items_are_refused(runs, base):
    from sftkit.engine.compare import Variant, compare

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:4]
    with pytest.raises(ValueError, match="evaluated items"):
        Variant.few_shot(split.template, [split.train[0], items[2]], items=items)
    leaky = Variant.few_shot(split.template, [items[1]])
    with pytest.raises(ValueError, match="example 0 = item 1"):
        compare([leaky], items, model=model, tokenizer=tokenizer, forgetting=False)
    ok = Variant.few_shot(split.template, split.train[:2], items=items)
    assert ok.few_shot is True and len(ok.template.examples) == 2


def test_from_run_needs_an_adapter(tmp_path):
    from sftkit.core.runstore import RunStateError
    from sftkit.engine.compare import Variant

    from helpers import make_run

    with pytest.raises(RunStateError, match="no adapter"):
        Variant.from_run(make_run(tmp_path))


def test_forgetting_is_zero_for_an_untrained_adapter(runs, base, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sftkit.engine.compare import Variant, compare
    from sftkit.engine.models import load_model

    cfg = runs[0].config()
    scratch, _ = load_model(cfg.model.spec, quantization="none", device="cpu")
    fresh = get_peft_model(scratch, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fresh.save_pretrained(str(tmp_path / "untrained"))
    model, tokenizer = base
    split = _split(runs[0])
    untrained = Variant("untrained", split.template, str(tmp_path / "untrained"), False)
    c = compare([untrained, Variant.from_run(runs[1])], split.eval[:2], model=model, tokenizer=tokenizer,
                general_text_tokens=128)
    f0, f1 = c.forgetting["untrained"], c.forgetting[runs[1].name]
    for f in (f0, f1):
        assert all(math.isfinite(f[k]) for k in FORGET_KEYS)
    assert abs(f0["kl"]) < 1e-6
    assert f0["general_ppl_adapter"] == pytest.approx(f0["general_ppl_base"], rel=1e-6)
    assert f1["kl"] > 0


def test_results_summary_dict_and_csv(runs, base, tmp_path):
    from sftkit.engine.compare import Variant, compare

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:6]
    seen = []
    variants = [Variant.zero_shot(split.template), Variant.few_shot(split.template, split.train[:2]),
                Variant.from_run(runs[0])]
    c = compare(variants, items, model=model, tokenizer=tokenizer, scorer=teaching_task("dates").score,
                batch_size=4, general_text_tokens=64, progress=lambda d, t: seen.append((d, t)))
    assert c.complete and c.variants == [v.name for v in variants] and c.items == items
    assert seen[-1] == (18, 18)
    r = c.results[runs[0].name][0]
    assert {"output", "latency", "tokens", "score", "exact_match", "chrf", "rouge_l", "ref_loss", "ref_ppl"} <= set(r)
    assert r["ref_ppl"] == pytest.approx(math.exp(r["ref_loss"]))
    s = c.summary()[runs[0].name]
    assert s["n"] == 6 and 0 <= s["score_ci"][0] <= s["score"] <= s["score_ci"][1] <= 1 and s["tokens_per_s"] > 0
    pairs = c.pairs()
    assert len(pairs) == 3 and pairs[0]["mcnemar"] is not None and "chrf" in pairs[0]["diffs"]
    assert "zero-shot" in c.verdict("zero-shot", runs[0].name)
    assert "zero-shot" in c.verdict(runs[0].name, "zero-shot")

    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert set(d) == TOP_KEYS
    for v in d["variants"]:
        assert set(v) == VARIANT_KEYS and isinstance(v["name"], str) and isinstance(v["score"], float)
        assert isinstance(v["ci"], list) and len(v["ci"]) == 2 and v["n"] == 6
    for p in d["pairs"]:
        assert set(p) == PAIR_KEYS and isinstance(p["diff"], float) and len(p["ci"]) == 2
        assert isinstance(p["p_value"], float) and p["wins"] + p["losses"] + p["ties"] == 6
    assert set(d["forgetting"]) == {runs[0].name}
    assert set(d["forgetting"][runs[0].name]) == FORGET_KEYS

    path = c.to_csv(tmp_path / "out.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(items) * len(variants)
    assert {"input", "reference", "output", "score", "chrf"} <= set(rows[0])
    assert rows[0]["reference"] == items[0]["iso"]


def test_cache_is_reused(runs, base, tmp_path):
    from sftkit.engine.compare import CACHE_FILE, Variant, compare

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:4]
    variants = [Variant.zero_shot(split.template), Variant.from_run(runs[0])]
    t = time.perf_counter()
    first = compare(variants, items, model=model, tokenizer=tokenizer, forgetting=False, cache=tmp_path)
    t_first = time.perf_counter() - t
    lines = (tmp_path / CACHE_FILE).read_bytes()
    assert len(lines.splitlines()) == len(items) * len(variants)
    t = time.perf_counter()
    second = compare(variants, items, model=model, tokenizer=tokenizer, forgetting=False, cache=tmp_path)
    t_second = time.perf_counter() - t
    assert (tmp_path / CACHE_FILE).read_bytes() == lines
    assert second.results == first.results
    assert t_second < t_first
    # one more item: only it is generated and appended
    compare(variants, split.eval[:5], model=model, tokenizer=tokenizer, forgetting=False, cache=tmp_path)
    assert len((tmp_path / CACHE_FILE).read_bytes().splitlines()) == 5 * len(variants)


def test_stop_returns_an_incomplete_comparison(runs, base):
    from sftkit.engine.compare import Variant, compare

    model, tokenizer = base
    split = _split(runs[0])
    stop = threading.Event()

    def progress(done, total):
        if done >= 2 * 2:  # the first batch, both variants
            stop.set()

    c = compare([Variant.zero_shot(split.template), Variant.from_run(runs[0])], split.eval[:8], model=model,
                tokenizer=tokenizer, batch_size=2, progress=progress, stop=stop)
    assert not c.complete
    assert [len(r) for r in c.results.values()] == [2, 2]
    assert c.forgetting == {}
    assert set(c.to_dict()) == TOP_KEYS and c.to_dict()["variants"][0]["n"] == 2


def test_cli_compare_json(runs, cache):
    env = dict(os.environ, SFTKIT_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-m", "sftkit", "compare", str(runs[0].path), "--n", "8", "--json",
                          "--few-shot", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(data) == TOP_KEYS
    assert [v["name"] for v in data["variants"]] == ["zero-shot", "few-shot", runs[0].name]
    assert all(v["n"] == 8 for v in data["variants"])
    assert len(data["pairs"]) == 3 and set(data["pairs"][0]) == PAIR_KEYS
    assert set(data["forgetting"][runs[0].name]) == FORGET_KEYS
    assert (runs[0].path / "compare").is_dir()


# ---- the state behind the view, and the view (headless) ----------------------------------------------
HOSTILE = "<img src=x onerror=alert(1)>"


def _items(run, n=8):
    rows = _split(run).eval[:n]
    rows[0] = {**rows[0], "text": HOSTILE}  # markup in an input must reach the tables as text
    return rows


def _parity(output, row):  # a binary score that depends on what each variant wrote
    return float(len(output) % 2 == 0)


def test_session_filters_partition_the_items(runs, base):
    from sftkit.engine.compare import Variant
    from sftkit.state import ComparisonSession

    model, tok = base
    tpl = runs[0].config().resolved_template()
    session = ComparisonSession([Variant.zero_shot(tpl), Variant.from_run(runs[1])], _items(runs[0]),
                                model=model, tokenizer=tok, scorer=_parity, forgetting=False, page_size=3)
    events = []
    session.on_change(events.append)
    session.start()
    assert session.wait(120) and session.error is None and session.result.complete
    assert events[-1] == "result" and "progress" in events
    everything = session.item_rows("all")
    wins, losses = session.item_rows("wins"), session.item_rows("losses")
    flips, errors = session.item_rows("flips"), session.item_rows("errors")
    index = lambda rows: {r["index"] for r in rows}  # noqa: E731
    assert len(everything) == 8
    assert index(flips) == index(wins) | index(losses) and not index(wins) & index(losses)
    assert index(errors) == {r["index"] for r in everything if min(r["scores"].values()) == 0}
    first, pages = session.page(everything, 0)
    assert len(first) == 3 and pages == 3 and len(session.page(everything, 2)[0]) == 2
    with pytest.raises(ValueError, match="filter='some' is not allowed"):
        session.item_rows("some")


def test_compare_view_renders_filters_pages_and_exports(runs, base, tmp_path):
    from sftkit.engine.compare import Variant
    from sftkit.ui import CompareView

    model, tok = base
    tpl = runs[0].config().resolved_template()
    view = CompareView([Variant.zero_shot(tpl), Variant.from_run(runs[1])], _items(runs[0]), model=model,
                       tokenizer=tok, scorer=_parity, page_size=3)
    assert view.wait(120) and view.result is not None
    deadline = time.monotonic() + 30
    while not view.pairs.value and time.monotonic() < deadline:  # drawn from the comparison's thread
        time.sleep(0.05)
    assert len(view.charts.children) >= 3  # headline, chrF, ROUGE-L (+ perplexity)
    assert "verdict" in view.pairs.value and "KL" in view.forgetting.value
    assert view.progress.value == view.progress.max and view.page.max == 3
    assert view.items.value.count("<tr>") == 1 + 3
    for text in (view.items.value, view.report_html()):  # item 0 is on page 1
        assert HOSTILE not in text and html_escaped(HOSTILE) in text
    view.page.value = 3
    assert view.items.value.count("<tr>") == 1 + 2
    view.filter.value = "errors"
    assert "show" in view.filter.description
    csv_path = view.export_csv(tmp_path / "c.csv")
    assert sum(1 for _ in csv.reader(open(csv_path))) == 1 + 8 * 2
    report = view.export_html(tmp_path / "c.html").read_text()
    assert "plotly" in report.lower() and "Paired comparisons" in report


def test_compare_view_stop_keeps_what_is_done(runs, base):
    from sftkit.engine.compare import Variant
    from sftkit.ui import CompareView

    model, tok = base
    tpl = runs[0].config().resolved_template()
    view = CompareView([Variant.zero_shot(tpl), Variant.from_run(runs[0])], _split(runs[0]).eval[:8],
                       model=model, tokenizer=tok, batch_size=2, start=False)
    view.session.on_change(lambda e: view.session.stop() if e == "progress" else None)  # Stop after the first batch
    view.start()
    assert view.wait(120) and view.result is not None and not view.result.complete
    view.draw()
    assert "stopped" in view.message.value and view.result.n < 8


def html_escaped(text):
    import html

    return html.escape(text)



def test_compare_leaves_the_callers_model_and_tokenizer_as_they_were(runs, base):
    from sftkit.engine.compare import Variant, compare

    model, tok = base
    model.train()
    side, pad = tok.padding_side, tok.pad_token
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    tpl = runs[0].config().resolved_template()
    with pytest.raises(FileNotFoundError):  # the second adapter is missing: nothing may stay attached
        compare([Variant.from_run(runs[0]), Variant("gone", tpl, str(runs[0].path / "nowhere"), False)],
                _split(runs[0]).eval[:2], model=model, tokenizer=tok, forgetting=False)
    compare([Variant.zero_shot(tpl), Variant.from_run(runs[1])], _split(runs[0]).eval[:2], model=model,
            tokenizer=tok, forgetting=False)
    assert {n for n, _ in model.named_parameters()} == names  # no adapter layers left behind
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads and model.training
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_cli_cross_task_scores_the_adapter_on_the_other_task(runs):
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "sftkit", "compare", str(runs[0].path), "--data", "teaching:intent",
                          "--n", "6", "--few-shot", "2", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert [v["name"] for v in data["variants"]] == ["zero-shot", "few-shot", runs[0].name]
    assert all(v["n"] == 6 for v in data["variants"]) and len(data["pairs"]) == 3
    assert set(data["forgetting"][runs[0].name]) == FORGET_KEYS



def test_the_cache_key_follows_what_the_answers_depend_on(runs, base, tmp_path):
    import copy
    import shutil

    from sftkit.engine.compare import Variant

    model, tok = base
    tpl = runs[0].config().resolved_template()
    zero = Variant.zero_shot(tpl)
    key = zero.fingerprint(model, tok)
    assert zero.fingerprint(model, tok) == key
    other_chat = copy.deepcopy(tok)
    other_chat.chat_template = (tok.chat_template or "") + "{# changed #}"
    assert zero.fingerprint(model, other_chat) != key  # another chat template renders other prompts
    assert Variant.zero_shot(tpl, max_new_tokens=8).fingerprint(model, tok) != key
    adapter = tmp_path / "adapter"
    shutil.copytree(runs[0].adapter_dir, adapter)
    tuned = Variant("tuned", tpl, str(adapter), False)
    before = tuned.fingerprint(model, tok)
    shutil.copy2(runs[1].adapter_dir / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    assert tuned.fingerprint(model, tok) != before  # other adapter weights: other answers


# ---- label tasks, the reference loss, where generation ends -------------------------------------------
def _first_char(text):  # a label function: the class an answer names (here: its first character)
    return text.strip()[:1] or "(empty)"


def test_label_tasks_get_macro_f1_per_variant_per_pair_and_in_exports(runs, base, tmp_path):
    from sftkit.core.textmetrics import macro_f1
    from sftkit.engine.compare import Variant, compare
    from sftkit.ui.compare_figures import summary_figures

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:8]
    variants = [Variant.zero_shot(split.template), Variant.from_run(runs[0])]
    c = compare(variants, items, model=model, tokenizer=tokenizer, labels=_first_char, forgetting=False)
    assert c.labelled and c.labels == sorted({_first_char(r["iso"]) for r in items})
    for v in c.variants:
        rows = c.results[v]
        assert [r["ref_label"] for r in rows] == [_first_char(r["iso"]) for r in items]
        assert [r["label"] for r in rows] == [_first_char(r["output"]) for r in rows]
        want = macro_f1([r["label"] for r in rows], [r["ref_label"] for r in rows], c.labels)
        s = c.summary()[v]
        assert s["macro_f1"] == pytest.approx(want) and s["macro_f1_ci"][0] <= want <= s["macro_f1_ci"][1]
    d = c.pairs()[0]["diffs"]["macro_f1"]
    assert d.diff == pytest.approx(c.macro_f1(c.variants[0]) - c.macro_f1(c.variants[1]))
    data = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert all({"macro_f1", "macro_f1_ci"} <= set(v) for v in data["variants"])
    assert {"macro_f1_diff", "macro_f1_ci"} <= set(data["pairs"][0])
    with open(c.to_csv(tmp_path / "labels.csv"), newline="", encoding="utf-8") as fh:
        first = next(csv.DictReader(fh))
    assert first["ref_label"] == _first_char(items[0]["iso"]) and "bleu" in first
    titles = [f.layout.title.text for f in summary_figures(c)]
    assert any("macro-F1" in t for t in titles) and "sentence BLEU, mean over items (95% CI)" in titles
    # given classes are what macro-F1 averages over
    fixed = compare(variants[:1], items, model=model, tokenizer=tokenizer, labels=_first_char, classes=["1", "2", "z"],
                    forgetting=False)
    assert fixed.labels == ["1", "2", "z"]


def test_the_intent_task_names_its_classes():
    task = teaching_task("intent")
    assert task.label('{"intent": "refund", "urgent": false}') == "refund"
    assert task.label(" not json ") == task.label('{"intent": "weather"}') == task.label("[1]") == "(invalid)"
    assert set(task.classes) == {task.label(r["label"]) for r in task.rows(200)}
    assert teaching_task("dates").label is None


def test_reference_loss_scores_the_answer_even_when_the_template_trains_on_everything(runs, base):
    from sftkit.core.template import Template
    from sftkit.engine.compare import Variant, compare

    model, tokenizer = base
    split = _split(runs[0])
    items = split.eval[:4]
    everything = Template(**{**split.template.to_dict(), "train_on": "all"})
    c = compare([Variant.zero_shot(split.template, name="answer"), Variant.zero_shot(everything, name="all")],
                items, model=model, tokenizer=tokenizer, forgetting=False)
    assert c.values("answer", "ref_loss") == pytest.approx(c.values("all", "ref_loss"))


def test_generation_ends_at_every_stop_token_the_model_names(base):
    from sftkit.engine.compare import _stop_ids

    model, tokenizer = base
    before = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [7, 9]
        assert _stop_ids(model, tokenizer) == {7, 9, tokenizer.eos_token_id}
        model.generation_config.eos_token_id = None
        assert _stop_ids(model, tokenizer) == {tokenizer.eos_token_id}
    finally:
        model.generation_config.eos_token_id = before


# ---- end to end on the default model ------------------------------------------------------------------
@pytest.mark.slow
def test_a_short_run_beats_zero_shot_on_60_fresh_items_and_forgetting_is_finite(tmp_path, default_model_folder):
    """The question sftkit answers, through the real entry points: ``sftkit train`` (6 steps of the example
    config on the dates task, about 30 s here) then ``sftkit compare --data teaching:dates --n 60 --json``
    on fresh rows the run never trained on (about a minute). Measured: zero-shot 2%, the adapter 85%."""
    from helpers import linked_cache

    env = dict(os.environ, SFTKIT_CACHE_DIR=str(linked_cache(tmp_path / "cache", default_model_folder)))
    config = tmp_path / "run.yaml"
    subprocess.run([sys.executable, "-m", "sftkit", "example-config", "-o", str(config)], check=True, env=env,
                   timeout=60)
    from sftkit.core.runconfig import RunConfig

    cfg = RunConfig.load(config).with_changes(training={"max_steps": 6, "eval_every": 0, "sample_every": 0})
    cfg.save(config)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "sftkit", "train", str(config), "--run-dir", str(run)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "sftkit", "compare", str(run), "--data", "teaching:dates", "--n", "60",
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert [v["name"] for v in data["variants"]] == ["zero-shot", "run"] and all(v["n"] == 60 for v in data["variants"])
    (pair,) = data["pairs"]
    assert (pair["a"], pair["b"]) == ("zero-shot", "run")
    assert pair["diff"] < 0 and pair["ci"][1] < 0, pair  # the adapter is better; the CI excludes 0
    assert pair["p_value"] < 0.01 and pair["losses"] > pair["wins"], pair
    f = data["forgetting"]["run"]
    assert all(math.isfinite(f[k]) and f[k] >= 0 for k in FORGET_KEYS), f
    assert f["general_ppl_adapter"] > 1 and f["general_ppl_base"] > 1

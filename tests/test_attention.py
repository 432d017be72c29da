"""Attention capture, summaries, diffs and the AttentionView on real models."""

import numpy as np
import plotly.io as pio
import pytest
import torch

import sftkit
from sftkit.core.errors import SftkitError
from sftkit.core.template import Segment, Template
from sftkit.core.tokens import TokenPiece
from sftkit.engine.anatomy import inspect_model
from sftkit.engine.attention import (
    AttentionCapture,
    adapter_diff,
    adapter_disabled,
    capture_attention,
    capture_row,
    diff_captures,
)
from sftkit.engine.freeze import FreezePlan
from sftkit.ui import AttentionView

from helpers import eager_attentions

TEXT = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\nParis"


@pytest.fixture()
def tiny(tiny_llama_dir):
    return sftkit.load_model(str(tiny_llama_dir))


def check_probabilities(cap):
    p = cap.probs.astype(np.float32)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-3)
    upper = np.triu(np.ones((cap.n_tokens, cap.n_tokens), bool), k=1)
    assert np.all(p[..., upper] == 0), "a token attends to a later token"


def test_capture_matches_output_attentions_and_keeps_the_fast_kernel(tiny):
    model, tok = tiny
    assert model.config._attn_implementation == "sdpa"
    cap = capture_attention(model, tok, TEXT)
    assert model.config._attn_implementation == "sdpa"  # switched back after the capture
    check_probabilities(cap)
    ref = eager_attentions(model, cap.input_ids)
    np.testing.assert_allclose(cap.probs.astype(np.float32), ref, atol=1e-3)
    assert cap.probs.dtype == np.float16 and cap.probs.shape == (2, 4, len(cap.input_ids), len(cap.input_ids))
    assert "".join(t.text for t in cap.tokens) == TEXT
    assert [t.special for t in cap.tokens].count(True) == 3


def test_layer_subset_and_gqa_head_count(tiny):
    model, tok = tiny
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    cap = capture_attention(model, tok, TEXT, layers=[1])
    assert cap.layers == [1] and cap.n_heads == 4  # query heads, not the 2 key/value heads
    with pytest.raises(ValueError, match="layers \\[7\\] don't exist; the model has layers 0 to 1"):
        capture_attention(model, tok, TEXT, layers=[7])


@pytest.mark.slow
def test_default_model_full_and_4bit(default_model_folder):
    for quant in ("none", "4bit"):
        model, tok = sftkit.load_model("default", quantization=quant)
        cap = capture_attention(model, tok, TEXT)
        assert cap.probs.shape[:2] == (30, 9)  # 9 query heads share 3 key/value heads
        check_probabilities(cap)
        if quant == "none":
            ref = eager_attentions(model, cap.input_ids)
            np.testing.assert_allclose(cap.probs.astype(np.float32), ref, atol=1e-3)


def test_adapter_diff_is_zero_when_disabled_and_moves_after_a_training_step(tiny):
    model, tok = tiny
    a = inspect_model(model)
    peft_model = FreezePlan.preset("lora_attention", a, rank=4).apply(model, a)
    with adapter_disabled(peft_model):
        base1 = capture_attention(peft_model, tok, TEXT)
    with adapter_disabled(peft_model):
        base2 = capture_attention(peft_model, tok, TEXT)
    assert np.all(diff_captures(base1, base2).delta == 0)
    assert np.all(adapter_diff(peft_model, tok, TEXT).delta == 0)  # fresh LoRA: B = 0
    # one real training step on the adapters
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    d = adapter_diff(peft_model, tok, TEXT)
    assert np.abs(d.delta).max() > 1e-3
    change = d.change()
    assert change.shape == (2, 4) and change.max() > 0 and change.max() <= 1
    with adapter_disabled(peft_model):
        again = capture_attention(peft_model, tok, TEXT)
    assert np.all(diff_captures(base1, again).delta == 0)  # disabling really gives the base model


def test_summaries_on_known_maps():
    T = 4
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    prev = np.zeros((T, T))
    prev[0, 0] = 1
    for i in range(1, T):
        prev[i, i - 1] = 1
    probs = np.stack([np.stack([uniform, prev])]).astype(np.float16)  # 1 layer, 2 heads
    cap = AttentionCapture(list(range(T)), [TokenPiece(i, str(i), False) for i in range(T)], [0], probs,
                           segments=(Segment("system", 0, 2), Segment("user", 2, 3), Segment("answer", 3, 4)))
    np.testing.assert_allclose(cap.summary("entropy")[0], [1.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(cap.summary("previous")[0], [np.mean([1 / 2, 1 / 3, 1 / 4]), 1.0], atol=1e-3)
    np.testing.assert_allclose(cap.summary("sink")[0], [np.mean([1, 1 / 2, 1 / 3, 1 / 4]), 0.5], atol=1e-3)
    # from the answer token (row 3): system span = tokens 0-1
    np.testing.assert_allclose(cap.summary("system")[0], [0.5, 0.0], atol=1e-3)
    np.testing.assert_allclose(cap.summary("user")[0], [0.25, 1.0], atol=1e-3)


def test_capture_of_a_template_row_carries_its_spans(tiny):
    model, tok = tiny
    tpl = Template(system="Rewrite dates.", user_pattern="{text}", answer_field="iso",
                   examples=[{"text": "May 1, 2020", "iso": "2020-05-01"}])
    cap = capture_row(model, tok, tpl, {"text": "June 2, 2021", "iso": "2021-06-02"})
    assert {"system", "example", "user", "answer"} <= set(cap.available_summaries())
    for name in cap.available_summaries():
        assert cap.summary(name).shape == (2, 4)


def test_different_tokens_cannot_be_diffed_map_by_map(tiny):
    model, tok = tiny
    a = capture_attention(model, tok, "one two three")
    b = capture_attention(model, tok, "one two three four")
    with pytest.raises(ValueError, match="different tokens"):
        diff_captures(a, b)


# ---- the view ---------------------------------------------------------------------------
def test_view_grid_click_sliders_window_and_row(tiny):
    model, tok = tiny
    cap = capture_attention(model, tok, TEXT)
    view = AttentionView(cap, max_window=16)
    T = cap.n_tokens
    assert len(view.cells) == 2 * 4 and view.window == (T - 16, T)
    view.cells[(1, 2)].click()
    assert (view.layer.value, view.head.value) == (1, 2)
    lo, hi = view.window
    shown = np.asarray(view.heatmap.data[0].z, dtype=np.float32)
    np.testing.assert_array_equal(shown, cap.head(1, 2)[lo:hi, lo:hi])
    assert shown.shape == (16, 16) and view.heatmap.data[0].x[0].startswith(f"{lo}:")
    view.window_start.value = 0
    np.testing.assert_array_equal(np.asarray(view.heatmap.data[0].z), cap.head(1, 2)[:16, :16])
    view.layer.value = 0
    view.head.value = "mean"
    np.testing.assert_allclose(np.asarray(view.heatmap.data[0].z),
                               cap.probs[0, :, :16, :16].astype(np.float32).mean(0), atol=1e-6)
    view.query.value = 5
    np.testing.assert_allclose(np.asarray(view.row_plot.data[0].y), cap.head(0, "mean")[5, :16], atol=1e-6)
    view.summary.value = "previous"
    assert view.cells[(0, 0)].tooltip.startswith("layer 0, head 0: previous")


def test_diff_view_and_static_export(tiny, tmp_path):
    model, tok = tiny
    a = capture_attention(model, tok, "The cat sat on the mat.", label="prompt A")
    model.model.layers[1].self_attn.q_proj.weight.data.mul_(3.0)  # a changed model, same tokens
    b = capture_attention(model, tok, "The cat sat on the mat.", label="prompt B")
    view = AttentionView(diff_captures(a, b))
    assert view.summary.value == "change"
    view.cells[(1, 0)].click()
    np.testing.assert_allclose(np.asarray(view.heatmap.data[0].z), b.head(1, 0) - a.head(1, 0), atol=1e-6)
    assert view.grid_values()[0].max() == 0 and view.grid_values()[1].max() > 0  # only layer 1 moved
    out = view.export_html(tmp_path / "attention.html")
    html = out.read_text()
    assert "plotly" in html.lower() and html.count("<div") >= 3


def test_slice_payload_is_bounded_for_long_prompts(tiny):
    model, tok = tiny
    ids = tok("word " * 600, add_special_tokens=False)["input_ids"][:512]
    view = AttentionView(capture_attention(model, tok, input_ids=ids))
    payload = len(pio.to_json(view.heatmap.data[0].to_plotly_json())) + len(pio.to_json(view.row_plot.data[0].to_plotly_json()))
    assert payload < 1_000_000


@pytest.mark.slow
def test_default_model_adapter_diff(default_model_folder):
    model, tok = sftkit.load_model("default")
    a = inspect_model(model)
    peft_model = FreezePlan.preset("lora_attention", a, rank=8).apply(model, a)
    assert np.all(adapter_diff(peft_model, tok, TEXT).delta == 0)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    d = adapter_diff(peft_model, tok, TEXT)
    assert d.change().shape == (30, 9) and d.change().max() > 0
    with adapter_disabled(peft_model):
        base = capture_attention(peft_model, tok, TEXT)
    assert np.all(diff_captures(base, d.before).delta == 0)


# ---- the size guard ---------------------------------------------------------------------
def count_forward_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_capture_over_the_limit_refuses_before_any_compute_and_names_the_way_out(tiny):
    from sftkit.engine.attention import AttentionTooLargeError, estimate_capture_bytes

    model, tok = tiny
    calls = count_forward_calls(model)
    T = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    need = estimate_capture_bytes(T, n_layers=2, n_heads=4)
    with pytest.raises(AttentionTooLargeError) as err:
        capture_attention(model, tok, TEXT, max_bytes=need - 1)
    assert calls == [], "the forward pass ran before the size check"
    msg = str(err.value)
    for part in (f"{T} tokens", "2 layers", "4 heads", "GiB", f"max_bytes={need - 1}", "layers=", "max_bytes="):
        assert part in msg, (part, msg)
    assert isinstance(err.value, ValueError)
    # The way out the message names: one layer fits under the same limit.
    cap = capture_attention(model, tok, TEXT, layers=[1], max_bytes=need - 1)
    assert cap.layers == [1] and cap.probs.nbytes <= estimate_capture_bytes(T, n_layers=1, n_heads=4)
    assert calls == [1]


def test_the_default_limit_is_a_module_constant_read_at_call_time(tiny, monkeypatch):
    from sftkit.engine import attention

    model, tok = tiny
    assert attention.MAX_CAPTURE_BYTES == 2**30
    monkeypatch.setattr(attention, "MAX_CAPTURE_BYTES", 1000)
    calls = count_forward_calls(model)
    with pytest.raises(attention.AttentionTooLargeError, match=r"limit .*GiB"):
        capture_attention(model, tok, TEXT)
    tpl = Template(system="Rewrite dates.", user_pattern="{text}", answer_field="iso")
    with pytest.raises(attention.AttentionTooLargeError):
        capture_row(model, tok, tpl, {"text": "June 2, 2021", "iso": "2021-06-02"})
    assert calls == []
    cap = capture_attention(model, tok, TEXT, max_bytes=10 * 2**20)  # an explicit limit wins
    assert cap.probs.shape[0] == 2


def test_adapter_diff_checks_the_size_of_both_captures_and_the_difference_first(tiny):
    from sftkit.engine.attention import AttentionTooLargeError, estimate_capture_bytes

    model, tok = tiny
    T = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    one = estimate_capture_bytes(T, n_layers=2, n_heads=4)
    both = estimate_capture_bytes(T, n_layers=2, n_heads=4, diff=True)
    assert both > one
    calls = count_forward_calls(model)
    with pytest.raises(AttentionTooLargeError, match="layers="):
        adapter_diff(model, tok, TEXT, max_bytes=both - 1)  # one capture would fit, the diff does not
    assert calls == []
    d = adapter_diff(model, tok, TEXT, max_bytes=both)
    assert d.delta.shape == (2, 4, T, T) and np.all(d.delta == 0)


def test_view_from_model_shows_the_size_error_in_its_message_area(tiny):
    model, tok = tiny
    view = AttentionView.from_model(model, tok, TEXT, max_bytes=1000)
    assert view.error is not None and view.data is None
    assert "layers=" in view.info.value and "max_bytes=" in view.info.value
    assert view.info in view.widget.children
    view.refresh_map()  # nothing to draw: no crash
    with pytest.raises(SftkitError, match="nothing captured"):
        view.select(0, 0)  # a clear error, not an AttributeError from a half-built view
    ok = AttentionView.from_model(model, tok, TEXT, layers=[0], max_window=16)
    assert ok.error is None and ok.capture.layers == [0] and ok.window[1] - ok.window[0] == 16
    diff = AttentionView.from_model(model, tok, TEXT, compare_adapter=True)
    assert diff.diff and diff.summary.value == "change"

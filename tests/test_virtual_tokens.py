"""What a prompt method changes, made visible: its virtual tokens in the template preview, in the
attention capture (with the share of attention they get) and in the base-vs-adapter difference; and
the parameter counter of every method. Real peft models on the tiny random Llama; every expected
value comes from a plain forward with ``output_attentions`` or from the model's own parameters."""

import html
import re

import numpy as np
import pytest
import torch

import sftkit
from sftkit.core.plan import PRESETS
from sftkit.core.runconfig import RunConfig
from sftkit.core.template import Template
from sftkit.engine.anatomy import inspect_model
from sftkit.engine.attention import adapter_diff, capture_attention, capture_row, virtual_positions
from sftkit.engine.freeze import FreezePlan
from sftkit.state.prompt_draft import PromptDraft, VirtualTokens
from sftkit.ui import AttentionView, PromptBuilder
from sftkit.ui.render import tokens_html

from helpers import eager_attentions

N = 5  # virtual tokens
ROWS = [{"q": "What is 2+2? <script>alert(1)</script>", "a": "4 & <b>four</b>"}, {"q": "Capital of France?", "a": "Paris"}]
TEMPLATE = Template(user_pattern="{q}", answer_field="a")


def method_model(model_dir, method, *, seed=0, q_scale=None, **settings):
    """A fresh tiny Llama with ``method`` applied as the run engine does (plan -> freeze -> peft).
    ``q_scale``: every query projection multiplied by it first: 0 makes every attention row exactly
    uniform over the keys it sees (the expected values can then be written down by hand), a large
    one makes the attention sharp."""
    model, tok = sftkit.load_model(str(model_dir))
    if q_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_proj" in name:
                    p.mul_(q_scale)
    a = inspect_model(model)
    torch.manual_seed(seed)
    return FreezePlan.preset(method, a, virtual_tokens=N, **settings).apply(model, a), tok


def rendered(tok):
    return TEMPLATE.render(ROWS[0], tok)


# ---- the capture knows the virtual positions ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_soft_prompt_positions_are_queries_and_keys_in_front_of_the_text(method, tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, method)
    r = rendered(tok)
    T = len(r.input_ids)
    assert virtual_positions(model) == (N, method)
    cap = capture_row(model, tok, TEMPLATE, ROWS[0])
    ref = eager_attentions(model, r.input_ids)
    assert ref.shape == (2, 4, N + T, N + T)  # peft prepends N embeddings: queries and keys
    assert cap.probs.shape == ref.shape and cap.n_virtual == N and cap.method == method and cap.n_real == T
    np.testing.assert_allclose(cap.probs.astype(np.float32), ref, atol=2e-3)
    assert [t.text for t in cap.tokens[:N]] == [f"<v{i}>" for i in range(N)]
    assert [t.id for t in cap.real_tokens] == r.input_ids and cap.input_ids == r.input_ids
    # the template's spans moved behind the virtual positions
    answer = next(s for s in r.segments if s.role == "answer")
    assert (answer.start + N, answer.end + N) in cap.span("answer")
    # the share of each real query's attention that goes to the soft prompt, against the reference
    want = ref[:, :, N:, :N].sum(-1)  # [layers, heads, real queries]
    np.testing.assert_allclose(cap.virtual_share(per_query=True), want, atol=3e-3)
    np.testing.assert_allclose(cap.virtual_share(), want.mean(-1), atol=3e-3)
    np.testing.assert_allclose(cap.virtual_share(per_query=True) + cap.real_share(per_query=True), 1.0, atol=3e-3)
    assert 0.05 < float(want.mean()) < 0.95  # a real share, neither nothing nor everything
    # the answer-span summary reads the real answer's rows and columns, not positions shifted by N
    rows = [i + N for a, b in [(s.start, s.end) for s in r.segments if s.role in ("answer", "end")] for i in range(a, b)]
    np.testing.assert_allclose(cap.summary("answer"), ref[:, :, rows][:, :, :, rows].sum(-1).mean(-1), atol=3e-3)
    assert "virtual" in cap.available_summaries() and "not text" in cap.note


def test_prefix_positions_are_keys_only_and_their_rows_stay_empty(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "prefix_tuning")
    ids = rendered(tok).input_ids
    T = len(ids)
    cap = capture_attention(model, tok, input_ids=ids, layers=[1])
    ref = eager_attentions(model, ids)[[1]]
    assert ref.shape == (1, 4, T, N + T)  # keys and values in front, no extra queries
    assert cap.probs.shape == (1, 4, N + T, N + T) and cap.n_virtual == N and not cap.virtual_queries
    assert not cap.probs[:, :, :N].any()  # the prefix positions query nothing
    np.testing.assert_allclose(cap.probs[:, :, N:].astype(np.float32), ref, atol=2e-3)
    np.testing.assert_allclose(cap.virtual_share(per_query=True), ref[..., :N].sum(-1), atol=3e-3)
    np.testing.assert_allclose(cap.virtual_share(per_query=True) + cap.real_share(per_query=True), 1.0, atol=3e-3)
    assert "keys and values in every layer" in cap.note


def test_capture_size_counts_the_virtual_positions(tiny_llama_dir):
    from sftkit.engine.attention import AttentionTooLargeError, estimate_capture_bytes

    model, tok = method_model(tiny_llama_dir, "prompt_tuning")
    ids = rendered(tok).input_ids
    T = len(ids)
    fits_without = estimate_capture_bytes(T, 2, 4)  # enough for the text alone, not for the soft prompt too
    with pytest.raises(AttentionTooLargeError, match=f"for {T} tokens \\+ {N} virtual positions \\(prompt_tuning\\)"):
        capture_attention(model, tok, input_ids=ids, max_bytes=fits_without)


def test_llama_adapter_capture_keeps_the_text_and_records_the_gates(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "adaption_prompt", top_n=1)
    ids = rendered(tok).input_ids
    gate = next(p for n, p in model.named_parameters() if n.endswith("adaption_gate"))
    with torch.no_grad():
        gate.fill_(0.25)  # as after some training: the prompt now changes layer 1's output
    cap = capture_attention(model, tok, input_ids=ids)
    assert cap.n_virtual == 0 and cap.probs.shape == (2, 4, len(ids), len(ids))
    np.testing.assert_allclose(cap.probs.astype(np.float32), eager_attentions(model, ids), atol=2e-3)
    assert cap.prompt_gates == {1: pytest.approx(0.25)} and "layer 1 +0.250" in cap.note
    diff = adapter_diff(model, tok, input_ids=ids)  # the base: LLaMA-Adapter's modules swapped out
    assert diff.delta.shape == (2, 4, len(ids), len(ids)) and diff.before.prompt_gates == {}
    np.testing.assert_allclose(diff.before.probs.astype(np.float32), eager_attentions(model.get_base_model(), ids), atol=2e-3)


# ---- base vs adapter ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_adapter_diff_compares_the_real_tokens_and_counts_the_moved_attention(method, tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, method)
    ids = rendered(tok).input_ids
    T = len(ids)
    with model.disable_adapter():
        base = eager_attentions(model, ids)
    tuned = eager_attentions(model, ids)[..., -T:, :]  # the real tokens' queries over every key
    diff = adapter_diff(model, tok, input_ids=ids)
    assert diff.delta.shape == (2, 4, T, T) and diff.has_virtual and "real tokens only" in diff.note
    assert diff.before.n_virtual == diff.after.n_virtual == 0 and diff.full[1].n_virtual == N
    np.testing.assert_allclose(diff.delta, tuned[..., N:] - base, atol=3e-3)
    share = tuned[..., :N].sum(-1)
    np.testing.assert_allclose(diff.virtual_share(), share.mean(-1), atol=3e-3)
    tv = 0.5 * (np.abs(tuned[..., N:] - base).sum(-1) + share).mean(-1)  # total variation over all keys
    np.testing.assert_allclose(diff.change(), tv, atol=3e-3)


def uniform_summary(name, n, T, segments=()):
    """A summary of a capture whose every row is uniform over its keys, by hand: real query i (0-based
    in the text) sees n virtual keys and the real tokens 0..i, so each key gets 1 / (n + i + 1)."""
    if name == "entropy":
        return 1.0
    if name == "sink":  # the first real token
        return np.mean([1 / (n + i + 1) for i in range(T)])
    if name == "previous":
        return np.mean([1 / (n + i + 1) for i in range(1, T)])
    span = [i for s in segments if s.role in (("answer", "end") if name == "answer" else (name,))
            for i in range(s.start, s.end)]
    rows = [i for s in segments if s.role in ("answer", "end") for i in range(s.start, s.end)]
    return np.mean([sum(c <= i for c in span) / (n + i + 1) for i in rows])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_diff_summaries_on_uniform_attention_are_the_hand_computed_ones(method, tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, method, q_scale=0.0)
    r = rendered(tok)
    T = len(r.input_ids)
    diff = adapter_diff(model, tok, input_ids=r.input_ids, segments=r.segments)
    view = AttentionView(diff)
    for name in ("entropy", "sink", "previous", "user", "answer"):
        want = uniform_summary(name, N, T, r.segments) - uniform_summary(name, 0, T, r.segments)
        view.summary.value = name
        np.testing.assert_allclose(view.grid_values(), np.full((2, 4), want), atol=2e-3, err_msg=name)
        np.testing.assert_allclose(diff.summary(name), np.full((2, 4), want), atol=2e-3, err_msg=name)
    # either side alone: the adapter's full capture and its real block keep every real query
    assert abs(uniform_summary("sink", N, T) - uniform_summary("sink", 0, T)) > 0.02  # the check can fail
    np.testing.assert_allclose(diff.full[1].summary("entropy"), 1.0, atol=2e-3)
    np.testing.assert_allclose(diff.after.summary("entropy"), 1.0, atol=2e-3)  # renormalised real rows
    np.testing.assert_allclose(diff.full[1].summary("sink"), uniform_summary("sink", N, T), atol=2e-3)


def test_sink_is_the_first_real_token_in_a_soft_prompt_capture(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "prompt_tuning", q_scale=40.0)  # sharp attention
    ids = rendered(tok).input_ids
    ref = eager_attentions(model, ids)
    cap = capture_attention(model, tok, input_ids=ids)
    np.testing.assert_allclose(cap.summary("sink"), ref[:, :, N:, N].mean(-1), atol=2e-3)
    assert np.abs(ref[:, :, N:, N].mean(-1) - ref[:, :, N:, 0].mean(-1)).max() > 1e-2  # <v0> would differ


def test_prefix_vs_prefix_change_averages_the_real_queries_only(tiny_llama_dir):
    from sftkit.engine.attention import diff_captures

    one, tok = method_model(tiny_llama_dir, "prefix_tuning", seed=0)
    two, _ = method_model(tiny_llama_dir, "prefix_tuning", seed=1)
    ids = rendered(tok).input_ids
    a, b = eager_attentions(one, ids), eager_attentions(two, ids)  # [layers, heads, real queries, N + T keys]
    diff = diff_captures(capture_attention(one, tok, input_ids=ids), capture_attention(two, tok, input_ids=ids))
    assert not diff.has_virtual
    want = 0.5 * np.abs(b - a).sum(-1).mean(-1)
    assert float(want.min()) > 1e-3  # two different prefixes: a change to find
    np.testing.assert_allclose(diff.change(), want, atol=2e-3)


def test_llama_adapter_diff_view_says_where_its_prompt_went(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "adaption_prompt", top_n=1)
    gate = next(p for n, p in model.named_parameters() if n.endswith("adaption_gate"))
    with torch.no_grad():
        gate.fill_(-0.5)
    diff = adapter_diff(model, tok, input_ids=rendered(tok).input_ids)
    assert "LLaMA-Adapter" in diff.note and "layer 1 -0.500" in diff.note
    view = AttentionView(diff)
    assert "layer 1 -0.500" in view.virtual_line.value and "virtual" not in view.summary.options


# ---- the attention view --------------------------------------------------------------------------------
def test_attention_view_shows_the_virtual_share_only_when_there_are_virtual_tokens(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "prompt_tuning")
    ids = rendered(tok).input_ids
    cap = capture_attention(model, tok, input_ids=ids, label="<i>soft</i>")
    view = AttentionView(cap)
    assert "virtual" in view.summary.options
    view.summary.value = "virtual"
    want = eager_attentions(model, ids)[:, :, N:, :N].sum(-1).mean(-1)  # the real queries' mass on the soft prompt
    np.testing.assert_allclose(view.grid_values(), want, atol=3e-3)
    shown = re.search(r"<b>([0-9.]+)%</b> of the real tokens' attention", view.virtual_line.value)
    assert shown is not None and abs(float(shown.group(1)) - 100 * float(want.mean())) < 0.1
    assert "&lt;v0&gt; to &lt;v4&gt;" in view.virtual_line.value
    assert "<i>soft</i>" not in view.widget.children[0].value  # the label is the user's text: escaped
    view.window_start.value = 0
    labels = list(view.heatmap.data[0].x)
    assert labels[:N] == [f"{i}: <v{i}>" for i in range(N)] and not labels[N].endswith(f"<v{N}>")  # then the text

    diff_view = AttentionView(adapter_diff(model, tok, input_ids=ids))
    assert {"change", "virtual"} <= set(diff_view.summary.options) and "real tokens only" in diff_view.virtual_line.value
    diff_view.summary.value = "virtual"
    np.testing.assert_allclose(diff_view.grid_values(), want, atol=3e-3)

    plain_model, _ = sftkit.load_model(str(tiny_llama_dir))
    plain = AttentionView(capture_attention(plain_model, tok, input_ids=ids))
    assert "virtual" not in plain.summary.options and plain.virtual_line.value == ""


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_window_past_the_virtual_positions_keeps_them_as_the_first_columns(method, tiny_llama_dir):
    """A long prompt's window (the view opens on its end) still shows where the attention to the soft
    prompt goes: the virtual keys stay in front; the rows are the window's queries only."""
    model, tok = method_model(tiny_llama_dir, method)
    ids = rendered(tok).input_ids
    cap = capture_attention(model, tok, input_ids=ids)
    T = cap.n_tokens
    view = AttentionView(cap, max_window=8)
    lo, hi = view.window
    assert (lo, hi) == (T - 8, T) and lo > N
    ref = eager_attentions(model, ids)[0]  # the view opens on layer 0: [heads, queries, keys]
    if ref.shape[1] < ref.shape[2]:  # a prefix queries nothing: its rows are empty in the capture
        ref = np.concatenate([np.zeros((ref.shape[0], N, ref.shape[2]), np.float32), ref], axis=1)
    keys = list(range(N)) + list(range(lo, hi))
    np.testing.assert_allclose(np.asarray(view.heatmap.data[0].z), ref[0][lo:hi][:, keys], atol=2e-3)
    xs, ys = list(view.heatmap.data[0].x), list(view.heatmap.data[0].y)
    assert xs[:N] == [f"{i}: <v{i}>" for i in range(N)] and xs[N:] == ys and ys[0].startswith(f"{lo}: ")
    view.query.value = T - 1
    np.testing.assert_allclose(np.asarray(view.row_plot.data[0].y), ref[0][T - 1][keys], atol=2e-3)
    assert f"the {N} virtual positions as the first columns" in view.info.value
    # the mean over heads, and a window that starts inside the virtual positions adds nothing twice
    view.head.value = "mean"
    np.testing.assert_allclose(np.asarray(view.heatmap.data[0].z), ref.mean(0)[lo:hi][:, keys], atol=2e-3)
    view.window_start.value = 2
    assert [x.split(":")[0] for x in view.heatmap.data[0].x] == [str(i) for i in (0, 1, *range(2, 10))]
    assert "the first 2 virtual positions as the first columns" in view.info.value
    view.window_start.value = 0
    assert "virtual positions as the first columns" not in view.info.value


def test_prefix_view_starts_the_row_slider_at_the_first_real_token(tiny_llama_dir):
    model, tok = method_model(tiny_llama_dir, "prefix_tuning")
    view = AttentionView(capture_attention(model, tok, input_ids=rendered(tok).input_ids))
    assert view.query.min == N and "keys and values" in view.virtual_line.value


# ---- the template preview ---------------------------------------------------------------------------------
def preview_spans(html_text):
    """(kind, position in the html) of every virtual and real token span."""
    out = []
    for kind, marker in (("virtual", 'class="sftkit-virtual"'), ("token", 'class="sftkit-tok"')):
        start = 0
        while (i := html_text.find(marker, start)) >= 0:
            out.append((i, kind))
            start = i + 1
    return [k for _, k in sorted(out)]


@pytest.mark.parametrize("method,words", [("prompt_tuning", "trained embeddings, not text"),
                                          ("p_tuning", "prompt encoder"),
                                          ("prefix_tuning", "keys and values in front of the attention of every layer"),
                                          ("adaption_prompt", "LLaMA-Adapter")])
def test_preview_shows_exactly_n_virtual_tokens_before_the_first_real_token(method, words, tiny_llama_dir):
    model, tok = sftkit.load_model(str(tiny_llama_dir))
    a = inspect_model(model)
    plan = FreezePlan.preset(method, a, virtual_tokens=7)
    draft = PromptDraft(ROWS, tok, TEMPLATE)
    assert draft.preview.n_virtual == 0
    draft.set_method(plan)
    p = draft.preview
    assert p.n_virtual == 7 and p.virtual.method == method and words in p.virtual.label
    assert p.loss_mask == TEMPLATE.render(ROWS[0], tok).loss_mask  # the virtual tokens are never labels
    builder = PromptBuilder(ROWS, tok, template=TEMPLATE, method=plan, debounce=0)
    html_text = builder.preview.value
    kinds = preview_spans(html_text)
    assert kinds == ["virtual"] * 7 + ["token"] * p.n_tokens
    assert html_text.count('data-trained="1"') == p.n_trained  # the virtual spans carry no trained flag
    assert "7</b> virtual" in builder.stats.value
    # user text stays escaped, with the virtual tokens in front
    assert "<script" not in html_text and "<b>four" not in html_text
    shown = html.unescape(re.sub(r"<[^>]+>", "", html_text))  # the text a reader sees, tags taken out
    assert "<script>alert(1)</script>" in shown and "4 & <b>four</b>" in shown.replace("\xa0", " ")
    builder.set_method("lora_attention")  # a method without virtual tokens takes them away
    assert builder.draft.preview.n_virtual == 0 and 'class="sftkit-virtual"' not in builder.preview.value


def test_virtual_tokens_come_from_a_run_config_or_a_preset_name_and_bad_values_are_refused(tiny_llama_dir):
    cfg = RunConfig.from_dict({"adapter": {"preset": "prefix_tuning", "virtual_tokens": 9}})
    assert VirtualTokens.of(cfg) == VirtualTokens(9, "prefix_tuning") == VirtualTokens.of(cfg.adapter)
    assert VirtualTokens.of("p_tuning", 3) == VirtualTokens(3, "p_tuning")
    assert VirtualTokens.of("ia3") is None and VirtualTokens.of(RunConfig()) is None
    with pytest.raises(ValueError, match="not a preset; allowed: .*prompt_tuning"):
        VirtualTokens.of("soft_prompt")
    with pytest.raises(ValueError, match="virtual_tokens=0 is not allowed; allowed: an integer from 1 to 512"):
        VirtualTokens.of("prompt_tuning", 0)
    _, tok = sftkit.load_model(str(tiny_llama_dir))
    draft = PromptDraft(ROWS, tok, TEMPLATE, method="prompt_tuning")
    before = draft.preview
    with pytest.raises(ValueError, match="virtual_tokens=600"):
        draft.set_method("prompt_tuning", 600)
    assert draft.preview is before and draft.virtual == VirtualTokens(20, "prompt_tuning")  # nothing changed


def test_a_method_change_during_a_template_error_moves_the_kept_preview_too(tiny_llama_dir):
    _, tok = sftkit.load_model(str(tiny_llama_dir))
    builder = PromptBuilder(ROWS, tok, template=TEMPLATE, method="prompt_tuning", debounce=0)
    draft = builder.draft
    draft.update(user_pattern="{nope}")
    assert draft.error is not None and draft.preview.virtual == VirtualTokens(20, "prompt_tuning")
    draft.set_method("p_tuning", 4)
    assert draft.error is not None  # the template is still wrong: the last good rendering stays ...
    assert draft.virtual == draft.preview.virtual == VirtualTokens(4, "p_tuning")  # ... with the new method
    assert preview_spans(builder.preview.value).count("virtual") == 4 and "4</b> virtual" in builder.stats.value
    draft.set_method(None)
    assert draft.preview.virtual is None and 'class="sftkit-virtual"' not in builder.preview.value


def test_a_plan_editor_as_the_method_is_followed(tiny_llama_dir):
    from sftkit.state import PlanEditor

    model, tok = sftkit.load_model(str(tiny_llama_dir))
    a = inspect_model(model)
    editor = PlanEditor(a, FreezePlan.preset("prompt_tuning", a, virtual_tokens=7))
    builder = PromptBuilder(ROWS, tok, template=TEMPLATE, method=editor, debounce=0)
    assert builder.draft.preview.virtual == VirtualTokens(7, "prompt_tuning")
    editor.set_plan(FreezePlan.preset("prefix_tuning", a, virtual_tokens=3))  # edited after the builder was made
    assert builder.draft.virtual == builder.draft.preview.virtual == VirtualTokens(3, "prefix_tuning")
    assert preview_spans(builder.preview.value).count("virtual") == 3
    editor.set_plan(FreezePlan.preset("lora_attention", a))
    assert builder.draft.preview.virtual is None
    builder.set_method("p_tuning", 2)  # another source: the editor is no longer followed
    editor.set_plan(FreezePlan.preset("prompt_tuning", a, virtual_tokens=9))
    assert builder.draft.preview.virtual == VirtualTokens(2, "p_tuning")


def test_virtual_tokens_for_a_method_without_them_and_the_range_from_the_config(tiny_llama_dir):
    from sftkit.core.runconfig import AdapterConfig

    with pytest.raises(ValueError, match="virtual_tokens=5 was given, but lora_attention has no virtual tokens"):
        VirtualTokens.of("lora_attention", 5)
    with pytest.raises(ValueError, match="adapter.virtual_tokens=513 is not allowed; allowed: an integer from 1 to 512"):
        VirtualTokens(513, "prompt_tuning")
    with pytest.raises(ValueError, match="adapter.virtual_tokens=True is not allowed"):
        VirtualTokens(True, "prompt_tuning")
    assert VirtualTokens(512, "prompt_tuning").n == 512
    with pytest.raises(Exception, match="virtual_tokens=513 is not allowed"):  # the same words as a run config's
        AdapterConfig(preset="prompt_tuning", virtual_tokens=513)
    from sftkit.state import VirtualTokens as exported

    assert exported is VirtualTokens


def test_virtual_label_is_escaped_in_the_token_view():
    from sftkit.core.tokens import TokenPiece

    out = tokens_html([TokenPiece(1, "a", False)], [0], virtual=2, virtual_method="prompt_tuning",
                      virtual_label="<img src=x onerror=alert(1)>")
    assert "<img" not in out and "&lt;img" in out and out.count('class="sftkit-virtual"') == 2


# ---- the parameter counter -----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_counter_says_which_share_of_the_model_trains_for_every_method(preset, tiny_llama_dir):
    from sftkit.ui import LayerPicker

    model = sftkit.load_model(str(tiny_llama_dir)).model
    picker = LayerPicker(model, device_bytes=2**34)
    picker.apply_preset(preset, 1 if preset in ("lora_top_blocks", "freeze_tuning") else None)
    ed = picker.editor
    assert ed.error is None
    fresh = sftkit.load_model(str(tiny_llama_dir)).model
    total = sum(p.numel() for p in fresh.parameters())
    trains = sum(p.numel() for p in ed.plan.apply(fresh, ed.anatomy).parameters() if p.requires_grad)
    assert ed.trainable == trains > 0
    shown = re.search(r"<b>([0-9.]+)%</b> of the model \(([0-9,]+)\) trains", picker.counters.value)
    assert shown is not None and int(shown.group(2).replace(",", "")) == total
    digits = len(shown.group(1).split(".")[1])  # what the counter rounded to: it is within half its last digit
    assert abs(float(shown.group(1)) - 100 * trains / total) <= 0.5 * 10 ** -digits + 1e-12


# ---- generation with a soft prompt or a prefix: what a full forward gives ----------------------------------
def greedy_without_cache(model, ids, n, stops):
    """The reference: greedy tokens, each from a full forward over everything so far (the computation training
    does), up to and with the first stop id or n tokens."""
    ids = torch.tensor([ids], device=model.device)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            new.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]], device=ids.device)], 1)
            if new[-1] in stops:
                break
    return new


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_answers_are_what_a_full_forward_gives_on_the_default_model(method, default_model_folder):
    """Regression, on the default model (a tiny random model does not show it): with peft 0.21 / transformers 5,
    generating through the KV cache with a soft prompt goes wrong after the first token, and ``generate`` gives
    a prefix other answers than the forward even without the cache. Every sftkit path that answers must give
    the full-forward reference: a chat answer (streamed), answers for rows
    of different lengths batched with left padding, the comparison's generation, candidates to rate."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from sftkit.engine.compare import _generate
    from sftkit.engine.generate import answer_rows, generate_text
    from sftkit.engine.preference import sample_candidates

    model, tok = sftkit.load_model(str(default_model_folder))
    torch.manual_seed(0)
    config = (PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=8)
    model = get_peft_model(model, config).eval()
    eos = model.generation_config.eos_token_id
    stops = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}  # written out, not sftkit's
    template = Template(user_pattern="Write the date {d} as YYYY-MM-DD.", answer_field="iso")
    rows = [{"d": "3 March 2021", "iso": "2021-03-03"},
            {"d": "the twenty-first of December in the year 1999", "iso": "1999-12-21"}]  # lengths differ: padding
    prompts = [template.prompt_text(r, tok, with_examples=False) for r in rows]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert len(ids[0]) != len(ids[1])
    n = 6
    greedy = [greedy_without_cache(model, i, n, stops) for i in ids]
    want = [tok.decode(g, skip_special_tokens=True) for g in greedy]
    assert all(w.strip() for w in want), want
    for i, g in zip(ids, greedy):  # the reference is what training's forward predicts, teacher-forced in one pass
        full = torch.tensor([i + g], device=model.device)
        out = model(input_ids=full, attention_mask=torch.ones_like(full), labels=full)
        front = out.logits.shape[1] - full.shape[1]  # a soft prompt's logits start with its virtual positions
        assert out.logits[0, front + len(i) - 1:front + len(i) + len(g) - 1].argmax(-1).tolist() == g
    if method == "prompt_tuning":  # the canary: the cache still goes wrong here, so this test sees the difference
        with torch.no_grad():
            cached = model.generate(input_ids=torch.tensor([ids[0]], device=model.device), max_new_tokens=n,
                                    do_sample=False, use_cache=True)
        assert tok.decode(cached[0, len(ids[0]):], skip_special_tokens=True) != want[0], \
            "cached generation with a soft prompt is right again: sftkit could use the KV cache for prompt methods"
    else:  # the canary: generate without the cache still numbers a prefix's text differently
        with torch.no_grad():
            plain = model.generate(input_ids=torch.tensor([ids[1]], device=model.device), max_new_tokens=n,
                                   do_sample=False, use_cache=False)
        assert tok.decode(plain[0, len(ids[1]):], skip_special_tokens=True) != want[1], \
            "generate gives a prefix's full-forward answer again: prefix tuning could use it"
    pieces = []
    answer = generate_text(model, tok, prompts[1], max_new_tokens=n, on_text=pieces.append)
    assert answer.text == want[1] and "".join(pieces).strip() == want[1].strip()
    assert answer_rows(model, tok, template, rows, few_shot=False, max_new_tokens=n) == want
    tok.padding_side = "left"  # as the comparison sets it
    assert _generate(model, tok, prompts, n)[0] == want
    # candidates to rate, sampled so cold that the draw is the greedy token: the same path, the reference answer
    cold = sample_candidates(model, tok, template, rows, k=1, temperature=1e-4, max_new_tokens=n)
    assert [c[0] for c in cold] == [w.strip() for w in want]


# ---- decoding by full forwards: the sampler itself, on fixed logits ----------------------------------------
class FixedLogits(torch.nn.Module):
    """A stand-in language model whose next-token distribution is always ``probs`` (the sampler is what is
    tested here, not a model)."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs).log())
        self.calls = 0

    @property
    def device(self):
        return self.logits.device

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        assert attention_mask.shape == input_ids.shape and bool(attention_mask.all())
        return type("Out", (), {"logits": self.logits.expand(1, input_ids.shape[1], -1)})()


def test_decode_by_forward_greedy_nucleus_seed_stop_and_refusals():
    from sftkit.engine.compare import decode_by_forward

    model = FixedLogits([0.5, 0.3, 0.15, 0.05])
    assert decode_by_forward(model, [9], 5, set()) == [0] * 5 and model.calls == 5  # a full forward a token
    assert decode_by_forward(model, [9], 5, {0}) == [0]  # ends after a stop id, which is kept

    def draws(top_p, n=3000, temperature=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        return decode_by_forward(model, [9], n, set(), temperature=temperature, top_p=top_p, generator=g)

    counts = np.bincount(draws(1.0), minlength=4) / 3000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)  # the distribution itself
    assert set(draws(0.7)) == {0, 1}  # the smallest set reaching 0.7: 0.5 + 0.3
    assert set(draws(0.5)) == {0} and set(draws(0.01)) == {0}  # never empty
    assert set(draws(0.85 + 1e-6)) == {0, 1, 2}
    assert draws(1.0, n=50, seed=3) == draws(1.0, n=50, seed=3) != draws(1.0, n=50, seed=4)  # seeded
    sharp = np.bincount(draws(1.0, temperature=0.25), minlength=4) / 3000  # p^4, renormalised
    want = np.array([0.5, 0.3, 0.15, 0.05]) ** 4
    np.testing.assert_allclose(sharp, want / want.sum(), atol=0.03)
    for bad in ({"temperature": 0.0}, {"temperature": -1.0}, {"temperature": 1.0, "top_p": 0.0},
                {"temperature": 1.0, "top_p": 1.5}):
        with pytest.raises(ValueError, match="is not allowed"):
            decode_by_forward(model, [9], 2, set(), **bad)

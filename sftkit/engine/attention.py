"""Attention capture on demand, per-head summaries, and base-vs-adapter differences.

The model keeps its fast attention kernel for training and generation; only the capture
pass switches to eager attention (the one that materializes the probabilities) and switches
back. Forward hooks on the chosen layers' attention modules take each layer's probabilities
as it is computed, move it off the device as float16 and let the rest go, so memory holds
only what was asked for. Grouped-query attention comes out per query head.

The maps grow with the square of the prompt: layers x heads x tokens^2 values (30 x 9 x 4096^2
float16 values are 8.4 GiB for a 4k-token prompt on the default model). Every capture estimates its
memory from the token count before it runs the model and refuses, naming the numbers, when the
estimate is over ``max_bytes`` (``MAX_CAPTURE_BYTES`` unless given): capture fewer ``layers=``, a
shorter prompt, or raise ``max_bytes=``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..core.errors import SftkitError
from ..core.template import Segment
from ..core.tokens import TokenPiece, readable_tokens
from .anatomy import base_model_of, find_blocks

SUMMARIES = ("entropy", "sink", "previous", "system", "example", "user", "answer")

MAX_CAPTURE_BYTES = 2**30  # 1 GiB: the default limit of one capture (or one adapter_diff)
_KEPT_BYTES = 2  # float16 per kept probability
_DELTA_BYTES = 4  # float32 per value of a difference
_PASS_BYTES = 10  # per value of the one layer being computed: fp32 scores + fp32 softmax + the fp16 copy


class AttentionTooLargeError(SftkitError, ValueError):
    """A capture would need more memory than ``max_bytes``; raised before the model runs."""


def estimate_capture_bytes(n_tokens: int, n_layers: int, n_heads: int, *, diff: bool = False) -> int:
    """Peak memory of a capture (``diff``: of ``adapter_diff``: two captures and their difference).

    What is kept (float16 per layer x head x query x key, plus float32 for a difference) and the
    one layer's eager-attention tensors that exist while it is computed.
    """
    per_layer = n_heads * n_tokens * n_tokens
    kept = n_layers * per_layer * (2 * _KEPT_BYTES + _DELTA_BYTES if diff else _KEPT_BYTES)
    return int(kept + per_layer * _PASS_BYTES)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_capture_size(n_tokens: int, layers: Sequence[int], n_heads: int, max_bytes: int | None = None, *,
                       diff: bool = False) -> int:
    """Raise AttentionTooLargeError when the estimate is over ``max_bytes``; return the estimate."""
    limit = MAX_CAPTURE_BYTES if max_bytes is None else max_bytes
    layers = list(layers)
    need = estimate_capture_bytes(n_tokens, len(layers), n_heads, diff=diff)
    if need <= limit:
        return need
    what = "an adapter_diff (two captures and their difference)" if diff else "capturing attention"
    msg = (f"{what} for {n_tokens} tokens x {len(layers)} layers x {n_heads} heads needs about {_gib(need)}, "
           f"over the limit of {_gib(limit)} (max_bytes={limit}). ")
    fit = 0
    while fit < len(layers) and estimate_capture_bytes(n_tokens, fit + 1, n_heads, diff=diff) <= limit:
        fit += 1
    if fit:
        example = sorted({layers[round(k * (len(layers) - 1) / max(fit - 1, 1))] for k in range(fit)})
        msg += (f"Capture fewer layers: {fit} of the {len(layers)} fit, e.g. layers={example} "
                f"(about {_gib(estimate_capture_bytes(n_tokens, len(example), n_heads, diff=diff))}); "
                "or a shorter prompt (memory grows with tokens^2); ")
    else:
        one = estimate_capture_bytes(n_tokens, 1, n_heads, diff=diff)
        msg += (f"Even one layer needs about {_gib(one)} at this length: use a shorter prompt (memory grows "
                "with tokens^2) and fewer layers=[...]; ")
    msg += f"or raise the limit with max_bytes={need} if the machine has the memory."
    raise AttentionTooLargeError(msg)


def _n_query_heads(model, module) -> int:
    """Query heads of one attention module (what the probabilities have, grouped-query or not)."""
    for owner in (getattr(module, "config", None), base_model_of(model).config):
        if owner is None:
            continue
        cfg = owner.get_text_config() if hasattr(owner, "get_text_config") else owner
        for name in ("num_attention_heads", "n_head", "num_heads"):
            n = getattr(cfg, name, None)
            if isinstance(n, int) and n > 0:
                return n
    for name in ("num_heads", "num_attention_heads", "n_head"):
        n = getattr(module, name, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f"can't tell the number of attention heads of {type(module).__name__}")


@dataclass
class AttentionCapture:
    """Attention probabilities of some layers for one token sequence.

    probs: float16 array [n_layers, n_heads, T, T] (row = query token, column = key token).
    layers: the model layer index of each entry along the first axis.
    """

    input_ids: list[int]
    tokens: list[TokenPiece]
    layers: list[int]
    probs: np.ndarray
    segments: tuple[Segment, ...] = ()
    label: str = ""
    _summary_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        return self.probs.shape[-1]

    @property
    def n_heads(self) -> int:
        return self.probs.shape[1]

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not captured; captured: {self.layers}") from None

    def head(self, layer: int, head: int | str, window: tuple[int, int] | None = None) -> np.ndarray:
        """One head's map as float32 [rows, cols]; head may be an index, "mean" or "max"."""
        block = self.probs[self.layer_index(layer)]
        lo, hi = window or (0, self.n_tokens)
        if head == "mean":
            m = block[:, lo:hi, lo:hi].astype(np.float32).mean(axis=0)
        elif head == "max":
            m = block[:, lo:hi, lo:hi].max(axis=0).astype(np.float32)
        else:
            m = block[int(head), lo:hi, lo:hi].astype(np.float32)
        return m

    def row(self, layer: int, head: int | str, query: int, window: tuple[int, int] | None = None) -> np.ndarray:
        """What token ``query`` attends to (one row of ``head``), over the window's keys."""
        lo, hi = window or (0, self.n_tokens)
        rows = self.probs[self.layer_index(layer)][:, query, lo:hi].astype(np.float32)
        if head == "mean":
            return rows.mean(axis=0)
        if head == "max":
            return rows.max(axis=0)
        return rows[int(head)]

    def span(self, role: str) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.segments if s.role == role or (role == "answer" and s.role == "end")]

    def summary(self, name: str) -> np.ndarray:
        """Per layer x head: entropy (normalized to [0, 1]), attention to the first token
        (sink), to the previous token, or the attention mass on a template span (system,
        example, user, answer) from the answer's tokens (all tokens when there is no answer)."""
        if name not in SUMMARIES:
            raise KeyError(f"unknown summary {name!r}; available: {', '.join(SUMMARIES)}")
        if name not in self._summary_cache:
            self._summary_cache[name] = np.stack([self._layer_summary(name, li) for li in range(len(self.layers))])
        return self._summary_cache[name]

    def _layer_summary(self, name: str, li: int) -> np.ndarray:
        p = self.probs[li].astype(np.float32)  # [H, T, T], one layer at a time keeps memory flat
        T = self.n_tokens
        if name == "entropy":
            if T < 2:
                return np.zeros(p.shape[0], np.float32)
            rows = p[:, 1:]  # row 0 attends only to itself
            plogp = rows * np.log(np.clip(rows, 1e-12, 1.0))
            return (-plogp.sum(-1) / np.log(np.arange(2, T + 1))[None, :]).mean(-1)
        if name == "sink":
            return p[:, :, 0].mean(-1)
        if name == "previous":
            if T < 2:
                return np.zeros(p.shape[0], np.float32)
            idx = np.arange(1, T)
            return p[:, idx, idx - 1].mean(-1)
        cols = [i for a, b in self.span(name) for i in range(a, b)]
        rows = [i for a, b in self.span("answer") for i in range(a, b)] or list(range(T))
        if not cols:
            return np.zeros(p.shape[0], np.float32)
        return p[:, rows][:, :, cols].sum(-1).mean(-1)

    def available_summaries(self) -> list[str]:
        roles = {s.role for s in self.segments}
        return [s for s in SUMMARIES if s in ("entropy", "sink", "previous") or s in roles]


@contextlib.contextmanager
def eager_attention(model):
    """Switch the model to eager attention for the duration, then back."""
    base = base_model_of(model)
    before = base.config._attn_implementation
    if before == "eager":
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def _attention_modules(model) -> list:
    """The attention module of every block, in order (found by path, not by model type)."""
    _, blocks = find_blocks(base_model_of(model))
    mods = []
    for block in blocks:
        found = None
        for name, child in block.named_children():
            if "attn" in name.lower() or "attention" in name.lower():
                found = child
                break
        if found is None:
            raise ValueError(f"no attention module found in {type(block).__name__}")
        mods.append(found)
    return mods


def _plan_capture(model, tokenizer, text, input_ids, layers):
    """Token ids, attention modules, chosen layers and query-head count: all known before any compute."""
    if input_ids is None:
        if text is None:
            raise ValueError("pass text or input_ids")
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = [int(i) for i in input_ids]
    if not input_ids:
        raise ValueError("nothing to capture: the text has no tokens")
    modules = _attention_modules(model)
    layers = list(range(len(modules))) if layers is None else sorted(set(int(x) for x in layers))
    bad = [x for x in layers if not 0 <= x < len(modules)]
    if bad:
        raise ValueError(f"layers {bad} don't exist; the model has layers 0 to {len(modules) - 1}")
    if not layers:
        raise ValueError("layers=[] captures nothing; pass at least one layer")
    return input_ids, modules, layers, _n_query_heads(model, modules[layers[0]])


def capture_attention(model, tokenizer, text: str | None = None, *, input_ids: Sequence[int] | None = None,
                      layers: Sequence[int] | None = None, segments: Sequence[Segment] = (),
                      label: str = "", max_bytes: int | None = None) -> AttentionCapture:
    """Attention probabilities of ``layers`` (default all) for ``text`` or ``input_ids``.

    Works on full-precision, 4-bit and LoRA-wrapped models, as they are (an active adapter
    is part of the capture; see ``adapter_disabled``). Refuses with AttentionTooLargeError,
    before running the model, when the estimated memory is over ``max_bytes`` (default
    ``MAX_CAPTURE_BYTES``, 1 GiB).
    """
    input_ids, modules, layers, n_heads = _plan_capture(model, tokenizer, text, input_ids, layers)
    check_capture_size(len(input_ids), layers, n_heads, max_bytes)
    return _capture(model, tokenizer, input_ids, modules, layers, segments, label)


def _capture(model, tokenizer, input_ids, modules, layers, segments, label) -> AttentionCapture:
    import torch

    slot = {layer: k for k, layer in enumerate(layers)}
    out: dict[str, np.ndarray] = {}  # one array for all layers, filled as each layer is computed
    filled: set[int] = set()

    def hook_for(i):
        def hook(_mod, _inp, res):
            weights = res[1] if isinstance(res, tuple) and len(res) > 1 else None
            if weights is None:
                raise RuntimeError("the attention module returned no probabilities; eager attention is needed")
            w = weights[0].detach().to("cpu", torch.float16).numpy()
            if "probs" not in out:
                out["probs"] = np.empty((len(layers),) + w.shape, np.float16)
            out["probs"][slot[i]] = w
            filled.add(i)
        return hook

    handles = [modules[i].register_forward_hook(hook_for(i)) for i in layers]
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.no_grad():
            model(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [i for i in layers if i not in filled]
    if missing:
        raise RuntimeError(f"the forward pass did not run the attention of layers {missing}")
    return AttentionCapture(input_ids, readable_tokens(tokenizer, input_ids), layers, out["probs"],
                            tuple(segments), label)


def capture_row(model, tokenizer, template, row: dict, *, few_shot: bool = True, **kwargs) -> AttentionCapture:
    """Capture a template-rendered data row, with its system/example/user/answer spans.

    Takes ``capture_attention``'s keywords (``layers=``, ``max_bytes=``, ``label=``)."""
    r = template.render(row, tokenizer, with_examples=few_shot)
    return capture_attention(model, tokenizer, input_ids=r.input_ids, segments=r.segments, **kwargs)


@contextlib.contextmanager
def adapter_disabled(model):
    """The same model with its LoRA adapter switched off (a no-op for a plain model)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@dataclass
class AttentionDiff:
    """``after`` minus ``before`` on the same tokens: signed maps and per-head change."""

    before: AttentionCapture
    after: AttentionCapture
    delta: np.ndarray  # float32 [L, H, T, T]

    @property
    def layers(self) -> list[int]:
        return self.after.layers

    def head(self, layer: int, head: int | str, window: tuple[int, int] | None = None) -> np.ndarray:
        d = self.delta[self.after.layer_index(layer)]
        lo, hi = window or (0, d.shape[-1])
        if head == "mean":
            return d[:, lo:hi, lo:hi].mean(axis=0)
        if head == "max":  # the largest change by magnitude, with its sign
            sl = d[:, lo:hi, lo:hi]
            idx = np.abs(sl).argmax(axis=0)
            return np.take_along_axis(sl, idx[None], axis=0)[0]
        return d[int(head), lo:hi, lo:hi]

    def row(self, layer: int, head: int | str, query: int, window: tuple[int, int] | None = None) -> np.ndarray:
        d = self.delta[self.after.layer_index(layer)]
        lo, hi = window or (0, d.shape[-1])
        rows = d[:, query, lo:hi]
        if head == "mean":
            return rows.mean(axis=0)
        if head == "max":
            return np.take_along_axis(rows, np.abs(rows).argmax(axis=0)[None], axis=0)[0]
        return rows[int(head)]

    def change(self) -> np.ndarray:
        """Per layer x head: mean over query tokens of the total variation distance between
        the two attention rows (0 = identical, 1 = disjoint)."""
        return np.stack([0.5 * np.abs(d).sum(-1).mean(-1) for d in self.delta])  # a layer at a time


def diff_captures(before: AttentionCapture, after: AttentionCapture) -> AttentionDiff:
    if before.input_ids != after.input_ids:
        raise ValueError(
            f"the two captures are of different tokens ({before.n_tokens} vs {after.n_tokens}); a map-by-map "
            "difference needs the same tokens: compare prompts of the same tokenization, or compare summaries")
    if before.layers != after.layers:
        raise ValueError(f"the two captures hold different layers ({before.layers} vs {after.layers})")
    delta = after.probs.astype(np.float32)
    np.subtract(delta, before.probs, out=delta)  # no second float32 copy
    return AttentionDiff(before, after, delta)


def adapter_diff(model, tokenizer, text: str | None = None, *, input_ids: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None, segments: Sequence[Segment] = (),
                 max_bytes: int | None = None) -> AttentionDiff:
    """Base model vs fine-tuned adapter on the same input: one loaded model, adapter off then on.

    ``max_bytes`` bounds the whole: both captures and their float32 difference, checked
    before either forward pass.
    """
    input_ids, modules, layers, n_heads = _plan_capture(model, tokenizer, text, input_ids, layers)
    check_capture_size(len(input_ids), layers, n_heads, max_bytes, diff=True)
    with adapter_disabled(model):
        before = _capture(model, tokenizer, input_ids, modules, layers, segments, "base")
    after = _capture(model, tokenizer, input_ids, modules, layers, segments, "adapter")
    return diff_captures(before, after)

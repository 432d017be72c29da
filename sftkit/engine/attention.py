"""Attention capture on demand, per-head summaries, and base-vs-adapter differences.

The model keeps its fast attention kernel for training and generation; only the capture
pass switches to eager attention (the one that materializes the probabilities) and switches
back. Forward hooks on the chosen layers' attention modules take each layer's probabilities
as it is computed, move it off the device as float16 and let the rest go, so memory holds
only what was asked for. Grouped-query attention comes out per query head.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..core.template import Segment
from ..core.tokens import TokenPiece, readable_tokens
from .anatomy import base_model_of, find_blocks

SUMMARIES = ("entropy", "sink", "previous", "system", "example", "user", "answer")


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


def capture_attention(model, tokenizer, text: str | None = None, *, input_ids: Sequence[int] | None = None,
                      layers: Sequence[int] | None = None, segments: Sequence[Segment] = (),
                      label: str = "") -> AttentionCapture:
    """Attention probabilities of ``layers`` (default all) for ``text`` or ``input_ids``.

    Works on full-precision, 4-bit and LoRA-wrapped models, as they are (an active adapter
    is part of the capture; see ``adapter_disabled``).
    """
    import torch

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
    kept: dict[int, np.ndarray] = {}

    def hook_for(i):
        def hook(_mod, _inp, out):
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise RuntimeError("the attention module returned no probabilities; eager attention is needed")
            kept[i] = weights[0].detach().to("cpu", torch.float16).numpy()
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
    probs = np.stack([kept[i] for i in layers])
    return AttentionCapture(input_ids, readable_tokens(tokenizer, input_ids), layers, probs, tuple(segments), label)


def capture_row(model, tokenizer, template, row: dict, *, few_shot: bool = True, **kwargs) -> AttentionCapture:
    """Capture a template-rendered data row, with its system/example/user/answer spans."""
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
        return 0.5 * np.abs(self.delta).sum(-1).mean(-1)


def diff_captures(before: AttentionCapture, after: AttentionCapture) -> AttentionDiff:
    if before.input_ids != after.input_ids:
        raise ValueError(
            f"the two captures are of different tokens ({before.n_tokens} vs {after.n_tokens}); a map-by-map "
            "difference needs the same tokens: compare prompts of the same tokenization, or compare summaries")
    if before.layers != after.layers:
        raise ValueError(f"the two captures hold different layers ({before.layers} vs {after.layers})")
    delta = after.probs.astype(np.float32) - before.probs.astype(np.float32)
    return AttentionDiff(before, after, delta)


def adapter_diff(model, tokenizer, text: str | None = None, **kwargs) -> AttentionDiff:
    """Base model vs fine-tuned adapter on the same input: one loaded model, adapter off then on."""
    with adapter_disabled(model):
        before = capture_attention(model, tokenizer, text, label="base", **kwargs)
    after = capture_attention(model, tokenizer, text, label="adapter", **kwargs)
    return diff_captures(before, after)

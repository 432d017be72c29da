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

Prompt methods (peft's prompt tuning, p-tuning, prefix tuning) put ``n_virtual`` trained positions
in front of the text: the capture knows them (``AttentionCapture.n_virtual``, tokens ``<v0>`` ...)
and ``virtual_share()`` says how much of the real tokens' attention goes to them. Prompt tuning and
p-tuning prepend input embeddings, so the virtual positions are queries and keys; prefix tuning
prepends keys and values in every layer, so they are keys only (their rows stay empty). LLaMA-Adapter
(adaption prompt) attends to its prompt in a separate gated softmax that the maps don't hold: its
gates are recorded per layer (``prompt_gates``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..core.errors import SftkitError
from ..core.template import Segment
from ..core.tokens import TokenPiece, readable_tokens
from .anatomy import base_model_of, find_blocks

SUMMARIES = ("entropy", "sink", "previous", "system", "example", "user", "answer", "virtual")
# peft's prompt-learning types whose virtual positions are in the attention maps, by sftkit's method name
VIRTUAL_METHODS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}

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
                       diff: bool = False, n_virtual: int = 0, method: str = "") -> int:
    """Raise AttentionTooLargeError when the estimate is over ``max_bytes``; return the estimate.

    ``n_tokens`` counts every position of the maps; ``n_virtual`` of them are a prompt method's
    (``method``), which the message names apart from the text's tokens."""
    limit = MAX_CAPTURE_BYTES if max_bytes is None else max_bytes
    layers = list(layers)
    need = estimate_capture_bytes(n_tokens, len(layers), n_heads, diff=diff)
    if need <= limit:
        return need
    what = "an adapter_diff (two captures and their difference)" if diff else "capturing attention"
    where = (f"{n_tokens - n_virtual} tokens + {n_virtual} virtual positions ({method}) = {n_tokens} positions"
             if n_virtual else f"{n_tokens} tokens")
    msg = (f"{what} for {where} x {len(layers)} layers x {n_heads} heads needs about {_gib(need)}, "
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


def virtual_positions(model) -> tuple[int, str]:
    """The active adapter's virtual positions as (N, method): peft's prompt tuning and p-tuning put N input
    positions in front of the text, prefix tuning N key/value positions in every layer. (0, "") for any
    other model, and while the adapter is switched off (``adapter_disabled``)."""
    if getattr(model, "_adapters_disabled", False):
        return 0, ""
    try:
        cfg = getattr(model, "active_peft_config", None)
    except (AttributeError, KeyError):  # a PeftModel without an active adapter
        return 0, ""
    kind = getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None))
    if kind in VIRTUAL_METHODS:
        return int(cfg.num_virtual_tokens), VIRTUAL_METHODS[kind]
    return 0, ""


def virtual_pieces(n: int) -> list[TokenPiece]:
    """The readable stand-ins of ``n`` virtual positions: ``<v0>`` ... (id -1: they are not tokens)."""
    return [TokenPiece(-1, f"<v{i}>", True) for i in range(n)]


def virtual_note(n: int, method: str) -> str:
    """What ``n`` virtual positions of ``method`` are, in one sentence (plain text)."""
    if not n:
        return ""
    names = f"<v0> to <v{n - 1}>" if n > 1 else "<v0>"
    if method == "prefix_tuning":
        return (f"{n} prefix positions in front ({names}): trained keys and values in every layer, not input "
                "positions; the real tokens attend to them, they attend to nothing (their rows are empty)")
    made = ", made by a prompt encoder (p-tuning)" if method == "p_tuning" else ""
    return (f"soft prompt: {n} virtual tokens in front ({names}): trained input embeddings{made}, not text; "
            "they attend and are attended like tokens")


@dataclass
class AttentionCapture:
    """Attention probabilities of some layers for one token sequence.

    probs: float16 array [n_layers, n_heads, T, T] (row = query token, column = key token).
    layers: the model layer index of each entry along the first axis.
    n_virtual / method: the virtual positions a prompt method puts in front (0 and "" without one):
        the first ``n_virtual`` positions of ``probs`` and ``tokens`` (``<v0>`` ...), then the real
        tokens (``input_ids``). Prefix tuning's virtual positions are keys only: their rows are zero.
        ``segments`` are positions in the capture (the template's spans moved by ``n_virtual``).
    prompt_gates: LLaMA-Adapter's gate of each captured layer it adapts (its prompt is attended in a
        separate softmax scaled by the gate, so it is not in ``probs``).
    """

    input_ids: list[int]
    tokens: list[TokenPiece]
    layers: list[int]
    probs: np.ndarray
    segments: tuple[Segment, ...] = ()
    label: str = ""
    n_virtual: int = 0
    method: str = ""
    prompt_gates: dict[int, float] = field(default_factory=dict)
    _summary_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        """Positions in the maps: the virtual ones and the real tokens."""
        return self.probs.shape[-1]

    @property
    def n_heads(self) -> int:
        return self.probs.shape[1]

    @property
    def n_real(self) -> int:
        """The real tokens (the text's own), after the virtual positions."""
        return self.n_tokens - self.n_virtual

    @property
    def real_tokens(self) -> list[TokenPiece]:
        return self.tokens[self.n_virtual:]

    @property
    def virtual_queries(self) -> bool:
        """Whether the virtual positions are queries too (prompt tuning, p-tuning), not keys only (prefix)."""
        return self.n_virtual > 0 and self.method != "prefix_tuning"

    @property
    def note(self) -> str:
        """What the virtual positions are (or LLaMA-Adapter's gates), in words; "" for a plain capture."""
        if self.prompt_gates:
            gates = ", ".join(f"layer {k} {v:+.3f}" for k, v in sorted(self.prompt_gates.items()))
            return ("LLaMA-Adapter: its prompt is attended in a separate softmax scaled by a gate per layer, "
                    f"not in these maps; gates: {gates}")
        return virtual_note(self.n_virtual, self.method)

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not captured; captured: {self.layers}") from None

    def window_keys(self, window: tuple[int, int] | None = None) -> np.ndarray:
        """The key positions a window's map shows: the window's own tokens, and in front of them the virtual
        positions when the window has moved past them (a soft prompt's keys stay in sight in a long prompt)."""
        lo, hi = window or (0, self.n_tokens)
        front = np.arange(min(self.n_virtual, lo))
        return np.concatenate([front, np.arange(lo, hi)])

    def head(self, layer: int, head: int | str, window: tuple[int, int] | None = None, *,
             keys: np.ndarray | None = None) -> np.ndarray:
        """One head's map as float32 [rows, cols]; head may be an index, "mean" or "max". Rows are the
        window's queries; columns the window's keys, or the positions ``keys`` (``window_keys``) names."""
        block = self.probs[self.layer_index(layer)]
        lo, hi = window or (0, self.n_tokens)
        cols = slice(lo, hi) if keys is None else np.asarray(keys, dtype=np.intp)
        if head == "mean":
            m = block[:, lo:hi][:, :, cols].astype(np.float32).mean(axis=0)
        elif head == "max":
            m = block[:, lo:hi][:, :, cols].max(axis=0).astype(np.float32)
        else:
            m = block[int(head), lo:hi][:, cols].astype(np.float32)
        return m

    def row(self, layer: int, head: int | str, query: int, window: tuple[int, int] | None = None, *,
            keys: np.ndarray | None = None) -> np.ndarray:
        """What token ``query`` attends to (one row of ``head``), over the window's keys (or ``keys``)."""
        lo, hi = window or (0, self.n_tokens)
        cols = slice(lo, hi) if keys is None else np.asarray(keys, dtype=np.intp)
        rows = self.probs[self.layer_index(layer)][:, query, cols].astype(np.float32)
        if head == "mean":
            return rows.mean(axis=0)
        if head == "max":
            return rows.max(axis=0)
        return rows[int(head)]

    def span(self, role: str) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.segments if s.role == role or (role == "answer" and s.role == "end")]

    def virtual_share(self, per_query: bool = False) -> np.ndarray:
        """The share of the real tokens' attention that goes to the virtual positions: float32
        [layers, heads], the mean over the real tokens' queries (``per_query``: [layers, heads, real
        tokens], one value per query). Zeros when there are none."""
        n = self.n_virtual
        if per_query:
            return np.stack([self.probs[li, :, n:, :n].astype(np.float32).sum(-1) for li in range(len(self.layers))])
        return self.summary("virtual") if n else np.zeros((len(self.layers), self.n_heads), np.float32)

    def real_share(self, per_query: bool = False) -> np.ndarray:
        """The share of the real tokens' attention that stays on real tokens (``virtual_share``'s complement:
        the two add up to 1 per query)."""
        n = self.n_virtual
        out = np.stack([self.probs[li, :, n:, n:].astype(np.float32).sum(-1) for li in range(len(self.layers))])
        return out if per_query else out.mean(-1)

    def real_block(self) -> "AttentionCapture":
        """The same capture on the real tokens only (the virtual positions' rows and columns left out; a
        view of ``probs``, no copy). Its rows sum to 1 minus what went to the virtual positions; its
        entropy is that of each row renormalised over the real keys (what the query does among the text);
        the full capture's ``summary("entropy")`` counts the virtual keys too."""
        n = self.n_virtual
        if not n:
            return self
        segments = tuple(replace(s, start=s.start - n, end=s.end - n) for s in self.segments)
        return AttentionCapture(self.input_ids, self.real_tokens, self.layers, self.probs[:, :, n:, n:], segments,
                                self.label, prompt_gates=dict(self.prompt_gates))

    def summary(self, name: str) -> np.ndarray:
        """Per layer x head, from the real tokens' queries: entropy (normalized to [0, 1] by the log of
        the keys each query sees, virtual ones included), attention to the first real token (sink: the
        text's first token, also when virtual positions are in front), to the previous token, the
        attention mass on a template span (system, example, user, answer) from the answer's tokens (all
        real tokens when there is no answer), or on the virtual positions (virtual)."""
        if name not in SUMMARIES:
            raise KeyError(f"unknown summary {name!r}; available: {', '.join(SUMMARIES)}")
        if name not in self._summary_cache:
            self._summary_cache[name] = np.stack([self._layer_summary(name, li) for li in range(len(self.layers))])
        return self._summary_cache[name]

    def _layer_summary(self, name: str, li: int) -> np.ndarray:
        p = self.probs[li].astype(np.float32)  # [H, T, T], one layer at a time keeps memory flat
        T, n = self.n_tokens, self.n_virtual
        if name == "entropy":
            first = max(n, 1)  # row 0 attends only to itself; a real query i sees n + i + 1 keys
            if T <= first:
                return np.zeros(p.shape[0], np.float32)
            rows = p[:, first:]
            total = rows.sum(-1, keepdims=True)  # 1, less in a real block (the virtual positions' share left out)
            rows = rows / np.where(total > 0, total, 1.0)
            plogp = rows * np.log(np.clip(rows, 1e-12, 1.0))
            return (-plogp.sum(-1) / np.log(np.arange(first + 1, T + 1))[None, :]).mean(-1)
        if name == "sink":  # the first real token, whatever is in front of it
            return p[:, n:, n].mean(-1)
        if name == "previous":
            if T - n < 2:
                return np.zeros(p.shape[0], np.float32)
            idx = np.arange(n + 1, T)
            return p[:, idx, idx - 1].mean(-1)
        if name == "virtual":
            return p[:, n:, :n].sum(-1).mean(-1)
        cols = [i for a, b in self.span(name) for i in range(a, b)]
        rows = [i for a, b in self.span("answer") for i in range(a, b)] or list(range(n, T))
        if not cols:
            return np.zeros(p.shape[0], np.float32)
        return p[:, rows][:, :, cols].sum(-1).mean(-1)

    def available_summaries(self) -> list[str]:
        roles = {s.role for s in self.segments}
        return [s for s in SUMMARIES if s in ("entropy", "sink", "previous") or s in roles
                or (s == "virtual" and self.n_virtual > 0)]


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

    Works on full-precision, 4-bit and peft-wrapped models, as they are (an active adapter
    is part of the capture; see ``adapter_disabled``). A prompt method's virtual positions come
    first (``AttentionCapture.n_virtual``); ``segments`` are given in the text's own positions.
    Refuses with AttentionTooLargeError, before running the model, when the estimated memory
    (virtual positions included) is over ``max_bytes`` (default ``MAX_CAPTURE_BYTES``, 1 GiB).
    """
    input_ids, _, layers, n_heads = _plan_capture(model, tokenizer, text, input_ids, layers)
    n_virtual, method = virtual_positions(model)
    check_capture_size(len(input_ids) + n_virtual, layers, n_heads, max_bytes, n_virtual=n_virtual, method=method)
    return _capture(model, tokenizer, input_ids, layers, segments, label)


def _capture(model, tokenizer, input_ids, layers, segments, label) -> AttentionCapture:
    import torch

    n, method = virtual_positions(model)
    T = len(input_ids) + n
    modules = _attention_modules(model)  # now: LLaMA-Adapter swaps its modules in and out with the adapter
    queries = T if method != "prefix_tuning" else T - n  # prefix tuning adds keys and values, not queries
    slot = {layer: k for k, layer in enumerate(layers)}
    out: dict[str, np.ndarray] = {}  # one array for all layers, filled as each layer is computed
    filled: set[int] = set()

    def hook_for(i):
        def hook(_mod, _inp, res):
            weights = res[1] if isinstance(res, tuple) and len(res) > 1 else None
            if weights is None:
                raise RuntimeError("the attention module returned no probabilities; eager attention is needed")
            w = weights[0].detach().to("cpu", torch.float16).numpy()
            if w.shape[-2:] != (queries, T):
                raise RuntimeError(
                    f"layer {i}'s attention is {w.shape[-2]} queries x {w.shape[-1]} keys; expected {queries} x {T} "
                    f"for {len(input_ids)} tokens" + (f" and {n} virtual positions ({method})" if n else "")
                    + ": this model adds positions sftkit does not know")
            if "probs" not in out:  # prefix tuning: the virtual positions' rows stay zero (they query nothing)
                make = np.zeros if queries < T else np.empty
                out["probs"] = make((len(layers), w.shape[0], T, T), np.float16)
            out["probs"][slot[i], :, T - queries:] = w
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
    gates = {i: float(modules[i].adaption_gate.detach().float().reshape(-1)[0]) for i in layers
             if getattr(modules[i], "adaption_gate", None) is not None}
    moved = tuple(replace(s, start=s.start + n, end=s.end + n) for s in segments)
    return AttentionCapture(input_ids, virtual_pieces(n) + readable_tokens(tokenizer, input_ids), layers,
                            out["probs"], moved, label, n, method, gates)


def capture_row(model, tokenizer, template, row: dict, *, few_shot: bool = True, **kwargs) -> AttentionCapture:
    """Capture a template-rendered data row, with its system/example/user/answer spans.

    Takes ``capture_attention``'s keywords (``layers=``, ``max_bytes=``, ``label=``)."""
    r = template.render(row, tokenizer, with_examples=few_shot)
    return capture_attention(model, tokenizer, input_ids=r.input_ids, segments=r.segments, **kwargs)


@contextlib.contextmanager
def adapter_disabled(model):
    """The same model with its adapter switched off (a no-op for a plain model)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@dataclass
class AttentionDiff:
    """``after`` minus ``before`` on the same tokens: signed maps and per-head change.

    When one side has virtual positions the other lacks (a prompt method against its base model),
    the maps compare the real tokens only: ``before`` / ``after`` are then the captures' real blocks,
    ``full`` the two captures as taken, ``moved`` [layers, heads, real tokens] the attention each real
    query sends to virtual positions (either side's), and ``note`` says so. ``summary(name)`` compares
    per-head summaries on the captures as taken. With LLaMA-Adapter, ``note`` gives its gates (its prompt
    is attended outside the maps).
    """

    before: AttentionCapture
    after: AttentionCapture
    delta: np.ndarray  # float32 [L, H, T, T]
    moved: np.ndarray | None = None
    full: tuple[AttentionCapture, AttentionCapture] | None = None
    note: str = ""

    @property
    def layers(self) -> list[int]:
        return self.after.layers

    @property
    def has_virtual(self) -> bool:
        return self.full is not None

    def head(self, layer: int, head: int | str, window: tuple[int, int] | None = None, *,
             keys: np.ndarray | None = None) -> np.ndarray:
        d = self.delta[self.after.layer_index(layer)]
        lo, hi = window or (0, d.shape[-1])
        sl = d[:, lo:hi][:, :, slice(lo, hi) if keys is None else np.asarray(keys, dtype=np.intp)]
        if head == "mean":
            return sl.mean(axis=0)
        if head == "max":  # the largest change by magnitude, with its sign
            idx = np.abs(sl).argmax(axis=0)
            return np.take_along_axis(sl, idx[None], axis=0)[0]
        return sl[int(head)]

    def row(self, layer: int, head: int | str, query: int, window: tuple[int, int] | None = None, *,
            keys: np.ndarray | None = None) -> np.ndarray:
        d = self.delta[self.after.layer_index(layer)]
        lo, hi = window or (0, d.shape[-1])
        rows = d[:, query, slice(lo, hi) if keys is None else np.asarray(keys, dtype=np.intp)]
        if head == "mean":
            return rows.mean(axis=0)
        if head == "max":
            return np.take_along_axis(rows, np.abs(rows).argmax(axis=0)[None], axis=0)[0]
        return rows[int(head)]

    def change(self) -> np.ndarray:
        """Per layer x head: mean over query tokens of the total variation distance between
        the two attention rows (0 = identical, 1 = disjoint). With virtual positions on one side
        only, those are keys the other side gives nothing: their share counts as moved. Two prefix
        captures: over the real tokens' queries (the prefix positions query nothing on either side)."""
        tv = np.stack([np.abs(d).sum(-1) for d in self.delta])  # a layer at a time
        if self.moved is not None:
            tv += self.moved
        elif self.after.n_virtual and not self.after.virtual_queries:
            tv = tv[..., self.after.n_virtual:]
        return 0.5 * tv.mean(-1)

    def summary(self, name: str) -> np.ndarray:
        """A per-head summary (``AttentionCapture.summary``'s names), after's minus before's, each taken on
        the capture as it was made (``full``): an adapter's entropy counts its virtual keys, its sink is the
        first real token on both sides, a virtual share is 0 on a side without virtual positions."""
        b, a = self.full or (self.before, self.after)
        return a.summary(name) - b.summary(name)

    def virtual_share(self) -> np.ndarray:
        """The virtual positions' share of the real tokens' attention [layers, heads]: after's minus
        before's (a side without virtual positions gives 0)."""
        b, a = self.full or (self.before, self.after)
        return a.virtual_share() - b.virtual_share()


def diff_captures(before: AttentionCapture, after: AttentionCapture) -> AttentionDiff:
    """``after`` minus ``before``. Captures with different virtual positions (a prompt method vs its base)
    are compared on their real tokens; the attention that went to virtual positions counts in ``change``."""
    if before.input_ids != after.input_ids:
        raise ValueError(
            f"the two captures are of different tokens ({before.n_real} vs {after.n_real}); a map-by-map "
            "difference needs the same tokens: compare prompts of the same tokenization, or compare summaries")
    if before.layers != after.layers:
        raise ValueError(f"the two captures hold different layers ({before.layers} vs {after.layers})")
    moved = full = None
    note = ""
    if (before.n_virtual, before.method) != (after.n_virtual, after.method):
        full = (before, after)
        moved = sum(c.virtual_share(per_query=True) for c in full if c.n_virtual)
        sides = "; ".join(f"{c.label or which}: {c.note}" for which, c in (("before", before), ("after", after))
                          if c.n_virtual)
        note = (f"compared on the {after.n_real} real tokens only ({sides}); the other side has no such "
                "positions, so the attention that goes to them counts as moved in 'change'")
        before, after = before.real_block(), after.real_block()
    elif after.prompt_gates or before.prompt_gates:  # LLaMA-Adapter: its prompt is attended outside these maps
        note = "; ".join(f"{c.label or which}: {c.note}" for which, c in (("before", before), ("after", after))
                         if c.prompt_gates)
    delta = after.probs.astype(np.float32)
    np.subtract(delta, before.probs, out=delta)  # no second float32 copy
    return AttentionDiff(before, after, delta, moved, full, note)


def adapter_diff(model, tokenizer, text: str | None = None, *, input_ids: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None, segments: Sequence[Segment] = (),
                 max_bytes: int | None = None) -> AttentionDiff:
    """Base model vs fine-tuned adapter on the same input: one loaded model, adapter off then on.

    Any peft method: a prompt method's virtual positions exist only with the adapter on, so the maps
    compare the real tokens (``AttentionDiff.note`` says so). ``max_bytes`` bounds the whole: both
    captures and their float32 difference, checked before either forward pass.
    """
    input_ids, _, layers, n_heads = _plan_capture(model, tokenizer, text, input_ids, layers)
    n_virtual, method = virtual_positions(model)
    check_capture_size(len(input_ids) + n_virtual, layers, n_heads, max_bytes, diff=True, n_virtual=n_virtual,
                       method=method)
    with adapter_disabled(model):
        before = _capture(model, tokenizer, input_ids, layers, segments, "base")
    after = _capture(model, tokenizer, input_ids, layers, segments, "adapter")
    return diff_captures(before, after)

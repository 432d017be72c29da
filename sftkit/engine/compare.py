"""Prompt or fine-tune? Several variants of one base model answer the same held-out items.

A variant is a template (zero-shot or with few-shot examples) and optionally a trained adapter.
The base model is loaded once by the caller; adapters are attached to it once and switched, and
the base variants run with the adapters disabled. Each item gets, per variant: the output, its
latency and token count, the task score (when a scorer is given), exact match, chrF, BLEU,
ROUGE-L, and the reference answer's mean token loss and perplexity (teacher-forced, on the answer
and its end of turn). Label tasks (a ``labels`` function) also get macro-F1 over the classes.
Adapters are also checked for forgetting: perplexity on general text (the Python documentation
shipped with every Python) and the KL divergence from the base model.

    model, tokenizer = sftkit.load_model(run.config().model.spec)
    result = compare([Variant.zero_shot(tpl), Variant.from_run(run)], rows, model=model,
                     tokenizer=tokenizer, scorer=teaching_task("dates").score)
    result.summary(); result.verdict("zero-shot", run.name)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.runstore import append_jsonl, read_jsonl
from ..core.template import Template, as_text

CACHE_FILE = "compare.jsonl"
METRICS = ("score", "exact_match", "chrf", "bleu", "rouge_l", "ref_loss", "ref_ppl")
BINARY = ("score", "exact_match")


# ---- variants ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of answering: a template (with or without its few-shot examples), maybe an adapter."""

    name: str
    template: Template
    adapter: str | None
    few_shot: bool
    max_new_tokens: int = 32

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"variant name={self.name!r} is not allowed; allowed: a non-empty string")
        if not isinstance(self.template, Template):
            raise ValueError(f"variant {self.name!r}: template must be a Template, got {type(self.template).__name__}")
        if self.adapter is not None:
            object.__setattr__(self, "adapter", str(self.adapter))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"variant {self.name!r}: max_new_tokens={self.max_new_tokens!r}; allowed: an integer >= 1")

    @classmethod
    def zero_shot(cls, template: Template, name: str = "zero-shot", **kwargs) -> "Variant":
        """The base model, the template without examples."""
        return cls(name, template, None, False, **kwargs)

    @classmethod
    def from_run(cls, run, name: str | None = None, **kwargs) -> "Variant":
        """A trained run: its own template, its adapter, on the same base model."""
        from ..core.runstore import RunFolder, RunStateError

        run = run if isinstance(run, RunFolder) else RunFolder(run)
        if not run.exists():
            raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
        if not run.has_adapter():
            raise RunStateError(f"run {run.name} has no adapter ({run.adapter_dir}/adapter_config.json is "
                                f"missing; the run is {run.state()}): only finished or stopped LoRA runs compare")
        template = run.config().resolved_template()
        return cls(name or run.name, template, str(run.adapter_dir), bool(template.examples), **kwargs)

    def fingerprint(self, model, tokenizer) -> str:
        """What the answers depend on: base model, tokenizer, template, examples, adapter weights."""
        h = hashlib.sha256()
        config = getattr(model, "config", None)
        base = getattr(model, "get_base_model", lambda: model)()
        parts = {
            "model": getattr(config, "_name_or_path", "") or getattr(getattr(base, "config", None), "_name_or_path", ""),
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "vocab": len(tokenizer),
            "template": self.template.to_dict(),
            "few_shot": self.few_shot,
            "max_new_tokens": self.max_new_tokens,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "dtype": str(getattr(base, "dtype", "")),
            "quantization": str(getattr(getattr(base, "config", None), "quantization_config", None)),
            "weights": _weights_identity(getattr(getattr(base, "config", None), "_name_or_path", "")),
            "generation": GENERATION_VERSION,
        }
        h.update(json.dumps(parts, sort_keys=True, default=str).encode())
        if self.adapter is not None:
            for f in sorted(Path(self.adapter).iterdir()):
                if f.is_file() and f.name.startswith("adapter_"):
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
        return h.hexdigest()[:24]


def _weights_identity(folder: str) -> list:
    """Names, sizes and modification times of a local model folder's weight files: a model replaced
    in the same folder (a new merge, a new conversion) gets a new cache key."""
    path = Path(folder) if folder else None
    if path is None or not path.is_dir():
        return []
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin", ".gguf")]


def _few_shot(cls, template: Template, examples: Sequence[dict], name: str = "few-shot", *,
              items: Sequence[dict] | None = None, **kwargs) -> Variant:
    """The base model, the template with ``examples`` (rows from the TRAINING split) as earlier turns.
    With ``items`` (the evaluated rows) an example that is also an item is refused here already."""
    examples = [dict(e) for e in examples]
    if not examples:
        raise ValueError("a few-shot variant needs at least one example (rows from the training split)")
    template = template.with_examples(examples)
    if items is not None:
        check_examples(template, items, name)
    return cls(name, template, None, True, **kwargs)


# ``few_shot`` is also a field (whether the examples are shown); set after the dataclass is made so
# the field has no default. Instances read their own value, the class offers the constructor.
Variant.few_shot = classmethod(_few_shot)


def _input_key(template: Template, row: dict) -> str:
    return json.dumps([as_text(row.get(f)) for f in template.input_fields], ensure_ascii=False)


def check_examples(template: Template, items: Sequence[dict], name: str = "few-shot") -> None:
    """Few-shot examples must not be evaluated items (that would show the model the answers)."""
    keys = {_input_key(template, r): i for i, r in enumerate(items)}
    overlap = [(j, keys[k]) for j, ex in enumerate(template.examples) if (k := _input_key(template, ex)) in keys]
    if overlap:
        shown = ", ".join(f"example {j} = item {i} ({template.user_text(items[i])[:40]!r})" for j, i in overlap[:5])
        raise ValueError(f"few-shot variant {name!r}: {len(overlap)} example(s) are evaluated items ({shown}); "
                         f"draw the examples from the training split, never from the items compared")


def _item_hash(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


# ---- the comparison (plain data) ----------------------------------------------------------------
def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in values)


@dataclass
class Comparison:
    """Per-item results of every variant on the same items, and the paired statistics over them."""

    variants: list[str]
    items: list[dict]
    results: dict[str, list[dict]]
    forgetting: dict[str, dict] = field(default_factory=dict)
    complete: bool = True
    primary: str = "exact_match"  # the headline metric: the task score when a scorer was given
    inputs: dict[str, list[str]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    labels: list[str] | None = None  # label tasks: the classes macro-F1 averages over
    _pairs: list | None = field(default=None, repr=False, compare=False)
    _f1_cis: dict = field(default_factory=dict, repr=False, compare=False)  # computed once (bootstraps are slow)

    @property
    def n(self) -> int:
        """Items every variant answered (fewer than ``len(items)`` when the comparison was stopped)."""
        return min((len(r) for r in self.results.values()), default=0)

    def metrics(self) -> list[str]:
        present = set().union(*(r.keys() for rs in self.results.values() for r in rs[:1])) if self.results else set()
        return [m for m in METRICS if m in present]

    def values(self, variant: str, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.results[variant][: self.n]]

    @property
    def labelled(self) -> bool:
        """A label task: each result holds the predicted ``label`` and the reference's ``ref_label``."""
        return bool(self.labels)

    def macro_f1(self, variant: str, indices=None) -> float:
        """Macro-F1 of ``variant`` over the classes (on ``indices`` of the items, default all)."""
        from ..core.textmetrics import macro_f1

        rows = self.results[variant][: self.n]
        if indices is not None:
            rows = [rows[int(i)] for i in indices]
        return macro_f1([r["label"] for r in rows], [r["ref_label"] for r in rows], self.labels)

    def macro_f1_ci(self, variant: str) -> tuple[float, float, float]:
        """Macro-F1 with its bootstrap 95% interval (computed once per variant: bootstraps are slow)."""
        from ..core.stats import bootstrap_statistic

        key = (variant, self.n)
        if key not in self._f1_cis:
            d = bootstrap_statistic(self.n, lambda i: self.macro_f1(variant, i), seed=self.seed)
            self._f1_cis[key] = (d.diff, d.low, d.high)
        return self._f1_cis[key]

    # ---- summaries ---------------------------------------------------------------------------
    def _mean_ci(self, values: list[float]) -> tuple[float, float, float]:
        from ..core.stats import paired_bootstrap, wilson_interval

        if not values:
            return math.nan, math.nan, math.nan
        mean = sum(values) / len(values)
        if _is_binary(values):
            lo, hi = wilson_interval(sum(values), len(values))
        else:
            d = paired_bootstrap(values, [0.0] * len(values), seed=self.seed)
            lo, hi = d.low, d.high
        return mean, min(lo, mean), max(hi, mean)  # float noise at 0% / 100% stays inside

    def summary(self) -> dict[str, dict]:
        """Per variant: each metric's mean (binary ones with a Wilson 95% interval), latency, tokens/s."""
        out = {}
        for v in self.variants:
            rows = self.results[v][: self.n]
            s: dict = {"n": len(rows)}
            for m in self.metrics():
                vals = [float(r[m]) for r in rows if r.get(m) is not None and math.isfinite(float(r[m]))]
                s[m] = sum(vals) / len(vals) if vals else math.nan
                if m in BINARY:
                    s[m + "_ci"] = self._mean_ci(vals)[1:]
            seconds = sum(r["latency"] for r in rows)
            tokens = sum(r["tokens"] for r in rows)
            if self.labelled and rows:
                s["macro_f1"], *s["macro_f1_ci"] = self.macro_f1_ci(v)
                s["macro_f1_ci"] = tuple(s["macro_f1_ci"])
            s["latency"] = seconds / len(rows) if rows else math.nan
            s["tokens_per_s"] = tokens / seconds if seconds > 0 else math.nan
            out[v] = s
        return out

    def pairs(self) -> list[dict]:
        """For every pair (a, b): McNemar on the binary score, a seeded paired bootstrap CI of the mean
        difference a - b for each metric, and wins/ties/losses of a on the headline metric."""
        from ..core.stats import bootstrap_statistic, mcnemar_exact, paired_bootstrap, win_tie_loss

        if self._pairs is not None:
            return self._pairs
        out = []
        if self.n == 0:
            return out
        for i, a in enumerate(self.variants):
            for b in self.variants[i + 1:]:
                pa, pb = self.values(a, self.primary), self.values(b, self.primary)
                test = mcnemar_exact(pa, pb) if _is_binary(pa) and _is_binary(pb) else None
                diffs = {}
                for m in self.metrics():
                    xa, xb = self.values(a, m), self.values(b, m)
                    if all(math.isfinite(x) for x in xa + xb):
                        diffs[m] = paired_bootstrap(xa, xb, seed=self.seed)
                if self.labelled:
                    diffs["macro_f1"] = bootstrap_statistic(
                        self.n, lambda idx, a=a, b=b: self.macro_f1(a, idx) - self.macro_f1(b, idx), seed=self.seed)
                wins, ties, losses = win_tie_loss(pa, pb)
                out.append({"a": a, "b": b, "n": self.n, "mcnemar": test, "diffs": diffs,
                            "wins": wins, "ties": ties, "losses": losses})
        self._pairs = out
        return out

    def _pair(self, a: str, b: str) -> dict:
        for p in self.pairs():
            if (p["a"], p["b"]) == (a, b):
                return p
            if (p["a"], p["b"]) == (b, a):
                from ..core.stats import McNemar, PairedDifference

                d, t = p["diffs"][self.primary], p["mcnemar"]
                return {**p, "a": a, "b": b, "wins": p["losses"], "losses": p["wins"],
                        "diffs": {self.primary: PairedDifference(-d.diff, -d.high, -d.low, d.n, d.confidence)},
                        "mcnemar": None if t is None else McNemar(t.b_only, t.a_only, t.both, t.neither, t.p_value)}
        raise KeyError(f"no variants {a!r} and {b!r} to compare; variants: {', '.join(self.variants)}")

    def verdict(self, a: str, b: str) -> str:
        """The pair in plain words (on the headline metric): which is better, by how much, how sure."""
        from ..core.stats import paired_verdict

        p = self._pair(a, b)
        binary = p["mcnemar"] is not None
        return paired_verdict(a, b, p["diffs"][self.primary], p["mcnemar"],
                              scale=100.0 if binary else 1.0, unit="points" if binary else self.primary)

    # ---- export -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        variants = []
        for v in self.variants:
            vals = self.values(v, self.primary)
            mean, lo, hi = self._mean_ci(vals)
            entry = {"name": v, "score": _finite(mean), "ci": [_finite(lo), _finite(hi)], "n": len(vals)}
            if self.labelled and vals:
                f1, f1_lo, f1_hi = self.macro_f1_ci(v)
                entry["macro_f1"], entry["macro_f1_ci"] = _finite(f1), [_finite(f1_lo), _finite(f1_hi)]
            variants.append(entry)
        pairs = []
        for p in self.pairs():
            d = p["diffs"].get(self.primary)
            pairs.append({"a": p["a"], "b": p["b"], "diff": _finite(d.diff) if d else None,
                          "ci": [_finite(d.low) if d else None, _finite(d.high) if d else None],
                          "p_value": None if p["mcnemar"] is None else float(p["mcnemar"].p_value),
                          "wins": p["wins"], "losses": p["losses"], "ties": p["ties"]})
            if self.labelled and "macro_f1" in p["diffs"]:
                f = p["diffs"]["macro_f1"]
                pairs[-1]["macro_f1_diff"] = _finite(f.diff)
                pairs[-1]["macro_f1_ci"] = [_finite(f.low), _finite(f.high)]
        forgetting = {v: {k: _finite(f.get(k)) for k in ("general_ppl_base", "general_ppl_adapter", "kl")}
                      for v, f in self.forgetting.items()}
        return {"variants": variants, "pairs": pairs, "forgetting": forgetting}

    def to_csv(self, path: str | Path) -> Path:
        """One row per item and variant: input, reference, output, metrics, latency, tokens."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = self.metrics()
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            labels = ["label", "ref_label"] if self.labelled else []
            w.writerow(["variant", "item", "input", "reference", "output", *metrics, *labels, "latency", "tokens"])
            for v in self.variants:
                for i, r in enumerate(self.results[v]):
                    w.writerow([v, i, self.inputs[v][i], self.references[v][i], r["output"],
                                *[r.get(m) for m in metrics], *[r.get(k) for k in labels], r["latency"], r["tokens"]])
        return path


# ---- running it -----------------------------------------------------------------------------------
def _classes(labels, classes, references: dict[str, list[str]]) -> list[str] | None:
    if labels is None:
        return None
    if classes is not None:
        return sorted({str(c) for c in classes})
    return sorted({str(labels(r)) for refs in references.values() for r in refs})


def _adapter_slot(i: int, name: str) -> str:
    return f"v{i}_" + re.sub(r"\W", "_", name)[:40]


def _attach(model, variants: Sequence[Variant]):
    """Attach every adapter once to the same base; returns (model, slot per variant name, attached here)."""
    from peft import PeftModel

    slots: dict[str, str] = {}
    wrapped = False
    for v in variants:  # every adapter is checked before the model is touched
        if v.adapter is not None and not (Path(v.adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"variant {v.name!r}: {v.adapter} holds no adapter (adapter_config.json)")
    try:
        for i, v in enumerate(variants):
            if v.adapter is None:
                continue
            slot = _adapter_slot(i, v.name)
            if isinstance(model, PeftModel):
                model.load_adapter(v.adapter, adapter_name=slot, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, v.adapter, adapter_name=slot, is_trainable=False)
                wrapped = True
            slots[v.name] = slot
    except BaseException:
        _detach(model, slots, wrapped, None)  # a failure half-way leaves the caller's model as it was
        raise
    model.eval()
    return model, slots, wrapped


def _detach(model, slots: dict, wrapped: bool, previous) -> None:
    """Take out what ``_attach`` added: the adapter layers (a plain model) or the added adapters. A prompt
    method's wrapper never touched the model; LLaMA-Adapter's attention wrappers are taken out."""
    if wrapped:
        kinds = {str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1] for c in model.peft_config.values()}
        if "ADAPTION_PROMPT" in kinds:
            for slot in list(model.peft_config):
                model.base_model.delete_adapter(slot)
        elif not kinds & PROMPT_TYPES:
            model.unload()
    elif slots:
        for slot in slots.values():
            model.delete_adapter(slot)
        if previous is not None:
            model.set_adapter(previous)


class _Active:
    """Context: the variant's adapter is the active one, or (base variants) all adapters are off."""

    def __init__(self, model, slot: str | None):
        self.model, self.slot, self._ctx = model, slot, None

    def __enter__(self):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if self.slot is None:
                self._ctx = self.model.disable_adapter()
                self._ctx.__enter__()
            else:
                self.model.set_adapter(self.slot)
                for p in self.model.parameters():  # comparing never trains (any peft method): no grads needed
                    p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def _token_logits(logits, length: int):
    """The logits of the input's own tokens: prompt tuning and p-tuning put their virtual tokens' logits first."""
    return logits[:, -length:]


def _adapter_type(path: str) -> str:
    try:
        return json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type", "")
    except (OSError, ValueError):
        return ""


def _shareable(variants: Sequence[Variant]) -> bool:
    """Adapters share one PeftModel only when they are all of one injected type (LoRA with LoRA, IA3 with
    IA3); a prompt method wraps the model without touching it and has one adapter per wrapper."""
    types = {_adapter_type(v.adapter) for v in variants if v.adapter is not None}
    return len(types) <= 1 and not (types & PROMPT_TYPES and sum(v.adapter is not None for v in variants) > 1)


PROMPT_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT"}


def _merged(parts: list[Comparison], order: list[str]) -> Comparison:
    """Comparisons of the same items (made one group of variants at a time) as one."""
    first = parts[0]
    n = min(c.n for c in parts)
    pick = {v: c for c in parts for v in c.variants}
    return Comparison(variants=order, items=first.items, results={v: pick[v].results[v][:n] for v in order},
                      forgetting={k: f for c in parts for k, f in c.forgetting.items()},
                      complete=all(c.complete for c in parts), primary=first.primary,
                      inputs={v: pick[v].inputs[v][:n] for v in order},
                      references={v: pick[v].references[v][:n] for v in order}, seed=first.seed, labels=first.labels)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _stop_ids(model, tokenizer) -> set[int]:
    """Every token id that ends generation: the model's generation config (which may list several, e.g.
    the end-of-turn token) and the tokenizer's end of sequence."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple, set)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids}


def _active_peft_type(model) -> str:
    """The active adapter's peft type ("" for a plain model or with the adapters disabled)."""
    try:
        return str(model.active_peft_config.peft_type).rsplit(".", 1)[-1]
    except (AttributeError, KeyError, TypeError):
        return ""


# Measured with peft 0.21.2 / transformers 5.24: greedy generation through the KV cache goes wrong after the
# first token with prompt tuning, p-tuning and prefix tuning (a run whose teacher-forced eval loss is 0.04
# answered 0 of 40 items); without the cache prompt and p-tuning answer as a full forward does (what training
# computes). With prefix tuning ``generate`` answers differently from the forward even without the cache and
# one row at a time: on one trained prefix adapter and 40 items, 60.0% against 87.5% by full forwards (12 items
# right only with the forwards, 1 only with generate). transformers warns there that peft's prefix, handed over
# as ``past_key_values``, is ignored because generate also sets ``cache``. So prefix answers are decoded by full
# forwards (``decode_by_forward``), one row at a time.
NO_CACHE_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
FORWARD_DECODED_TYPES = ("PREFIX_TUNING",)
GENERATION_VERSION = 2  # part of a comparison's cache key: answers cached before prefix tuning's fix are not reused


def decode_by_forward(model, input_ids: list[int], max_new_tokens: int, stops: set[int], *,
                      temperature: float | None = None, top_p: float = 1.0, generator=None,
                      stop_event: threading.Event | None = None,
                      on_token: Callable[[list[int]], None] | None = None) -> list[int]:
    """New token ids after ``input_ids``, each from a full forward over everything so far: the computation
    training does, for adapters that ``generate`` gets wrong. Greedy, or sampled when ``temperature`` is given
    (nucleus ``top_p``; ``generator``, a CPU ``torch.Generator``, for the draws, else torch's global one; no
    top-k). Ends after a stop id (kept), at ``max_new_tokens`` or when ``stop_event`` is set; ``on_token`` gets
    the new ids after each token."""
    import torch

    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not allowed; allowed: a number > 0 (None: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed; allowed: a number in (0, 1]")
    ids = torch.tensor([list(input_ids)], device=model.device)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if stop_event is not None and stop_event.is_set():
                break
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            if temperature is None:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()  # drawn on the CPU: the generator's device
                if top_p < 1.0:  # the smallest set of tokens whose probability reaches top_p (at least one)
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(0) - sorted_p < top_p
                    keep[0] = True
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
            if on_token is not None:
                on_token(new)
            if token in stops:
                break
    return new


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[int], float]:
    import torch

    kind = _active_peft_type(model)
    if kind in FORWARD_DECODED_TYPES:
        started = time.perf_counter()
        stops = _stop_ids(model, tokenizer)
        new = [decode_by_forward(model, tokenizer(p, add_special_tokens=False).input_ids, max_new_tokens, stops)
               for p in prompts]
        return (tokenizer.batch_decode(new, skip_special_tokens=True), [len(n) for n in new],
                time.perf_counter() - started)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tokenizer),
                             eos_token_id=sorted(_stop_ids(model, tokenizer)) or None,
                             use_cache=kind not in NO_CACHE_TYPES)
    seconds = time.perf_counter() - started
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    stops = _stop_ids(model, tokenizer)
    counts = [next((k + 1 for k, t in enumerate(seq) if t in stops), len(seq)) for seq in new]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts, counts, seconds


def _reference_losses(model, tokenizer, rendered) -> list[float]:
    """Mean token loss of each rendered example's trained tokens (teacher-forced); nan with none."""
    import torch

    width = max(len(r.input_ids) for r in rendered)
    pad = _pad_id(tokenizer)
    ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rendered], device=model.device)
    att = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rendered],
                       device=model.device)
    labels = torch.tensor([r.labels + [-100] * (width - len(r.input_ids)) for r in rendered], device=model.device)
    with torch.no_grad():
        logits = _token_logits(model(input_ids=ids, attention_mask=att).logits, ids.shape[1]).float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none")
    keep = (target != -100).float()
    counts = keep.sum(1)
    sums = (ce * keep).sum(1)
    return [float(s / c) if c > 0 else math.nan for s, c in zip(sums.tolist(), counts.tolist())]


def general_text(tokenizer, n_tokens: int = 512) -> list[int]:
    """The first ``n_tokens`` tokens of the Python documentation's topics (sorted by name)."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for key in sorted(topics):
        ids += tokenizer(topics[key] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def _forgetting(model, tokenizer, slots: dict[str, str], n_tokens: int) -> dict[str, dict]:
    """Per adapter: perplexity of the base and the adapter on general text, and mean KL(base || adapter)."""
    import torch

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or n_tokens
    ids = general_text(tokenizer, min(n_tokens, int(limit)))
    x = torch.tensor([ids], device=model.device)

    def logprobs(slot):
        with _Active(model, slot), torch.no_grad():
            return torch.log_softmax(_token_logits(model(input_ids=x).logits, x.shape[1])[0, :-1].float(), dim=-1)

    target = x[0, 1:]
    base = logprobs(None)
    base_nll = float(-base.gather(1, target[:, None]).mean())
    out = {}
    for name, slot in slots.items():
        lp = logprobs(slot)
        nll = float(-lp.gather(1, target[:, None]).mean())
        kl = float((base.exp() * (base - lp)).sum(-1).mean())
        out[name] = {"general_ppl_base": math.exp(base_nll), "general_ppl_adapter": math.exp(nll),
                     "kl": max(kl, 0.0), "tokens": len(ids)}
    return out


def _metrics(output: str, reference: str, row: dict, scorer) -> dict:
    from ..core.textmetrics import bleu_items, chrf_items, exact_match_items, rouge_l_items

    out = {}
    if scorer is not None:
        out["score"] = float(scorer(output, row))
    out["exact_match"] = float(exact_match_items([output], [reference])[0])
    out["chrf"] = chrf_items([output], [reference])[0]
    out["bleu"] = bleu_items([output], [reference])[0]
    out["rouge_l"] = rouge_l_items([output], [reference])[0]
    return out


def compare(variants: Sequence[Variant], rows: Sequence[dict], *, model, tokenizer,
            scorer: Callable[[str, dict], float] | None = None,
            labels: Callable[[str], str] | None = None, classes: Sequence[str] | None = None,
            batch_size: int = 8, seed: int = 0,
            forgetting: bool = True, general_text_tokens: int = 512, cache: str | Path | None = None,
            progress: Callable[[int, int], None] | None = None,
            stop: threading.Event | None = None) -> Comparison:
    """Every variant answers every row (greedy, batched, left padding) on the one base ``model``.

    scorer: ``scorer(output, row)`` -> 0/1, the headline score (e.g. ``teaching_task("dates").score``);
        without one the headline is exact match.
    labels: for label tasks, ``labels(text)`` -> the class an output (or a reference) names (e.g.
        ``teaching_task("intent").label``); adds macro-F1 over ``classes`` (default: the classes of
        the references) with bootstrap intervals, per variant and per pair.
    cache: a folder; results are appended to ``compare.jsonl`` there per (variant, item content) and
        reused by later calls, so only new variants or items are generated.
    progress: ``progress(done, total)`` in answered item-variants. stop: a ``threading.Event``,
        checked between batches; a stopped comparison returns what it has with ``complete=False``.
    The caller's model is left as it was (adapters attached here are removed again).
    """
    variants, rows = list(variants), [dict(r) for r in rows]
    if not variants:
        raise ValueError("no variants to compare")
    if not rows:
        raise ValueError("no items to compare")
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"variant names must differ; repeated: {', '.join(dup)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: an integer >= 1")
    for v in variants:
        if v.few_shot and v.template.examples:
            check_examples(v.template, rows, v.name)
        v.template.check_columns(sorted({k for r in rows for k in r}))
    if not _shareable(variants):  # e.g. LoRA next to a soft prompt: each adapter on the base model in turn
        for v in variants:
            if v.adapter is not None and not (Path(v.adapter) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"variant {v.name!r}: {v.adapter} holds no adapter (adapter_config.json)")
        groups = [[v for v in variants if v.adapter is None]] + [[v] for v in variants if v.adapter is not None]
        done_before, parts = 0, []
        for group in [g for g in groups if g]:
            def part_progress(done, total, offset=done_before):
                if progress is not None:
                    progress(offset + done, len(rows) * len(variants))

            parts.append(compare(group, rows, model=model, tokenizer=tokenizer, scorer=scorer, labels=labels,
                                 classes=classes, batch_size=batch_size, seed=seed, forgetting=forgetting,
                                 general_text_tokens=general_text_tokens, cache=cache, progress=part_progress,
                                 stop=stop))
            done_before += len(rows) * len(group)
            if not parts[-1].complete:
                break
        made = {name for part in parts for name in part.variants}
        merged = _merged(parts, [v.name for v in variants if v.name in made])
        merged.complete = merged.complete and len(merged.variants) == len(variants)
        return merged

    cached: dict[tuple[str, str], dict] = {}
    cache_path = None
    if cache is not None:
        cache_path = Path(cache) / CACHE_FILE
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        for rec in read_jsonl(cache_path)[0]:
            if isinstance(rec, dict) and "variant" in rec and "item" in rec and "result" in rec:
                cached[(rec["variant"], rec["item"])] = rec["result"]

    import copy

    from peft import PeftModel

    previous = model.active_adapter if isinstance(model, PeftModel) else None
    original, was_training = model, model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model, slots, wrapped = _attach(model, variants)
    tokenizer = copy.deepcopy(tokenizer)  # our own padding settings; the caller's tokenizer is untouched
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    raw: dict[str, list[dict]] = {v.name: [] for v in variants}
    total = len(rows) * len(variants)
    done, complete = 0, True
    try:
        fps = {v.name: v.fingerprint(model, tokenizer) for v in variants}
        # the reference loss sees the whole conversation: no cut at the template's max_length
        # and it scores the answer and its end of turn, also for templates that train on every token
        scoring = {v.name: Template(**{**v.template.to_dict(), "max_length": 1 << 20, "train_on": "completion"})
                   for v in variants}
        hashes = [_item_hash(r) for r in rows]
        for start in range(0, len(rows), batch_size):
            if stop is not None and stop.is_set():
                complete = False
                break
            batch = rows[start:start + batch_size]
            keys = hashes[start:start + batch_size]
            for v in variants:
                fp = fps[v.name]
                todo = [i for i, k in enumerate(keys) if (fp, k) not in cached]
                if todo:
                    prompts = [v.template.prompt_text(batch[i], tokenizer, with_examples=v.few_shot) for i in todo]
                    rendered = [scoring[v.name].render(batch[i], tokenizer, with_examples=v.few_shot) for i in todo]
                    with _Active(model, slots.get(v.name)):
                        texts, counts, seconds = _generate(model, tokenizer, prompts, v.max_new_tokens)
                        tokenizer.padding_side = "right"
                        try:
                            losses = _reference_losses(model, tokenizer, rendered)
                        finally:
                            tokenizer.padding_side = "left"
                    for j, i in enumerate(todo):
                        res = {"output": texts[j], "latency": seconds / len(todo), "tokens": counts[j],
                               "ref_loss": losses[j]}
                        cached[(fp, keys[i])] = res
                        if cache_path is not None:
                            append_jsonl(cache_path, {"variant": fp, "variant_name": v.name, "item": keys[i],
                                                      "result": res})
                raw[v.name] += [cached[(fp, k)] for k in keys]
                done += len(batch)
                if progress is not None:
                    progress(done, total)
        forget = {}
        if complete and forgetting and slots:
            forget = _forgetting(model, tokenizer, slots, general_text_tokens)
    finally:
        _detach(model, slots, wrapped, previous)
        for n, p in original.named_parameters():  # trainability and mode as the caller left them
            if n in grads:
                p.requires_grad_(grads[n])
        original.train(was_training)

    results: dict[str, list[dict]] = {}
    inputs: dict[str, list[str]] = {}
    references: dict[str, list[str]] = {}
    for v in variants:
        items = rows[: len(raw[v.name])]
        refs = [as_text(r.get(v.template.answer_field)) for r in items]
        out = []
        for rec, row, ref in zip(raw[v.name], items, refs):
            loss = rec["ref_loss"]
            loss = math.nan if loss is None else float(loss)
            out.append({"output": rec["output"], "latency": float(rec["latency"]), "tokens": int(rec["tokens"]),
                        **_metrics(rec["output"], ref, row, scorer), "ref_loss": loss,
                        "ref_ppl": math.exp(loss) if math.isfinite(loss) else math.nan})
            if labels is not None:
                out[-1]["label"], out[-1]["ref_label"] = str(labels(rec["output"])), str(labels(ref))
        results[v.name] = out
        inputs[v.name] = [v.template.user_text(r) for r in items]
        references[v.name] = refs
    return Comparison(variants=names, items=rows, results=results, forgetting=forget, complete=complete,
                      primary="score" if scorer is not None else "exact_match", inputs=inputs,
                      references=references, seed=seed, labels=_classes(labels, classes, references))

"""A method shoot-out: PEFT methods of the course's families trained on the same rows with the same step budget
and seed.

Each method is one ordinary run (one folder, one ``sftkit train`` process, one after the other: the
same curves, Stop, history and export as any run). Then one comparison scores every run on the
same held-out items (``sftkit.engine.compare``: task score with a Wilson interval, the paired test
against the best method, forgetting on general text). The table keeps, per method: trainable
parameters (the requires_grad count the run checked), peak memory, tokens/s, wall time, eval
loss, score with CI, the paired verdict against the best, forgetting. It is saved in the run store
(``<store>/shootouts/<name>.json``) beside the runs, so a re-opened notebook shows it again.

    result = sftkit.compare_methods("dates", budget=sftkit.Budget(steps=30))
    result.table()          # one dict per method
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from ..core.atomic import write_text_atomic
from ..core.runconfig import AdapterConfig, RunConfig, RunConfigError
from ..core.runstore import RunFolder

SHOOTOUT_DIR = "shootouts"


@dataclass(frozen=True)
class Method:
    """One contestant: a name, its adapter section and its own learning rate (each family has its usual range:
    a soft prompt needs a far larger step than LoRA)."""

    name: str
    adapter: dict
    learning_rate: float

    def __post_init__(self):
        AdapterConfig(**self.adapter)  # every knob checked now, naming the field, before anything trains
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise RunConfigError(f"method {self.name!r}: learning_rate={self.learning_rate!r} is not allowed; "
                                 "allowed: a number in (0, 1]")


# The families of the course, each with settings that train on a CPU in minutes. Learning rates:
# LoRA/DoRA 2e-4..1e-3 (peft, QLoRA papers); IA3 ~3e-3 (T-Few); prompt/prefix tuning 1e-2..3e-1 (Lester et al.,
# Li & Liang); LLaMA-Adapter ~9e-3 (its paper); BitFit ~1e-3.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("LoRA", {"preset": "lora_attention", "rank": 8, "alpha": 16.0, "dropout": 0.0}, 1e-3),
    Method("DoRA", {"preset": "lora_attention", "rank": 8, "alpha": 16.0, "dropout": 0.0, "use_dora": True}, 1e-3),
    Method("IA3", {"preset": "ia3"}, 5e-3),
    Method("prompt tuning", {"preset": "prompt_tuning", "virtual_tokens": 20}, 3e-2),
    Method("prefix tuning", {"preset": "prefix_tuning", "virtual_tokens": 20}, 1e-2),
    Method("LLaMA-Adapter", {"preset": "adaption_prompt", "virtual_tokens": 10}, 1e-2),
    Method("BitFit", {"preset": "bitfit"}, 1e-3),
    # variants, by name only (not in the default shoot-out: each costs another run): rsLoRA scales by
    # alpha/sqrt(rank) instead of alpha/rank; p-tuning makes its soft prompt with a small MLP; freeze tuning
    # trains the last two blocks in full (a full fine-tune's rate)
    Method("rsLoRA", {"preset": "lora_attention", "rank": 8, "alpha": 16.0, "dropout": 0.0, "rslora": True}, 1e-3),
    Method("p-tuning", {"preset": "p_tuning", "virtual_tokens": 20}, 1e-2),
    Method("freeze tuning", {"preset": "freeze_tuning", "top_n": 2}, 1e-4),
)}
# what compare_methods trains when not told: LoRA and DoRA, IA3 and LLaMA-Adapter (the adapter family), prompt and
# prefix tuning (p-tuning, the third prompt method, by name), BitFit
DEFAULT_METHODS = ("LoRA", "DoRA", "IA3", "prompt tuning", "prefix tuning", "LLaMA-Adapter", "BitFit")


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same optimizer steps, batch, rows, held-out items and seed."""

    steps: int = 30
    batch_size: int = 8
    rows: int = 400
    eval_items: int = 40
    seed: int = 0

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("rows", 4), ("eval_items", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RunConfigError(f"budget.{name}={value!r} is not allowed; allowed: an integer >= {low}")


@dataclass
class Shootout:
    """The table of a shoot-out (plain data, saved as JSON in the run store)."""

    task: str
    budget: dict
    methods: list[dict]  # one row per method (see ``table``)
    best: str | None = None
    name: str = ""
    path: str | None = None
    complete: bool = True
    zero_shot: dict | None = None  # the base model's score on the same items, for reference
    saved: float | None = None  # when it was saved (seconds since the epoch): the latest is the last saved
    scored: bool = True  # False: the runs' facts only (saved before scoring; scoring did not finish)
    model: str | None = None  # the model spec every method trained
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # method -> [[step, loss], ...]

    def table(self) -> list[dict]:
        return [dict(r) for r in self.methods]

    def settings(self) -> tuple[list["Method"], "Budget"]:
        """The methods and the budget it was run with (to run it again); refused by name if the file's are not
        valid settings."""
        methods = []
        for r in self.methods:
            if isinstance(r.get("adapter"), dict):
                methods.append(Method(str(r["method"]), dict(r["adapter"]), r.get("learning_rate")))
            elif r.get("method") in METHODS:  # saved before the adapter was kept in the row
                methods.append(METHODS[r["method"]])
            else:
                raise RunConfigError(f"method {r.get('method')!r} of shoot-out {self.name!r} has no adapter settings")
        budget = Budget(**{k: self.budget[k] for k in Budget.__dataclass_fields__ if k in (self.budget or {})})
        return methods, budget

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Shootout":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def save(self, path: str | Path) -> Path:
        self.path = str(path)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, default=_json_default))

    @classmethod
    def load(cls, path: str | Path) -> "Shootout":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        out = cls.from_dict(data)
        out.path = str(path)
        return out

    def text(self) -> str:
        """The table as aligned plain text (the notebook prints it; the README quotes it)."""
        head = ("method", "trainable", "% model", "peak MiB", "tokens/s", "minutes", "eval loss", "score [95% CI]",
                "vs best")
        lines = [head]
        for r in self.methods:
            ci = r.get("score_ci") or [None, None]
            score = "-" if r.get("score") is None else f"{100 * r['score']:.1f} [{_pct(ci[0])}, {_pct(ci[1])}]"
            lines.append((r["method"], _num(r.get("trainable"), 0), _num(r.get("trainable_percent"), 3),
                          _num(r.get("peak_mib"), 0), _num(r.get("tokens_per_s"), 0), _num(r.get("minutes"), 2),
                          _num(r.get("eval_loss"), 3), score, r.get("vs_best") or ""))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
        return text + (f"\n({HOLM_NOTE})" if any("p_vs_best_holm" in r for r in self.methods) else "")


def _pct(x) -> str:
    return "?" if x is None else f"{100 * x:.1f}"


def _num(x, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:,.{digits}f}"


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"{type(x).__name__} is not JSON")


NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def check_shootout_name(name) -> str:
    """A shoot-out's name becomes a file name in the run store: refused up front unless it is plain."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name or name.startswith("."):
        raise RunConfigError(f"name={name!r} is not allowed; allowed: 1 to 100 letters, digits, '_', '.' or '-', "
                             "not starting with '.' and without '..'")
    return name


def _saved_at(path: Path) -> float:
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("saved")
    except (OSError, ValueError, AttributeError):
        saved = None
    if isinstance(saved, (int, float)) and not isinstance(saved, bool):
        return float(saved)
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def shootouts(store: str | Path = "runs") -> list[Path]:
    """Saved shoot-outs of a run store, oldest first (by when they were saved, not by name)."""
    folder = Path(store) / SHOOTOUT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.json") if p.is_file()), key=lambda p: (_saved_at(p), p.name))


def _reserve(folder: Path, name: str) -> Path:
    """A new file ``<name>.json`` (else ``<name>-2.json``, ...) created exclusively: never another's file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = folder / (f"{name}.json" if i == 1 else f"{name}-{i}.json")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise RunConfigError(f"name={name!r}: {folder} already has 999 shoot-outs of that name; choose another name")


def save_shootout(result: "Shootout", store: str | Path = "runs") -> Path:
    """Save a shoot-out in ``<store>/shootouts``: the first save takes a fresh file (an earlier shoot-out of
    the same name is kept: this one gets ``-2``, ``-3``, ...), later saves of the same result update it."""
    if result.path is None:
        path = _reserve(Path(store) / SHOOTOUT_DIR, check_shootout_name(result.name))
        result.name = path.stem
    result.saved = time.time()
    return result.save(result.path or path)


def latest_shootout(store: str | Path = "runs") -> Shootout | None:
    """The last saved shoot-out of a run store (a file being written, still empty, is passed over)."""
    for path in reversed(shootouts(store)):
        try:
            found = Shootout.load(path)
        except (OSError, ValueError, TypeError):
            continue
        if any(r.get("run") for r in found.methods):  # a table where nothing ran is not a shoot-out to show
            return found
    return None


# ---- running it ----------------------------------------------------------------------------------
def method_config(task: str, method: Method, budget: Budget, *, model: str = "default", store: str | Path = "runs",
                  name: str | None = None) -> RunConfig:
    """The run config of one contestant: the shared budget, the method's adapter and learning rate. Its run is
    named ``shootout-<name>-<method>`` (the shoot-out's name cut short before the method's)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", method.name).strip("-")[:40] or "method"
    head = "shootout" + (f"-{name}"[:64 - len("shootout") - 1 - len(tail)] if name else "")
    return RunConfig.from_dict({
        "name": f"{head}-{tail}", "store": str(store),
        "model": {"spec": model},
        "data": {"source": f"teaching:{task}", "rows": budget.rows, "split_seed": budget.seed,
                 "max_eval_rows": budget.eval_items, "sample_prompts": 1, "eval_fraction": 0.2},
        "adapter": dict(method.adapter),
        "training": {"max_steps": budget.steps, "batch_size": budget.batch_size, "learning_rate": method.learning_rate,
                     "seed": budget.seed, "lr_schedule": "constant_with_warmup", "warmup": 0.1, "eval_every": 0,
                     "sample_every": 0, "checkpoint_every": budget.steps, "keep_checkpoints": 1},
    })


def _resolve_methods(methods) -> list[Method]:
    if methods is None:
        return [METHODS[n] for n in DEFAULT_METHODS]
    out = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif isinstance(m, str) and m in METHODS:
            out.append(METHODS[m])
        else:
            raise RunConfigError(f"method {m!r} is not allowed; allowed: a Method or one of {', '.join(METHODS)}")
    names = [m.name for m in out]
    if len(set(names)) != len(names) or not out:
        raise RunConfigError(f"methods must be at least one, with different names; got {names}")
    return out


def _run_facts(run: RunFolder) -> dict:
    """What the run folder says about cost: trainable count, peak memory, tokens/s, minutes, losses."""
    metrics, events = run.metrics(), run.events()
    started = next((e for e in events if e.get("event") == "started"), {})
    steps = [m for m in metrics if m.get("loss") is not None]
    memory = [v for m in metrics for k, v in m.items() if k.startswith("memory_") and isinstance(v, (int, float))]
    speeds = [m["tokens_per_s"] for m in steps if isinstance(m.get("tokens_per_s"), (int, float))]
    status = run.read_status()
    summary = run.summary()
    return {"run": run.name, "state": summary.state, "trainable": started.get("trainable"),
            "peak_mib": max(memory) / 2**20 if memory else None,
            "tokens_per_s": sum(speeds[1:] or speeds) / len(speeds[1:] or speeds) if speeds else None,
            "minutes": (status.get("seconds") or 0) / 60, "eval_loss": summary.eval_loss,
            "final_loss": summary.final_loss, "curve": [[m["step"], m["loss"]] for m in steps]}


def _train(cfgs: list[tuple[Method, RunConfig]], progress, stop: threading.Event | None,
           on_run: Callable[[Method, RunFolder], None] | None,
           failed: dict[str, str] | None = None) -> list[tuple[Method, RunFolder | None]]:
    """Each method's run, one after the other. A method that can't be launched (its check, a busy device)
    is kept as ``(method, None)`` with its error in ``failed``; the others still train."""
    from .launch import launch

    done = []
    for i, (method, cfg) in enumerate(cfgs):
        if stop is not None and stop.is_set():
            break
        if progress is not None:
            progress(f"training {method.name} ({i + 1}/{len(cfgs)})")
        try:
            handle = launch(cfg)
        except Exception as exc:  # noqa: BLE001 - a row of the table, said there; the next method goes on
            if failed is not None:
                failed[method.name] = f"failed: {type(exc).__name__}: {exc}"
            if progress is not None:
                progress(f"{method.name} could not start: {type(exc).__name__}: {exc}")
            done.append((method, None))
            continue
        if on_run is not None:
            on_run(method, handle.run)
        while handle.wait(timeout=1.0) in ("pending", "running", "stopping"):
            if stop is not None and stop.is_set():
                handle.stop()
                handle.wait()
                break
        done.append((method, handle.run))
    return done


def _full_forgetting(base, tuned, tokenizer, n_tokens: int) -> dict:
    """Forgetting of a method that trains weights in place (BitFit, freeze tuning): the same measures as
    the comparison's for adapters, between the base model and the saved tuned model."""
    import torch

    from .compare import general_text

    ids = torch.tensor([general_text(tokenizer, n_tokens)])
    with torch.no_grad():
        lb = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
        lt = torch.log_softmax(tuned(input_ids=ids).logits[0, :-1].float(), -1)
    target = ids[0, 1:, None]
    return {"general_ppl_base": math.exp(float(-lb.gather(1, target).mean())),
            "general_ppl_adapter": math.exp(float(-lt.gather(1, target).mean())),
            "kl": max(0.0, float((lb.exp() * (lb - lt)).sum(-1).mean())), "tokens": int(ids.shape[1])}


def score_runs(task: str, trained: list[tuple[Method, RunFolder]], *, items: int, seed: int = 0,
               progress=None, stop: threading.Event | None = None, general_text_tokens: int = 256):
    """One comparison of every finished run on the same held-out items (the first run's eval split):
    the zero-shot base model, each adapter, each model trained in place. Returns (Comparison, the base
    model's parameter count)."""
    from ..core.rundata import run_rows
    from ..core.teaching import teaching_task
    from .anatomy import inspect_model
    from .compare import Variant, _merged, compare
    from .models import load_model

    usable = [(m, r) for m, r in trained if r is not None and r.state() in ("finished", "stopped")]
    if not usable:
        return None, None
    cfg = usable[0][1].config()
    rows = run_rows(cfg).eval[:items]
    spec = teaching_task(task)
    template = cfg.resolved_template()
    model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    adapters = [(m, r) for m, r in usable if r.has_adapter()]
    full = [(m, r) for m, r in usable if not r.has_adapter() and (r.path / "model" / "config.json").is_file()]
    kwargs = dict(scorer=spec.score, labels=getattr(spec, "label", None), seed=seed, progress=progress, stop=stop,
                  general_text_tokens=general_text_tokens)
    if getattr(spec, "label", None) is None:
        kwargs.pop("labels")
    variants = [Variant.zero_shot(template, name="zero-shot")] + [Variant.from_run(r, name=m.name) for m, r in adapters]
    parts = [compare(variants, rows, model=model, tokenizer=tokenizer, **kwargs)]
    for m, r in full:
        tuned, _ = load_model(str(r.path / "model"), dtype=cfg.model.dtype)
        part = compare([Variant.zero_shot(template, name=m.name)], rows, model=tuned, tokenizer=tokenizer, **kwargs)
        part.forgetting[m.name] = _full_forgetting(model, tuned, tokenizer, general_text_tokens)
        parts.append(part)
    order = ["zero-shot"] + [m.name for m, _ in usable]
    made = {v for p in parts for v in p.variants}
    return _merged(parts, [n for n in order if n in made]), inspect_model(model).total_params


def compare_methods(task: str = "dates", methods: Sequence[Method | str] | None = None, budget: Budget | None = None,
                    *, model: str = "default", store: str | Path = "runs", name: str | None = None,
                    progress: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                    on_run: Callable[[Method, RunFolder], None] | None = None) -> Shootout:
    """Train each method on the same rows with the same step budget and seed, one after the other, each as
    an ordinary run in ``store``; score them all on the same held-out items; save and return the table.

    task: a teaching task (``sftkit.teaching_task``). methods: names from ``METHODS`` or ``Method`` objects
    (default: ``DEFAULT_METHODS``, seven methods; rsLoRA, p-tuning and freeze tuning by name).
    budget: steps, batch size, rows, held-out items, seed shared by all.
    progress: called with a line of text as it goes. stop: a ``threading.Event``; set, the run in progress
    stops (its adapter is kept) and no other starts; the table then has what finished.
    """
    from ..core.teaching import TASKS

    if task not in TASKS:
        raise RunConfigError(f"task={task!r} is not allowed; allowed: {', '.join(TASKS)}")
    budget = budget or Budget()
    chosen = _resolve_methods(methods)
    name = check_shootout_name(f"{datetime.now():%Y%m%d-%H%M%S}-{task}" if name is None else name)  # before training
    cfgs = [(m, method_config(task, m, budget, model=model, store=store, name=name)) for m in chosen]  # checked first
    started = time.perf_counter()
    failed: dict[str, str] = {}
    trained = _train(cfgs, progress, stop, on_run, failed)
    result = Shootout(task=task, budget=asdict(budget), methods=[], name=name, complete=False, scored=False,
                      model=model)
    _fill(result, trained, failed, None, None, len(chosen))
    if not any(r.get("run") for r in result.methods):  # nothing ran: no table to keep, the latest stays the latest
        result.budget["seconds"] = time.perf_counter() - started
        return result
    save_shootout(result, store)  # the unscored table first: an error while scoring loses no run's facts
    if progress is not None:
        progress("scoring every method on the same held-out items")
    # Stop ends the training; the runs that finished (or stopped with their adapter) are still scored, with a
    # stop event of their own: the one already set would end the comparison before its first item
    scoring_stop = threading.Event() if stop is not None and stop.is_set() else stop
    usable = [(m, r) for m, r in trained if r is not None]
    comparison, base_params = score_runs(task, usable, items=budget.eval_items, seed=budget.seed, stop=scoring_stop)
    _fill(result, trained, failed, comparison, base_params, len(chosen))
    result.scored = comparison is not None
    result.budget["seconds"] = time.perf_counter() - started
    save_shootout(result, store)
    return result


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (each stays valid for the family's error rate)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


HOLM_NOTE = ("vs the best: exact paired test, p Holm-adjusted over the comparisons with the best; the best was "
             "chosen on these same items, so its lead is read with care")


def _against_best(comparison, rows: list[dict], best: str) -> None:
    """Each method against the best, paired on the same items: the difference, the exact test's p (raw and
    Holm-adjusted over every method compared with the best), and the verdict in words on the adjusted p."""
    from dataclasses import replace

    from ..core.stats import paired_verdict

    others = []
    for r in rows:
        if r["method"] == best:
            r["vs_best"] = "best"
            continue
        p = comparison._pair(r["method"], best)
        test, diff = p["mcnemar"], p["diffs"].get(comparison.primary)
        r["p_vs_best"] = None if test is None else float(test.p_value)
        r["diff_vs_best"] = None if diff is None else _finite(diff.diff)
        others.append((r, test, diff))
    tested = [(r, test, diff) for r, test, diff in others if test is not None and diff is not None]
    adjusted = dict(zip((r["method"] for r, _, _ in tested), holm([float(t.p_value) for _, t, _ in tested])))
    for r, test, diff in others:
        if r["method"] in adjusted:
            r["p_vs_best_holm"] = adjusted[r["method"]]
            r["vs_best"] = paired_verdict(r["method"], best, diff, replace(test, p_value=adjusted[r["method"]]))
        else:  # no exact test (a score that is not right/wrong): the verdict reads the interval
            r["vs_best"] = comparison.verdict(r["method"], best)


def _fill(result: Shootout, trained, failed: dict[str, str], comparison, base_params, n_chosen: int) -> None:
    """The table's rows from the runs' folders (and, once scored, the comparison)."""
    rows, curves = [], {}
    summary = comparison.summary() if comparison is not None else {}
    for method, run in trained:
        if run is None:
            facts = {"run": None, "state": failed.get(method.name, "failed"), "trainable": None, "peak_mib": None,
                     "tokens_per_s": None, "minutes": None, "eval_loss": None, "final_loss": None, "curve": []}
        else:
            facts = _run_facts(run)
        curves[method.name] = facts.pop("curve")
        s = summary.get(method.name, {})
        f = comparison.forgetting.get(method.name, {}) if comparison is not None else {}
        rows.append({"method": method.name, "preset": method.adapter["preset"], "adapter": dict(method.adapter),
                     "learning_rate": method.learning_rate,
                     **facts, "score": _finite(s.get("score")), "score_ci": [_finite(x) for x in s.get("score_ci", ())],
                     "n": s.get("n"), "kl": _finite(f.get("kl")), "general_ppl": _finite(f.get("general_ppl_adapter"))})
    for r in rows:
        r["trainable_percent"] = 100 * (r["trainable"] or 0) / base_params if base_params else None
    best = None
    scored_rows = [r for r in rows if r["score"] is not None]
    if scored_rows:
        best = max(scored_rows, key=lambda r: (r["score"], -(r["eval_loss"] or math.inf)))["method"]
        _against_best(comparison, scored_rows, best)
    zero = summary.get("zero-shot")
    result.methods, result.curves, result.best = rows, curves, best
    result.complete = len(trained) == n_chosen and all(r["state"] == "finished" for r in rows)
    result.zero_shot = None if zero is None else {"score": _finite(zero.get("score")),
                                                  "score_ci": [_finite(x) for x in zero.get("score_ci", ())]}


def _finite(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None

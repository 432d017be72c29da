"""The rows a run trains and evaluates on, checked before any process or model starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import DataError, load_rows, split_rows
from .runconfig import RunConfig, RunConfigError
from .template import Template


@dataclass(frozen=True)
class RunRows:
    template: Template
    train: list[dict]
    eval: list[dict]
    samples: list[dict]  # fixed held-out rows the run generates from
    objective: str = "sft"  # dpo / kto: the rows are preference rows (see sftkit.core.preferences)
    n_rows: int | None = None  # preference runs: every row of the data (train and held-out, before max_eval_rows)


def run_rows(cfg: RunConfig) -> RunRows:
    """Load, check and split the run's rows. Raises DataError / TemplateError / RunConfigError
    naming the row or field, before anything expensive starts."""
    d = cfg.data
    task = d.teaching_task
    if task is not None:
        from .teaching import TASKS

        if task not in TASKS:
            raise RunConfigError(f"data.source='teaching:{task}' is not a teaching task; "
                                 f"allowed: {', '.join('teaching:' + t for t in TASKS)}")
        if cfg.objective != "sft":
            raise RunConfigError(f"objective={cfg.objective} needs preference rows, and data.source='teaching:{task}' "
                                 f"has none; allowed: a .jsonl/.csv file of rows with {_preference_columns(cfg)} (a "
                                 "FeedbackCollector's save_rows writes one)")
        rows = TASKS[task].rows(d.rows or TASKS[task].default_size, seed=d.split_seed)
    else:
        path = Path(d.source).expanduser()
        if not path.is_file():
            raise DataError(f"data.source={d.source!r}: no such file")
        rows = load_rows(path)
        if d.rows is not None:
            rows = rows[: d.rows]
    if len(rows) < 2:
        raise DataError(f"data.source={d.source!r} has {len(rows)} row(s); a run needs at least 2")
    if cfg.objective != "sft" or cfg.adapter.init_from is not None:
        return _preference_rows(cfg, rows)
    template = cfg.resolved_template()
    template.check_rows(rows)
    train, evals = split_rows(rows, d.eval_fraction, seed=d.split_seed)
    if d.max_eval_rows is not None:
        evals = evals[: d.max_eval_rows]
    if cfg.training.early_stopping_patience and not evals:
        raise RunConfigError("training.early_stopping_patience is set but there is no eval split: "
                             "set data.eval_fraction > 0")
    pool = evals or train
    return RunRows(template, train, evals, pool[: d.sample_prompts])


def _preference_columns(cfg: RunConfig) -> str:
    from .preferences import COLUMNS

    return " and ".join(COLUMNS.get(cfg.objective, COLUMNS["dpo"]))


def _preference_rows(cfg: RunConfig, rows: list[dict]) -> RunRows:
    """A dpo / kto run's rows: the columns checked (a missing one named), split by prompt (no prompt on
    both sides), samples answered with their chosen answer as the target; adapter.init_from checked."""
    from .preferences import answer_view, check_preference_rows, split_by_prompt

    d = cfg.data
    if cfg.objective == "sft":
        raise RunConfigError(f"adapter.init_from={cfg.adapter.init_from!r} is not allowed with objective sft; allowed: "
                             "null (starting from a run's adapter is for preference runs: objective dpo or kto)")
    if cfg.adapter.init_from is not None:
        init = cfg.init_run_config()
        if init.model.spec != cfg.model.spec:
            raise RunConfigError(f"adapter.init_from names a run of model {init.model.spec!r}, but model.spec is "
                                 f"{cfg.model.spec!r}; allowed: the same model as that run")
    template = cfg.resolved_template()
    rows = check_preference_rows(template, rows, cfg.objective, source=f"data.source={d.source!r}")
    train, evals = split_by_prompt(template, rows, d.eval_fraction, seed=d.split_seed)
    if d.max_eval_rows is not None:
        evals = evals[: d.max_eval_rows]
    if cfg.training.early_stopping_patience and not evals:
        raise RunConfigError("training.early_stopping_patience is set but there is no eval split: "
                             "set data.eval_fraction > 0")
    pool = [r for r in (evals or train) if cfg.objective == "dpo" or r.get("label")]
    samples, seen = [], set()
    for r in pool:
        key = tuple(str(r.get(f)) for f in template.input_fields)
        if key not in seen and len(samples) < d.sample_prompts:
            seen.add(key)
            samples.append(answer_view(template, r))
    return RunRows(template, train, evals, samples, cfg.objective, n_rows=len(rows))


# ---- rendering: what each row trains -------------------------------------------------------------
@dataclass(frozen=True)
class RowReport:
    """What rendering the rows found: rows with nothing to train (dropped), rows cut at
    max_length, rows whose end-of-turn was cut (the model would not learn to stop)."""

    split: str
    n_rows: int
    max_length: int
    dropped: tuple[int, ...] = ()
    truncated: tuple[int, ...] = ()
    end_cut: tuple[int, ...] = ()

    @property
    def n_kept(self) -> int:
        return self.n_rows - len(self.dropped)

    def lines(self) -> list[str]:
        def first(ix):
            shown = ", ".join(str(i) for i in ix[:8])
            return shown + (f", ... ({len(ix)} in all)" if len(ix) > 8 else "")

        out = []
        if self.dropped:
            out.append(f"{len(self.dropped)} of {self.n_rows} {self.split} row(s) have zero trained tokens after "
                       f"truncation to max_length={self.max_length} (rows {first(self.dropped)}, 0-based): "
                       "they are left out")
        if self.truncated:
            out.append(f"{len(self.truncated)} {self.split} row(s) are cut at max_length={self.max_length} "
                       f"(rows {first(self.truncated)})")
        if self.end_cut:
            out.append(f"{len(self.end_cut)} {self.split} row(s) lose their end-of-turn token to truncation (rows "
                       f"{first(self.end_cut)}): raise training.max_length so the model learns to stop")
        return out

    def to_dict(self) -> dict:
        return {"split": self.split, "rows": self.n_rows, "max_length": self.max_length,
                "dropped": list(self.dropped), "truncated": list(self.truncated), "end_cut": list(self.end_cut)}


def render_rows(template: Template, rows: list[dict], tokenizer, *, split: str = "train"):
    """Token ids and labels (-100 where not trained) for each row that trains something, and
    a RowReport. Raises DataError when no row trains anything."""
    examples: list[dict] = []
    dropped: list[int] = []
    truncated: list[int] = []
    end_cut: list[int] = []
    from .preferences import answer_view

    for i, row in enumerate(rows):
        ex = template.render(answer_view(template, row), tokenizer, with_examples=False)  # preference rows: chosen
        if ex.truncated:
            truncated.append(i)
        if ex.n_trained == 0:
            dropped.append(i)
            continue
        if not ex.end_trained:
            end_cut.append(i)
        examples.append({"input_ids": list(ex.input_ids), "labels": ex.labels})
    report = RowReport(split, len(rows), template.max_length, tuple(dropped), tuple(truncated), tuple(end_cut))
    if rows and not examples:
        raise DataError(f"no {split} row has a trained token: every prompt fills max_length={template.max_length} "
                        "(training.max_length, or the template's max_length). Raise it, or shorten the prompts.")
    return examples, report


def rows_fingerprint(rows: RunRows) -> str:
    """A content hash of the rows a run trains and evaluates on (the split included)."""
    import hashlib
    import json

    payload = json.dumps({"train": rows.train, "eval": rows.eval}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

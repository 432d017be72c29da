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

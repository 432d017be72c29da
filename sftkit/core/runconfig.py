"""RunConfig: everything one training run needs, as a tree of small dataclasses.

It round-trips to YAML (``to_yaml`` / ``from_yaml`` / ``save`` / ``load``), refuses unknown
fields, and validates every value on construction with a message that names the field
(``training.batch_size``) and what is allowed. Pure Python: the engine turns it into
library objects (``TrainingArguments``, ``LoraConfig``, ...) with explicit build functions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import ConfigError
from .policy import DEVICES, DTYPES, QUANTIZATIONS
from .template import Template

PRESETS = ("lora_attention", "lora_all_linear", "lora_top_blocks", "freeze_tuning", "bitfit", "none")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
ATTENTION = ("sdpa", "eager")


class RunConfigError(ConfigError):
    """A run setting is missing, unknown or out of range."""


def _need(cond: bool, where: str, value: Any, allowed: str) -> None:
    if not cond:
        raise RunConfigError(f"{where}={value!r} is not allowed; allowed: {allowed}")


def _coerce_numbers(obj) -> None:
    """Numeric strings in int/float fields become numbers, in place.

    YAML 1.1 (PyYAML) reads ``2e-4`` or ``1e3`` as strings, and a quoted ``'8'`` is one too.
    An int field takes ``'8'`` (or ``'1e3'``: a whole number); a float field takes any
    finite number and keeps ``'3'`` an int (``training.warmup``: whole steps). Anything
    else is left as it is, for the field's own check to refuse with its message.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, str):
            continue
        kinds = {t.strip() for t in str(f.type).split("|")}
        if "int" in kinds:
            number = _parse_number(value, whole=True)
        elif "float" in kinds:
            number = _parse_number(value, whole=False)
        else:
            continue
        if number is not None:
            setattr(obj, f.name, number)


def _parse_number(text: str, *, whole: bool) -> int | float | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if whole:
        return int(number) if number.is_integer() else None
    return number


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelConfig:
    """Which model and how to load it (see ``sftkit.load_model``)."""

    spec: str = "default"
    quantization: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        _coerce_numbers(self)
        _need(isinstance(self.spec, str) and bool(self.spec.strip()), "model.spec", self.spec,
              "'default', a hub id, a local folder or a .gguf file")
        _need(self.quantization in QUANTIZATIONS, "model.quantization", self.quantization, ", ".join(QUANTIZATIONS))
        _need(self.device in DEVICES, "model.device", self.device, ", ".join(DEVICES))
        _need(self.dtype in DTYPES, "model.dtype", self.dtype, ", ".join(DTYPES))
        _need(self.attn_implementation in ATTENTION, "model.attn_implementation", self.attn_implementation,
              ", ".join(ATTENTION))


@dataclass
class DataConfig:
    """Where the rows come from and how they split.

    source: ``teaching:<task>`` (a bundled teaching task) or a JSONL / JSON / CSV / TSV file.
    rows: teaching tasks: how many rows to generate; files: keep the first N (None: all).
    """

    source: str = "teaching:dates"
    rows: int | None = 400
    eval_fraction: float = 0.1
    max_eval_rows: int | None = 64
    split_seed: int = 0
    sample_prompts: int = 3

    def __post_init__(self):
        _coerce_numbers(self)
        _need(isinstance(self.source, str) and bool(self.source.strip()), "data.source", self.source,
              "'teaching:<task>' or a path to a .jsonl, .json, .csv or .tsv file")
        _need(self.rows is None or (_is_int(self.rows) and self.rows >= 2), "data.rows", self.rows,
              "null (all) or an integer >= 2")
        _need(_is_num(self.eval_fraction) and 0 <= self.eval_fraction < 1, "data.eval_fraction",
              self.eval_fraction, "a number in [0, 1) (0: no eval split)")
        _need(self.max_eval_rows is None or (_is_int(self.max_eval_rows) and self.max_eval_rows >= 1),
              "data.max_eval_rows", self.max_eval_rows, "null (no cap) or an integer >= 1")
        _need(_is_int(self.split_seed), "data.split_seed", self.split_seed, "an integer")
        _need(_is_int(self.sample_prompts) and 0 <= self.sample_prompts <= 8, "data.sample_prompts",
              self.sample_prompts, "an integer from 0 to 8 (held-out rows generated from during the run)")

    @property
    def teaching_task(self) -> str | None:
        return self.source.split(":", 1)[1] if self.source.startswith("teaching:") else None


@dataclass
class AdapterConfig:
    """The freeze/LoRA plan as a preset plus explicit additions and removals.

    Names are module paths (LoRA) or parameter names (full training) of the model, so a
    config stays readable and portable: ``preset: lora_attention, remove_lora: [...]``.
    """

    preset: str = "lora_attention"
    top_n: int | None = None
    embeddings: bool = False
    head: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    add_lora: list[str] = field(default_factory=list)
    remove_lora: list[str] = field(default_factory=list)
    add_train: list[str] = field(default_factory=list)
    remove_train: list[str] = field(default_factory=list)

    def __post_init__(self):
        _coerce_numbers(self)
        _need(self.preset in PRESETS, "adapter.preset", self.preset, ", ".join(PRESETS))
        _need(self.top_n is None or (_is_int(self.top_n) and self.top_n >= 1), "adapter.top_n", self.top_n,
              "null or an integer >= 1 (how many of the last blocks)")
        if self.preset in ("lora_top_blocks", "freeze_tuning"):
            _need(self.top_n is not None, "adapter.top_n", self.top_n,
                  f"an integer >= 1: preset {self.preset} needs it")
        _need(isinstance(self.embeddings, bool), "adapter.embeddings", self.embeddings, "true or false")
        _need(isinstance(self.head, bool), "adapter.head", self.head, "true or false")
        _need(_is_int(self.rank) and 1 <= self.rank <= 1024, "adapter.rank", self.rank, "an integer from 1 to 1024")
        _need(_is_num(self.alpha) and self.alpha > 0, "adapter.alpha", self.alpha, "a number > 0")
        _need(_is_num(self.dropout) and 0 <= self.dropout < 1, "adapter.dropout", self.dropout, "a number in [0, 1)")
        for name in ("add_lora", "remove_lora", "add_train", "remove_train"):
            value = getattr(self, name)
            _need(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), f"adapter.{name}",
                  value, "a list of module or parameter names")
            setattr(self, name, sorted(set(value)))


@dataclass
class TrainingConfig:
    """The optimisation loop. Steps count optimizer updates."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"
    warmup: float = 0.05
    max_length: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    early_stopping_patience: int = 0
    early_stopping_threshold: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 42
    packing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_max_new_tokens: int = 24
    logging_every: int = 1

    def __post_init__(self):
        _coerce_numbers(self)
        _need(_is_num(self.epochs) and 0 < self.epochs <= 1000, "training.epochs", self.epochs,
              "a number in (0, 1000]")
        _need(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1), "training.max_steps",
              self.max_steps, "null (use epochs) or an integer >= 1")
        _need(_is_int(self.batch_size) and 1 <= self.batch_size <= 4096, "training.batch_size", self.batch_size,
              "an integer from 1 to 4096")
        _need(_is_int(self.grad_accum) and 1 <= self.grad_accum <= 1024, "training.grad_accum", self.grad_accum,
              "an integer from 1 to 1024")
        _need(_is_num(self.learning_rate) and 0 < self.learning_rate <= 1, "training.learning_rate",
              self.learning_rate, "a number in (0, 1] (LoRA: 1e-4 to 1e-3 is typical)")
        _need(self.lr_schedule in LR_SCHEDULES, "training.lr_schedule", self.lr_schedule, ", ".join(LR_SCHEDULES))
        _need(_is_num(self.warmup) and self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
              "training.warmup", self.warmup, "a fraction of the steps in [0, 1) or a whole number of steps")
        _need(self.max_length is None or (_is_int(self.max_length) and 8 <= self.max_length <= 131072),
              "training.max_length", self.max_length, "null (the template's) or an integer from 8 to 131072")
        _need(_is_num(self.weight_decay) and 0 <= self.weight_decay < 1, "training.weight_decay",
              self.weight_decay, "a number in [0, 1)")
        _need(_is_num(self.max_grad_norm) and self.max_grad_norm >= 0, "training.max_grad_norm",
              self.max_grad_norm, "a number >= 0 (0: no clipping)")
        _need(_is_int(self.eval_every) and self.eval_every >= 0, "training.eval_every", self.eval_every,
              "an integer >= 0 (0: evaluate once, at the end)")
        _need(_is_int(self.early_stopping_patience) and self.early_stopping_patience >= 0,
              "training.early_stopping_patience", self.early_stopping_patience,
              "an integer >= 0 (evaluations without improvement; 0: off)")
        _need(_is_num(self.early_stopping_threshold) and self.early_stopping_threshold >= 0,
              "training.early_stopping_threshold", self.early_stopping_threshold, "a number >= 0")
        _need(isinstance(self.gradient_checkpointing, bool), "training.gradient_checkpointing",
              self.gradient_checkpointing, "true or false")
        _need(_is_int(self.seed), "training.seed", self.seed, "an integer")
        _need(isinstance(self.packing, bool), "training.packing", self.packing, "true or false")
        _need(_is_int(self.checkpoint_every) and self.checkpoint_every >= 1, "training.checkpoint_every",
              self.checkpoint_every, "an integer >= 1 (optimizer steps between checkpoints)")
        _need(_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "training.keep_checkpoints",
              self.keep_checkpoints, "an integer >= 1")
        _need(_is_int(self.sample_every) and self.sample_every >= 0, "training.sample_every", self.sample_every,
              "an integer >= 0 (steps between sample generations; 0: only at the end)")
        _need(_is_int(self.sample_max_new_tokens) and 1 <= self.sample_max_new_tokens <= 512,
              "training.sample_max_new_tokens", self.sample_max_new_tokens, "an integer from 1 to 512")
        _need(_is_int(self.logging_every) and self.logging_every >= 1, "training.logging_every",
              self.logging_every, "an integer >= 1")
        if self.early_stopping_patience:
            _need(self.eval_every >= 1, "training.eval_every", self.eval_every,
                  "an integer >= 1 when training.early_stopping_patience is set (early stopping needs evaluations)")
            _need(self.checkpoint_every % self.eval_every == 0, "training.checkpoint_every", self.checkpoint_every,
                  f"a multiple of training.eval_every={self.eval_every} when early stopping is on "
                  "(the best checkpoint must be one that was evaluated)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": AdapterConfig, "training": TrainingConfig}


@dataclass
class RunConfig:
    """One run. ``template: null`` uses the teaching task's own template."""

    name: str = "run"
    store: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: Template | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self):
        _need(isinstance(self.name, str) and bool(self.name.strip()) and "/" not in self.name and len(self.name) <= 64,
              "name", self.name, "a short name without '/' (it becomes part of the run folder's name)")
        _need(isinstance(self.store, str) and bool(self.store.strip()), "store", self.store,
              "a folder path (where run folders are made)")
        for key, cls in SECTIONS.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, _section(cls, key, value))
            elif not isinstance(value, cls):
                raise RunConfigError(f"{key} must be a mapping of {cls.__name__} fields, got {type(value).__name__}")
        if isinstance(self.template, dict):
            self.template = _template(self.template)
        _need(self.template is None or isinstance(self.template, Template), "template", self.template,
              "a mapping of template fields (user_pattern, answer_field, system, examples, ...) or null "
              "(the teaching task's own template)")
        if self.template is None and self.data.teaching_task is None:
            raise RunConfigError("template is null but data.source is not a teaching task: give a template "
                                 "(user_pattern, answer_field, ...) for your data")

    # ---- derived --------------------------------------------------------------------
    def resolved_template(self) -> Template:
        """The template to train with; training.max_length, if set, overrides the template's."""
        tpl = self.template
        if tpl is None:
            from .teaching import teaching_task

            tpl = teaching_task(self.data.teaching_task).template
        if self.training.max_length is not None:
            tpl = dataclasses.replace(tpl, max_length=self.training.max_length)
        return tpl

    def with_changes(self, **sections) -> "RunConfig":
        """A copy with fields changed: ``cfg.with_changes(training={"max_steps": 10}, name="x")``."""
        data = self.to_dict()
        for key, value in sections.items():
            if key in SECTIONS and isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value.to_dict() if isinstance(value, Template) else value
        return RunConfig.from_dict(data)

    # ---- YAML -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "store": self.store}
        for key in ("model", "data"):
            out[key] = dataclasses.asdict(getattr(self, key))
        out["template"] = self.template.to_dict() if self.template is not None else None
        for key in ("adapter", "training"):
            out[key] = dataclasses.asdict(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        if not isinstance(data, dict):
            raise RunConfigError(f"a run config is a mapping, got {type(data).__name__}")
        _refuse_unknown(cls, "", data)
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, base_dir: str | Path | None = None) -> "RunConfig":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RunConfigError(f"the run config is not valid YAML: {exc}") from None
        cfg = cls.from_dict(data or {})
        if base_dir is not None:
            cfg = cfg.with_paths_from(Path(base_dir))
        return cfg

    def with_paths_from(self, base: Path) -> "RunConfig":
        """Relative data and store paths made absolute against ``base`` (the YAML's folder)."""
        changes: dict[str, Any] = {}
        if self.data.teaching_task is None and not Path(self.data.source).expanduser().is_absolute():
            changes["data"] = {"source": str((base / self.data.source).resolve())}
        if not Path(self.store).expanduser().is_absolute():
            changes["store"] = str((base / self.store).resolve())
        return self.with_changes(**changes) if changes else self

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"run config {path} does not exist")
        return cls.from_yaml(path.read_text(encoding="utf-8"), base_dir=path.parent)


def _refuse_unknown(cls, key: str, values: dict) -> None:
    """Fields not in dataclass ``cls`` are an error naming them (dotted under ``key``) and the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        names = ", ".join(f"{key}.{k}" if key else str(k) for k in unknown)
        raise RunConfigError(f"unknown field(s) {names}; " + (f"{key} allows: " if key else "allowed: ")
                             + ", ".join(allowed))


def _section(cls, key: str, values: dict):
    _refuse_unknown(cls, key, values)
    try:
        return cls(**values)
    except TypeError as exc:  # a value of a type the checks did not expect
        raise RunConfigError(f"{key}: {exc}") from None


def _template(values: dict) -> Template:
    _refuse_unknown(Template, "template", values)
    try:
        return Template.from_dict(values)
    except ConfigError as exc:
        msg = str(exc)
        raise RunConfigError(msg if msg.startswith("template.") else f"template: {msg}") from None


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """Fields that differ between two configs: (dotted field, value in a, value in b)."""
    out: list[tuple[str, Any, Any]] = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append((prefix, x, y))

    walk(a.to_dict(), b.to_dict(), "")
    return out

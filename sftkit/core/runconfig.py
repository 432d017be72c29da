"""RunConfig: everything one training run needs, as a tree of small dataclasses.

It round-trips to YAML (``to_yaml`` / ``from_yaml`` / ``save`` / ``load``), refuses unknown
fields, and validates every value on construction with a message that names the field
(``training.batch_size``) and what is allowed. Pure Python: the engine turns it into
library objects (``TrainingArguments``, ``LoraConfig``, ...) with explicit build functions.

Each field is declared once, with ``setting(default, help=..., allowed=..., widget=...)``
(see ``fields``): the checks, the example config's comments and the launcher's knobs
(``knob_spec``) all come from that declaration. Adding a setting is that one line plus its use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .atomic import write_text_atomic
from .errors import ConfigError
from .fields import Choice, Flag, Float, Int, KnobSpec, Names, Text, check_fields, knob_of, setting
from .plan import PRESETS, VIRTUAL_TOKENS  # the one definition, with what each preset means
from .policy import DEVICES, DTYPES, QUANTIZATIONS
from .template import Template

PACKING = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
ATTENTION = ("sdpa", "eager")
WARMUP_ALLOWED = "a fraction of the steps in [0, 1) or a whole number of steps"
# what a run trains toward: answers (sft) or preferences (dpo: chosen vs rejected pairs; kto: single answers
# labelled good or bad), the last two through TRL's DPOTrainer / KTOTrainer
OBJECTIVES = ("sft", "dpo", "kto")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
IN_PLACE_PRESETS = ("freeze_tuning", "bitfit")  # they train the model's own weights: no adapter for a preference run


class RunConfigError(ConfigError):
    """A run setting is missing, unknown or out of range."""


def _need(cond: bool, where: str, value: Any, allowed: str) -> None:
    """A rule between fields (the fields' own ranges are checked from their metadata)."""
    if not cond:
        raise RunConfigError(f"{where}={value!r} is not allowed; allowed: {allowed}")


@dataclass
class ModelConfig:
    """Which model and how to load it (see ``sftkit.load_model``)."""

    spec: str = setting("default", help="the model to train ('default': the bundled SmolLM2-135M-Instruct)",
                        allowed=Text("'default', a hub id, a local folder or a .gguf file"), widget="text",
                        label="model")
    quantization: str = setting("auto", allowed=Choice(QUANTIZATIONS), widget="choice",
                                help="how the weights load. auto: 4-bit NF4 QLoRA on CUDA, plain fp32 LoRA on CPU")
    device: str = setting("auto", help="where the run trains (auto: the GPU if there is one, else the CPU)",
                          allowed=Choice(DEVICES), widget="choice")
    dtype: str = setting("auto", help="compute dtype (auto: bf16 on GPUs that have it, fp32 on CPU)",
                         allowed=Choice(DTYPES), widget="choice")
    attn_implementation: str = setting("sdpa", help="the attention kernel (sdpa: PyTorch's fused one; eager: plain)",
                                       allowed=Choice(ATTENTION), widget="choice", label="attention")

    def __post_init__(self):
        check_fields(self, "model", RunConfigError)


@dataclass
class DataConfig:
    """Where the rows come from and how they split.

    source: ``teaching:<task>`` (a bundled teaching task) or a JSONL / JSON / CSV / TSV file.
    rows: teaching tasks: how many rows to generate; files: keep the first N (None: all).
    """

    source: str = setting("teaching:dates", help="where the rows come from (a relative path: from the config's folder)",
                          allowed=Text("'teaching:<task>' or a path to a .jsonl, .json, .csv or .tsv file"),
                          widget="text", label="data")
    rows: int | None = setting(400, help="teaching tasks: rows to generate; files: keep the first N",
                               allowed=Int(2, null="all"), widget="int")
    eval_fraction: float = setting(0.1, help="held-out share for eval loss and samples",
                                   allowed=Float(0, 1, max_open=True, note="0: no eval split"), widget="float")
    max_eval_rows: int | None = setting(64, help="cap on held-out rows evaluated (eval time grows with it)",
                                        allowed=Int(1, null="no cap"), widget="int")
    split_seed: int = setting(0, help="the same seed gives the same split", allowed=Int(), widget="int")
    sample_prompts: int = setting(3, help="held-out rows the run answers every training.sample_every steps",
                                  allowed=Int(0, 8, note="held-out rows generated from during the run"), widget="int")

    def __post_init__(self):
        check_fields(self, "data", RunConfigError)

    @property
    def teaching_task(self) -> str | None:
        return self.source.split(":", 1)[1] if self.source.startswith("teaching:") else None


@dataclass
class AdapterConfig:
    """The freeze/LoRA plan as a preset plus explicit additions and removals.

    Names are module paths (LoRA) or parameter names (full training) of the model, so a
    config stays readable and portable: ``preset: lora_attention, remove_lora: [...]``.
    """

    preset: str = setting("lora_attention", help="what trains, before the additions and removals below",
                          allowed=Choice(PRESETS), widget="choice")
    top_n: int | None = setting(None, help="lora_top_blocks / freeze_tuning (ia3, adaption_prompt: optional): how many "
                                "of the last blocks",
                                allowed=Int(1, null="", note="how many of the last blocks"), widget="int",
                                label="top blocks")
    embeddings: bool = setting(False, help="also train the input embeddings", allowed=Flag(), widget="bool")
    head: bool = setting(False, help="also train the output head", allowed=Flag(), widget="bool")
    rank: int = setting(16, help="LoRA rank (the inner size of each update)", allowed=Int(1, 1024), widget="int")
    alpha: float = setting(32.0, help="LoRA scale numerator (the update is scaled by alpha / rank)",
                           allowed=Float(0, min_open=True), widget="float")
    dropout: float = setting(0.05, help="LoRA dropout", allowed=Float(0, 1, max_open=True), widget="float")
    use_dora: bool = setting(False, help="LoRA presets: DoRA (weight-decomposed LoRA: a learned magnitude per output)",
                             allowed=Flag(), widget="bool", label="DoRA")
    rslora: bool = setting(False, help="LoRA presets: rank-stabilised scaling (alpha / sqrt(rank) instead of alpha / rank)",
                           allowed=Flag(), widget="bool", label="rsLoRA")
    virtual_tokens: int = setting(20, help="prompt methods: trained virtual tokens (prompt/prefix/p-tuning; "
                                  "adaption_prompt: per adapted block)", allowed=VIRTUAL_TOKENS, widget="int",
                                  label="virtual tokens")
    prompt_init: str | None = setting(None, help="prompt_tuning: start the soft prompt from this text's token vectors",
                                      allowed=Text("a text (cut or repeated to the virtual tokens)", null="random"),
                                      widget="text", label="start prompt from")
    add_lora: list[str] = setting(help="module paths to add LoRA to, e.g. model.layers.0.mlp.down_proj",
                                  allowed=Names("a list of module or parameter names"), default_factory=list)
    remove_lora: list[str] = setting(help="module paths to take out of the preset",
                                     allowed=Names("a list of module or parameter names"), default_factory=list)
    add_train: list[str] = setting(help="parameter names to train in full, e.g. model.norm.weight",
                                   allowed=Names("a list of module or parameter names"), default_factory=list)
    remove_train: list[str] = setting(help="parameter names to take out of the preset",
                                      allowed=Names("a list of module or parameter names"), default_factory=list)

    def __post_init__(self):
        check_fields(self, "adapter", RunConfigError)
        if self.preset in ("lora_top_blocks", "freeze_tuning"):
            _need(self.top_n is not None, "adapter.top_n", self.top_n,
                  f"an integer >= 1: preset {self.preset} needs it")
        self._check_method()

    def _check_method(self) -> None:
        """The LoRA options only with LoRA presets, prompt_init only with prompt_tuning. (top_n is read by
        the presets that have blocks to count; a prompt method with module edits or embeddings / head is
        refused by the plan, which names those fields, when the run builds it.)"""
        lora = self.preset.startswith("lora_") or self.preset == "none"
        for name in ("use_dora", "rslora"):
            _need(lora or not getattr(self, name), f"adapter.{name}", getattr(self, name),
                  f"false with preset {self.preset} (a LoRA option: use it with a lora_* preset)")
        _need(self.preset == "prompt_tuning" or self.prompt_init is None, "adapter.prompt_init", self.prompt_init,
              f"null with preset {self.preset} (the soft prompt's starting text: use it with preset prompt_tuning)")

    def check_training(self, training) -> None:
        """Rules between this section and training: a prompt method adds its virtual tokens to every row
        (in front of it, or of each block's attention), which padding-free packing (all rows of a batch
        joined into one sequence) does not carry."""
        from .plan import PROMPT_FAMILIES

        if training.packing == "on" and self.preset in PROMPT_FAMILIES:
            raise RunConfigError(f"training.packing=on is not allowed with adapter.preset={self.preset}: its "
                                 "virtual tokens belong to every row, and packing joins a batch's rows into one "
                                 "sequence; allowed: training.packing auto or off (rows padded per batch)")

    # preference runs: a finished run's adapter is the starting point and the frozen reference
    init_from: str | None = setting(None, help="start from this finished run's adapter (its folder); preference runs "
                                    "train it further against a frozen copy of it. The adapter's shape (preset, rank, "
                                    "targets) is that run's", allowed=Text("a run folder with an adapter/",
                                                                           null="a new adapter"),
                                    widget="text", label="start from run")


@dataclass
class TrainingConfig:
    """The optimisation loop. Steps count optimizer updates."""

    epochs: float = setting(1.0, help="passes over the training rows (ignored when max_steps is set)",
                            allowed=Float(0, 1000, min_open=True), widget="float")
    max_steps: int | None = setting(None, help="total optimizer steps", allowed=Int(1, null="use epochs"),
                                    widget="int")
    batch_size: int = setting(8, help="rows per device per forward pass", allowed=Int(1, 4096), widget="int")
    grad_accum: int = setting(1, allowed=Int(1, 1024), widget="int", label="grad accumulation",
                              help="forward passes per optimizer step (effective batch = batch_size x grad_accum)")
    learning_rate: float = setting(2e-4, help="peak learning rate",
                                   allowed=Float(0, 1, min_open=True, note="LoRA: 1e-4 to 1e-3 is typical",
                                                 span=(1e-6, 1e-1)), widget="log_float", step=0.1)
    lr_schedule: str = setting("cosine", help="how the learning rate moves after the warm-up",
                               allowed=Choice(LR_SCHEDULES), widget="choice", label="schedule")
    warmup: float = setting(0.05, help="learning-rate warm-up at the start",
                            allowed=Float(0, describe_as=WARMUP_ALLOWED), widget="float")
    max_length: int | None = setting(None, help="tokens per row (longer rows are cut)",
                                     allowed=Int(8, 131072, null="the template's"), widget="int")
    weight_decay: float = setting(0.0, help="AdamW weight decay", allowed=Float(0, 1, max_open=True), widget="float")
    max_grad_norm: float = setting(1.0, help="gradient clipping", allowed=Float(0, note="0: no clipping"),
                                   widget="float")
    eval_every: int = setting(0, help="steps between eval-loss measurements",
                              allowed=Int(0, note="0: evaluate once, at the end"), widget="int",
                              label="eval every (steps)")
    early_stopping_patience: int = setting(0, help="stop after this many evaluations without improvement",
                                           allowed=Int(0, note="0: off"), widget="int")
    early_stopping_threshold: float = setting(0.0, help="the eval-loss improvement that counts",
                                              allowed=Float(0), widget="float")
    gradient_checkpointing: bool = setting(False, allowed=Flag(), widget="bool",
                                           help="recompute activations in backward: less memory, about 30% slower")
    seed: int = setting(42, help="the same seed gives the same run", allowed=Int(), widget="int")
    packing: str = setting("auto", allowed=Choice(PACKING, flags=("on", "off")), widget="choice",
                           label="packing (no padding)",
                           help="each batch as one padding-free sequence, rows kept apart (auto: on when padding would be "
                                "more than 15% of a padded batch of these rows)")
    max_pass_tokens: int | None = setting(512, allowed=Int(16, null="the whole batch in one pass"), widget="int",
                                          label="tokens per pass",
                                          help="a batch runs as passes of whole rows of at most this many tokens: the "
                                               "same gradient, the memory of one pass (more passes: a little slower)")
    group_by_length: bool = setting(False, allowed=Flag(), widget="bool", label="group by length",
                                    help="batch rows of similar length together: less padding, a less random order")
    checkpoint_every: int = setting(50, help="optimizer steps between resumable checkpoints",
                                    allowed=Int(1, note="optimizer steps between checkpoints"),
                                    widget="int", label="checkpoint every")
    keep_checkpoints: int = setting(2, help="how many checkpoints to keep", allowed=Int(1), widget="int")
    sample_every: int = setting(0, help="steps between sample generations", allowed=Int(0, note="0: only at the end"),
                                widget="int", label="samples every (steps)")
    sample_max_new_tokens: int = setting(24, help="length cap of those generations (new tokens)",
                                         allowed=Int(1, 512), widget="int")
    logging_every: int = setting(1, help="steps between metric lines", allowed=Int(1), widget="int")

    def __post_init__(self):
        check_fields(self, "training", RunConfigError)
        # rules between fields, or finer than a range
        _need(self.warmup < 1 or float(self.warmup).is_integer(), "training.warmup", self.warmup, WARMUP_ALLOWED)
        if self.early_stopping_patience:
            _need(self.eval_every >= 1, "training.eval_every", self.eval_every,
                  "an integer >= 1 when training.early_stopping_patience is set (early stopping needs evaluations)")
            _need(self.checkpoint_every % self.eval_every == 0, "training.checkpoint_every", self.checkpoint_every,
                  f"a multiple of training.eval_every={self.eval_every} when early stopping is on "
                  "(the best checkpoint must be one that was evaluated)")


@dataclass
class PreferenceConfig:
    """Preference tuning (objective dpo or kto), through TRL. The data holds the template's input fields plus
    ``chosen`` and ``rejected`` (dpo) or ``completion`` and ``label`` (kto)."""

    beta: float = setting(0.1, help="how far the tuned model may move from the reference (higher: less far)",
                          allowed=Float(0, min_open=True, span=(0.01, 1.0)), widget="float")
    loss_type: str = setting("auto", help="the preference loss (auto: sigmoid for dpo, kto for kto)",
                             allowed=Choice(("auto", *DPO_LOSSES, *KTO_LOSSES)), widget="choice", label="loss")
    label_smoothing: float = setting(0.0, help="dpo robust/sigmoid: the share of pairs assumed mislabelled",
                                     allowed=Float(0, 0.5, max_open=True), widget="float")
    sft_weight: float = setting(1.0, help="dpo: weight of an added answer loss on the chosen answers (keeps the task: "
                                "pure dpo can push both answers down and break generation)",
                                allowed=Float(0, note="0: pure dpo"), widget="float", label="sft weight")
    desirable_weight: float = setting(1.0, help="kto: weight of the good answers' loss",
                                      allowed=Float(0, min_open=True), widget="float")
    undesirable_weight: float = setting(1.0, help="kto: weight of the bad answers' loss",
                                        allowed=Float(0, min_open=True), widget="float")

    def __post_init__(self):
        check_fields(self, "preference", RunConfigError)

    def resolved_loss(self, objective: str) -> str:
        if self.loss_type != "auto":
            return self.loss_type
        return "kto" if objective == "kto" else "sigmoid"


SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": AdapterConfig, "training": TrainingConfig,
            "preference": PreferenceConfig}


@dataclass
class RunConfig:
    """One run. ``template: null`` uses the teaching task's own template."""

    name: str = setting("run", help="the run's name: its folder is <store>/<YYYYMMDD-HHMMSS>-<name>",
                        allowed=Text("a short name without '/' (it becomes part of the run folder's name)",
                                     max_len=64, forbid="/"), widget="text", label="run name")
    store: str = setting("runs", help="the folder run folders are made in (a relative path: from the config's folder)",
                         allowed=Text("a folder path"), widget="text")
    objective: str = setting("sft", help="what the run trains toward: sft (answers), dpo (chosen vs rejected pairs), "
                             "kto (answers labelled good or bad)", allowed=Choice(OBJECTIVES), widget="choice")
    model: ModelConfig = setting(help="which model and how to load it", default_factory=ModelConfig)
    data: DataConfig = setting(help="the rows", default_factory=DataConfig)
    template: Template | None = setting(None, help="null: the teaching task's template. Otherwise user_pattern, "
                                        "answer_field, system, ...")
    adapter: AdapterConfig = setting(help="what trains: a preset plus explicit additions/removals",
                                     default_factory=AdapterConfig)
    training: TrainingConfig = setting(help="the optimisation loop (a step is one optimizer update)",
                                       default_factory=TrainingConfig)
    preference: PreferenceConfig = setting(help="preference tuning (objective dpo or kto)",
                                           default_factory=PreferenceConfig)

    def __post_init__(self):
        check_fields(self, "", RunConfigError)  # name and store; the sections check themselves
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
        self.adapter.check_training(self.training)  # rules between the adapter and training sections
        if self.template is None and self.data.teaching_task is None and self.adapter.init_from is None:
            raise RunConfigError("template is null but data.source is not a teaching task: give a template "
                                 "(user_pattern, answer_field, ...) for your data")
        loss = self.preference.loss_type
        if self.objective != "sft" and loss != "auto":
            losses = DPO_LOSSES if self.objective == "dpo" else KTO_LOSSES
            _need(loss in losses, "preference.loss_type", loss, f"auto or one of {', '.join(losses)} for objective "
                  f"{self.objective}")
        if self.objective != "sft":
            self._check_preference()

    def _check_preference(self) -> None:
        """What TRL or the preference recipe would refuse only after the run's process started."""
        a = self.adapter
        if a.init_from is None and (a.preset in IN_PLACE_PRESETS or (a.preset == "none" and not a.add_lora)):
            raise RunConfigError(f"adapter.preset={a.preset!r} is not allowed with objective {self.objective}: it trains "
                                 "the model's own weights, and a preference run trains an adapter (its frozen reference "
                                 "is the starting adapter on the same base model, not a second full model); allowed: a "
                                 "lora_*, ia3 or prompt preset, or adapter.init_from (a finished run's adapter)")
        loss = self.preference.resolved_loss(self.objective)
        if self.objective == "kto" and loss != "apo_zero_unpaired" and self.training.batch_size < 2:
            raise RunConfigError(f"training.batch_size={self.training.batch_size} is not allowed with objective kto "
                                 f"(loss {loss}): KTO estimates its KL term from the other rows of a batch; allowed: 2 "
                                 "or more, or preference.loss_type apo_zero_unpaired (no KL term)")

    # ---- derived --------------------------------------------------------------------
    def resolved_template(self) -> Template:
        """The template to train with; training.max_length, if set, overrides the template's."""
        tpl = self.template
        if tpl is None and self.data.teaching_task is None and self.adapter.init_from is not None:
            tpl = self.init_run_config().resolved_template()  # the run it continues from renders the same way
        if tpl is None:
            from .teaching import teaching_task

            tpl = teaching_task(self.data.teaching_task).template
        if self.training.max_length is not None:
            tpl = dataclasses.replace(tpl, max_length=self.training.max_length)
        return tpl

    def init_run_config(self) -> "RunConfig":
        """The config of the run ``adapter.init_from`` names (an error naming the field if it is not a run
        with an adapter)."""
        from .runstore import RunFolder

        where = self.adapter.init_from
        run = RunFolder(Path(str(where)).expanduser())
        if not (run.adapter_dir / "adapter_config.json").is_file() or not run.config_path.is_file():
            raise RunConfigError(f"adapter.init_from={where!r} is not allowed; allowed: a finished run folder with an "
                                 "adapter (config.yaml and adapter/adapter_config.json)")
        return run.config()

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
        out: dict[str, Any] = {"name": self.name, "store": self.store, "objective": self.objective}
        for key in ("model", "data"):
            out[key] = dataclasses.asdict(getattr(self, key))
        out["template"] = self.template.to_dict() if self.template is not None else None
        for key in ("adapter", "training", "preference"):
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
        init = self.adapter.init_from
        if init is not None and not Path(init).expanduser().is_absolute():
            changes["adapter"] = {"init_from": str((base / init).resolve())}
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


# ---- the fields, for comments and knobs -------------------------------------------------------------
def config_fields(sections: bool = False) -> Iterator[tuple[str, dataclasses.Field]]:
    """Every setting of a run config as (dotted name, dataclass field), in YAML order.

    sections=True: also the section fields (``model``, ``data``, ..., ``template``), each before its own.
    """
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS or f.name == "template":
            if sections:
                yield f.name, f
            for sub in dataclasses.fields(SECTIONS[f.name]) if f.name in SECTIONS else ():
                yield f"{f.name}.{sub.name}", sub
        else:
            yield f.name, f


def knob_spec(name: str) -> KnobSpec:
    """The widget spec of one setting, from its declaration: ``knob_spec("training.batch_size")``
    -> ``KnobSpec(name="training.batch_size", label="batch size", kind="int", min=1, max=4096, ...)``."""
    fields = dict(config_fields())
    if name not in fields:
        raise RunConfigError(f"unknown field {name}; allowed: {', '.join(fields)}")
    spec = knob_of(name, fields[name])
    if spec is None:
        raise RunConfigError(f"{name} is not a knob (a list: set it in the YAML or with with_changes)")
    return spec


def knob_specs(section: str = "training") -> list[KnobSpec]:
    """The widget specs of a section's knobs, in field order ("" : the top-level name and store)."""
    if section and section not in SECTIONS:
        raise RunConfigError(f"unknown section {section!r}; allowed: '', {', '.join(SECTIONS)}")
    specs = (knob_of(name, f) for name, f in config_fields()
             if name.rpartition(".")[0] == section)
    return [s for s in specs if s is not None]

"""FreezePlan: which modules get LoRA adapters and which parameters train directly.

A plan is two sets of names over a model's anatomy (LoRA modules, fully trained
parameters) plus the LoRA hyper-parameters. Presets build the usual plans; set
operations (``|``, ``-``) combine them; the widget toggles single names. A plan turns
into a peft ``LoraConfig`` (``target_modules`` + ``layers_to_transform`` when the choice is
a rectangle of blocks x module kinds, exact module names otherwise) or into
``requires_grad`` flags, and reports trainable parameters and a memory estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

from ..core.errors import ConfigError
from ..core.memory import MemoryEstimate, estimate_memory
from .anatomy import Anatomy, base_model_of, inspect_model


class PlanError(ConfigError):
    """The plan doesn't fit the model or its settings are out of range."""


PRESETS = ("lora_attention", "lora_all_linear", "lora_top_blocks", "freeze_tuning", "bitfit")


@dataclass(frozen=True)
class ResolvedPlan:
    """What applying a plan does to the model, module by module."""

    lora_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]  # modules trained in full next to LoRA (peft copies them)
    bias: str  # peft's bias mode: "none" | "all"
    full_params: tuple[str, ...]  # without LoRA: the parameters set to requires_grad
    trainable: int


@dataclass(frozen=True)
class FreezePlan:
    lora_modules: frozenset = field(default_factory=frozenset)
    train_params: frozenset = field(default_factory=frozenset)
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    label: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "lora_modules", frozenset(self.lora_modules))
        object.__setattr__(self, "train_params", frozenset(self.train_params))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise PlanError(f"rank={self.rank!r} must be a positive integer (typical: 4 to 64)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise PlanError(f"alpha={self.alpha!r} must be > 0 (typical: rank or 2 x rank)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PlanError(f"dropout={self.dropout!r} must be in [0, 1)")

    # ---- set operations ----------------------------------------------------------------
    def __or__(self, other: "FreezePlan") -> "FreezePlan":
        return replace(self, lora_modules=self.lora_modules | other.lora_modules,
                       train_params=self.train_params | other.train_params, label="custom")

    def __sub__(self, other: "FreezePlan") -> "FreezePlan":
        return replace(self, lora_modules=self.lora_modules - other.lora_modules,
                       train_params=self.train_params - other.train_params, label="custom")

    def with_settings(self, **kwargs) -> "FreezePlan":
        """A copy with other rank / alpha / dropout / label."""
        return replace(self, **kwargs)

    @property
    def method(self) -> str:
        return "lora" if self.lora_modules else "full"

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, anatomy: Anatomy, *, top_n: int | None = None, embeddings: bool = False,
               head: bool = False, **settings) -> "FreezePlan":
        """One of PRESETS, optionally with embeddings and/or head trained too."""
        blocks = range(anatomy.n_blocks)
        if top_n is not None:
            if not 1 <= top_n <= anatomy.n_blocks:
                raise PlanError(f"top_n={top_n} must be between 1 and {anatomy.n_blocks} (the model's blocks)")
            blocks = range(anatomy.n_blocks - top_n, anatomy.n_blocks)
        if name == "lora_attention":
            plan = cls.lora(anatomy, anatomy.attention_columns, blocks, **settings)
        elif name == "lora_all_linear":
            plan = cls.lora(anatomy, anatomy.linear_columns, blocks, **settings)
        elif name == "lora_top_blocks":
            if top_n is None:
                raise PlanError("preset 'lora_top_blocks' needs top_n (how many of the last blocks)")
            plan = cls.lora(anatomy, anatomy.linear_columns, blocks, **settings)
        elif name == "freeze_tuning":
            if top_n is None:
                raise PlanError("preset 'freeze_tuning' needs top_n (how many of the last blocks to train)")
            names = {p.name for p in anatomy.params.values() if p.block in set(blocks)}
            plan = cls(train_params=frozenset(names), **settings)
        elif name == "bitfit":
            names = {p.name for p in anatomy.params.values() if p.is_bias or p.kind == "norm"}
            plan = cls(train_params=frozenset(names), **settings)
        else:
            raise PlanError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        if embeddings:
            plan = plan | cls.embeddings(anatomy)
        if head:
            plan = plan | cls.head(anatomy)
        label = name + (f"(top {top_n})" if top_n else "") + (" + embeddings" if embeddings else "") + \
            (" + head" if head else "")
        return replace(plan, label=label)

    @classmethod
    def lora(cls, anatomy: Anatomy, targets: Iterable[str], blocks: Iterable[int] | None = None,
             **settings) -> "FreezePlan":
        """LoRA on the named modules of the chosen blocks (default all).

        targets: module paths inside a block ("self_attn.q_proj") or their last part
        ("q_proj"); a name the model doesn't have is an error listing the names it has.
        """
        targets = list(targets)
        columns = []
        for t in targets:
            hits = [c for c in anatomy.linear_columns if c == t or c.endswith("." + t)]
            if not hits:
                raise PlanError(
                    f"target module {t!r} is not in this {anatomy.model_type} model; its linear modules "
                    f"are: {', '.join(anatomy.linear_columns)}")
            columns += [c for c in hits if c not in columns]
        blocks = list(range(anatomy.n_blocks)) if blocks is None else list(blocks)
        bad = [b for b in blocks if not 0 <= b < anatomy.n_blocks]
        if bad:
            raise PlanError(f"blocks {bad} don't exist; the model has blocks 0 to {anatomy.n_blocks - 1}")
        names = {anatomy.module_name(b, c) for b in blocks for c in columns if (b, c) in anatomy.linear}
        return cls(lora_modules=frozenset(names), **settings)

    @classmethod
    def embeddings(cls, anatomy: Anatomy) -> "FreezePlan":
        names = {n for m in anatomy.embedding_modules for n in anatomy.params_of_module(m)}
        return cls(train_params=frozenset(names))

    @classmethod
    def head(cls, anatomy: Anatomy) -> "FreezePlan":
        if anatomy.head_module is None:
            raise PlanError("this model has no separate output head")
        names = set(anatomy.params_of_module(anatomy.head_module))
        if anatomy.tied and not names:  # tied: the head is the input embedding matrix
            names = {n for n in anatomy.params_of_module(anatomy.embedding_modules[0])}
        return cls(train_params=frozenset(names))

    # ---- what the plan means for a model ----------------------------------------------
    def validate(self, anatomy: Anatomy) -> None:
        if not self.lora_modules and not self.train_params:
            raise PlanError("nothing is trainable: choose LoRA modules or parameters to train "
                            "(or a preset such as 'lora_attention')")
        known_modules = {li.name for li in anatomy.linear.values()}
        missing = sorted(self.lora_modules - known_modules)
        if missing:
            raise PlanError(f"LoRA module(s) {', '.join(missing[:5])} are not linear modules of this model; "
                            f"its linear modules per block are: {', '.join(anatomy.linear_columns)}")
        missing = sorted(self.train_params - set(anatomy.params))
        if missing:
            raise PlanError(f"parameter(s) {', '.join(missing[:5])} are not in this model")

    def resolve(self, anatomy: Anatomy) -> ResolvedPlan:
        self.validate(anatomy)
        if self.method == "full":
            count = sum(anatomy.params[n].numel for n in self.train_params)
            return ResolvedPlan((), (), "none", tuple(sorted(self.train_params)), count)
        biases = {n for n in self.train_params if anatomy.params[n].is_bias}
        all_biases = {p.name for p in anatomy.params.values() if p.is_bias}
        if biases and biases != all_biases:
            raise PlanError("with LoRA, biases train all together or not at all (peft's bias='all'); "
                            f"this plan trains {len(biases)} of {len(all_biases)}")
        save = sorted({anatomy.params[n].module for n in self.train_params - biases})
        overlap = sorted(set(save) & self.lora_modules)
        if overlap:
            raise PlanError(f"module(s) {', '.join(overlap[:3])} are both LoRA-adapted and fully trained; pick one")
        count = 0
        for name in self.lora_modules:
            li = anatomy.linear_by_name(name)
            count += self.rank * (li.in_features + li.out_features)
        saved_params = {n for m in save for n in anatomy.params_of_module(m)}
        count += sum(anatomy.params[n].numel for n in saved_params)
        if biases:
            count += sum(anatomy.params[n].numel for n in all_biases - saved_params)
        return ResolvedPlan(tuple(sorted(self.lora_modules)), tuple(save), "all" if biases else "none", (), count)

    def trainable_params(self, anatomy: Anatomy) -> int:
        return self.resolve(anatomy).trainable

    def lora_config(self, anatomy: Anatomy):
        """The peft LoraConfig for this plan (raises if the plan has no LoRA modules)."""
        from peft import LoraConfig

        r = self.resolve(anatomy)
        if not r.lora_modules:
            raise PlanError("this plan trains parameters directly (no LoRA modules); use apply() instead")
        cells = {(li.block, li.column) for li in anatomy.linear.values() if li.name in self.lora_modules}
        blocks = sorted({b for b, _ in cells})
        columns = sorted({c for _, c in cells})
        rectangle = len(cells) == len(blocks) * len(columns) and all(
            (b, c) in anatomy.linear for b in blocks for c in columns)
        kwargs = dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=r.bias,
                      task_type="CAUSAL_LM", modules_to_save=list(r.modules_to_save) or None)
        if any(li.conv1d for li in anatomy.linear.values() if li.name in self.lora_modules):
            kwargs["fan_in_fan_out"] = True  # GPT-2's Conv1D stores weights transposed
        tied_modules = set(anatomy.embedding_modules[:1]) | ({anatomy.head_module} if anatomy.head_module else set())
        if anatomy.tied and tied_modules & set(r.modules_to_save):
            kwargs["ensure_weight_tying"] = True  # keep the head and the embeddings one matrix
        if rectangle:
            kwargs["target_modules"] = columns
            if len(blocks) < anatomy.n_blocks:
                kwargs["layers_to_transform"] = blocks
                kwargs["layers_pattern"] = anatomy.layers_pattern
        else:
            kwargs["target_modules"] = list(r.lora_modules)
        return LoraConfig(**kwargs)

    def apply(self, model, anatomy: Anatomy | None = None):
        """Freeze the model and make the plan trainable. Returns the model to train (a
        PeftModel when the plan has LoRA modules)."""
        anatomy = anatomy or inspect_model(model)
        r = self.resolve(anatomy)
        if r.lora_modules:
            from peft import get_peft_model

            return get_peft_model(base_model_of(model), self.lora_config(anatomy))
        wanted = set(r.full_params)
        for name, p in base_model_of(model).named_parameters():
            p.requires_grad_(name in wanted)
        return model

    def memory_estimate(self, anatomy: Anatomy, *, batch_size: int = 8, seq_len: int = 256,
                        weights: str = "float32", gradient_checkpointing: bool = False,
                        attention: str = "sdpa") -> MemoryEstimate:
        """Bytes for weights, gradients, AdamW states and activations (see core.memory)."""
        r = self.resolve(anatomy)
        lowest = self.lowest_trained_block(anatomy)
        active = max(1, anatomy.n_blocks - lowest)
        lora_in = sum(li.in_features for li in anatomy.linear.values() if li.name in self.lora_modules)
        return estimate_memory(anatomy_numbers(anatomy), trainable=r.trainable, batch_size=batch_size,
                               seq_len=seq_len, weights=weights, gradient_checkpointing=gradient_checkpointing,
                               attention=attention, lora_input_features=lora_in // active,
                               lowest_trained_block=lowest, adapters=self.method == "lora",
                               projections_trained=bool(self.lora_modules) or any(
                                   anatomy.params[n].kind in ("attention", "mlp", "other") and not anatomy.params[n].is_bias
                                   for n in self.train_params))

    def lowest_trained_block(self, anatomy: Anatomy) -> int:
        """Backward runs down to here; n_blocks when no block trains (only the head)."""
        # a trained input embedding (tied heads included) needs gradients through every block
        if any(anatomy.params[n].kind == "embedding" for n in self.train_params if n in anatomy.params):
            return 0
        blocks = self.blocks(anatomy)
        return blocks[0] if blocks else anatomy.n_blocks

    def blocks(self, anatomy: Anatomy) -> list[int]:
        out = {li.block for li in anatomy.linear.values() if li.name in self.lora_modules}
        out |= {anatomy.params[n].block for n in self.train_params if n in anatomy.params}
        return sorted(b for b in out if b is not None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_modules"] = sorted(self.lora_modules)
        d["train_params"] = sorted(self.train_params)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "FreezePlan":
        return cls(**data)


def anatomy_numbers(anatomy: Anatomy) -> dict:
    """The model sizes the memory estimate needs, as plain numbers."""
    quantizable = sum(li.n_params for li in anatomy.linear.values())
    return {
        "total_params": anatomy.total_params,
        "linear_params": quantizable,
        "n_blocks": anatomy.n_blocks,
        "hidden": anatomy.hidden_size,
        "intermediate": anatomy.intermediate_size,
        "vocab": anatomy.vocab_size,
        "heads": anatomy.n_heads,
        "kv_heads": anatomy.n_kv_heads,
    }

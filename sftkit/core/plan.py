"""FreezePlan: which modules get LoRA adapters and which parameters train directly.

A plan is two sets of names over a model's anatomy (LoRA modules, fully trained
parameters) plus the LoRA hyper-parameters. Presets build the usual plans; set
operations (``|``, ``-``) combine them; an editor toggles single names. Pure Python over
the ``sftkit.core.anatomy.Anatomy`` record: it validates a plan, counts its trainable
parameters and estimates its memory. Applying it to a torch model (``requires_grad`` flags or
a peft ``LoraConfig``) is ``sftkit.engine.freeze.FreezePlan``, this class plus ``apply`` and
``lora_config``.

The one serialisable form of a plan is the run config's adapter section
(``sftkit.core.runconfig.AdapterConfig``): a preset plus explicit additions and removals.
A plan remembers the preset it was built from (``origin``) through edits, so
``plan.to_adapter(anatomy)`` is that preset plus the difference, found directly;
``FreezePlan.from_adapter`` builds the same sets back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

from .anatomy import Anatomy
from .errors import ConfigError
from .memory import MemoryEstimate, estimate_memory


class PlanError(ConfigError):
    """The plan doesn't fit the model or its settings are out of range."""


# The presets: the one definition of their names and what they mean (the run config, the picker
# and FreezePlan.preset all read it). "top_n" limits a preset to the last top_n blocks.
PRESET_MEANINGS = {
    "lora_attention": "LoRA on the attention projections of every block (or of the last top_n)",
    "lora_all_linear": "LoRA on every linear module of every block (or of the last top_n)",
    "lora_top_blocks": "LoRA on every linear module of the last top_n blocks (top_n required)",
    "freeze_tuning": "every parameter of the last top_n blocks trains in full (top_n required)",
    "bitfit": "only the biases and the norms train",
    "none": "nothing: an empty start for explicit additions",
}
PRESETS = tuple(PRESET_MEANINGS)
NEEDS_TOP_N = ("lora_top_blocks", "freeze_tuning")


@dataclass(frozen=True)
class PresetChoice:
    """A preset with its options: where a plan started (``FreezePlan.origin``)."""

    name: str
    top_n: int | None = None
    embeddings: bool = False
    head: bool = False

    @property
    def label(self) -> str:
        return self.name + (f"(top {self.top_n})" if self.top_n else "") + \
            (" + embeddings" if self.embeddings else "") + (" + head" if self.head else "")


@dataclass(frozen=True)
class ResolvedPlan:
    """What applying a plan does to the model, module by module."""

    lora_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]  # modules trained in full next to LoRA (peft copies them)
    bias: str  # peft's bias mode: "none" | "all"
    full_params: tuple[str, ...]  # without LoRA: the parameters set to requires_grad
    trainable: int


_EDIT_FIELDS = ("add_lora", "remove_lora", "add_train", "remove_train")


@dataclass(frozen=True)
class FreezePlan:
    lora_modules: frozenset = field(default_factory=frozenset)
    train_params: frozenset = field(default_factory=frozenset)
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    label: str = "custom"
    # the preset this plan was built from; kept through edits (a hint for to_adapter, not compared)
    origin: PresetChoice | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "lora_modules", frozenset(self.lora_modules))
        object.__setattr__(self, "train_params", frozenset(self.train_params))
        if isinstance(self.origin, dict):
            object.__setattr__(self, "origin", PresetChoice(**self.origin))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise PlanError(f"rank={self.rank!r} must be a positive integer (typical: 4 to 64)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise PlanError(f"alpha={self.alpha!r} must be > 0 (typical: rank or 2 x rank)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PlanError(f"dropout={self.dropout!r} must be in [0, 1)")

    # equal across the core class and the engine's subclass: the same sets and settings
    def _key(self) -> tuple:
        return (self.lora_modules, self.train_params, self.rank, self.alpha, self.dropout, self.label)

    def __eq__(self, other) -> bool:
        return isinstance(other, FreezePlan) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ---- set operations ----------------------------------------------------------------
    def __or__(self, other: "FreezePlan") -> "FreezePlan":
        return replace(self, lora_modules=self.lora_modules | other.lora_modules,
                       train_params=self.train_params | other.train_params, label="custom")

    def __sub__(self, other: "FreezePlan") -> "FreezePlan":
        return replace(self, lora_modules=self.lora_modules - other.lora_modules,
                       train_params=self.train_params - other.train_params, label="custom")

    def with_settings(self, **kwargs) -> "FreezePlan":
        """A copy with other rank / alpha / dropout / label (or sets)."""
        return replace(self, **kwargs)

    @property
    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}

    @property
    def method(self) -> str:
        return "lora" if self.lora_modules else "full"

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, anatomy: Anatomy, *, top_n: int | None = None, embeddings: bool = False,
               head: bool = False, **settings) -> "FreezePlan":
        """One of PRESETS, optionally with embeddings and/or head trained too."""
        if name not in PRESET_MEANINGS:
            raise PlanError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        if name in NEEDS_TOP_N and top_n is None:
            raise PlanError(f"preset {name!r} needs top_n (how many of the last blocks)")
        blocks = range(anatomy.n_blocks)
        if top_n is not None and name != "none":
            if not 1 <= top_n <= anatomy.n_blocks:
                raise PlanError(f"top_n={top_n} must be between 1 and {anatomy.n_blocks} (the model's blocks)")
            blocks = range(anatomy.n_blocks - top_n, anatomy.n_blocks)
        if name == "lora_attention":
            plan = cls.lora(anatomy, anatomy.attention_columns, blocks, **settings)
        elif name in ("lora_all_linear", "lora_top_blocks"):
            plan = cls.lora(anatomy, anatomy.linear_columns, blocks, **settings)
        elif name == "freeze_tuning":
            plan = cls(train_params={p.name for p in anatomy.params.values() if p.block in set(blocks)}, **settings)
        elif name == "bitfit":
            plan = cls(train_params={p.name for p in anatomy.params.values() if p.is_bias or p.kind == "norm"},
                       **settings)
        else:  # "none"
            plan = cls(**settings)
        if embeddings:
            plan = plan | cls.embeddings(anatomy)
        if head:
            plan = plan | cls.head(anatomy)
        choice = PresetChoice(name, top_n if name != "none" else None, embeddings, head)
        return replace(plan, label=choice.label, origin=choice)

    @classmethod
    def lora(cls, anatomy: Anatomy, targets: Iterable[str], blocks: Iterable[int] | None = None,
             **settings) -> "FreezePlan":
        """LoRA on the named modules of the chosen blocks (default all).

        targets: module paths inside a block ("self_attn.q_proj") or their last part
        ("q_proj"); a name the model doesn't have is an error listing the names it has.
        """
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

    @classmethod
    def biases(cls, anatomy: Anatomy) -> "FreezePlan":
        """Every bias of the model (part of BitFit)."""
        return cls(train_params=frozenset(p.name for p in anatomy.params.values() if p.is_bias))

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

    def memory_estimate(self, anatomy: Anatomy, *, batch_size: int = 8, seq_len: int = 256,
                        weights: str = "float32", gradient_checkpointing: bool = False,
                        attention: str = "sdpa") -> MemoryEstimate:
        """Bytes for weights, gradients, AdamW states and activations (see core.memory)."""
        r = self.resolve(anatomy)
        lowest = self.lowest_trained_block(anatomy)
        active = max(1, anatomy.n_blocks - lowest)
        lora_in = sum(li.in_features for li in anatomy.linear.values() if li.name in self.lora_modules)
        projections = bool(self.lora_modules) or any(
            anatomy.params[n].kind in ("attention", "mlp", "other") and not anatomy.params[n].is_bias
            for n in self.train_params)
        return estimate_memory(anatomy.numbers(), trainable=r.trainable, batch_size=batch_size,
                               seq_len=seq_len, weights=weights, gradient_checkpointing=gradient_checkpointing,
                               attention=attention, lora_input_features=lora_in // active,
                               lowest_trained_block=lowest, adapters=self.method == "lora",
                               projections_trained=projections)

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

    # ---- serialised forms --------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_modules"] = sorted(self.lora_modules)
        d["train_params"] = sorted(self.train_params)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "FreezePlan":
        return cls(**data)

    @classmethod
    def from_adapter(cls, adapter, anatomy: Anatomy) -> "FreezePlan":
        """The plan a run config's adapter section (an AdapterConfig) describes; names are
        checked against the model."""
        plan = cls.preset(adapter.preset, anatomy, top_n=adapter.top_n, embeddings=adapter.embeddings,
                          head=adapter.head, rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout)
        linear = {li.name for li in anatomy.linear.values()}
        for name, known in zip(_EDIT_FIELDS, (linear, linear, set(anatomy.params), set(anatomy.params))):
            bad = [n for n in getattr(adapter, name) if n not in known]
            if bad:
                raise PlanError(f"adapter.{name}: {', '.join(bad[:5])} not in this model; names look like "
                                f"{', '.join(sorted(known)[:3])}")
        label = plan.label
        plan = (plan | cls(lora_modules=adapter.add_lora, train_params=adapter.add_train)) - \
            cls(lora_modules=adapter.remove_lora, train_params=adapter.remove_train)
        edited = any(getattr(adapter, name) for name in _EDIT_FIELDS)
        plan = plan.with_settings(label=label + (" (edited)" if edited else ""))
        if not plan.lora_modules and not plan.train_params:
            raise PlanError("the adapter section trains nothing: pick a preset or add modules (adapter.add_lora)")
        return plan

    def to_adapter(self, anatomy: Anatomy):
        """This plan as a run config's adapter section (an AdapterConfig): the preset it started
        from plus additions and removals, so it exports to readable, portable YAML and
        ``from_adapter`` builds back the same sets. A plan without a usable origin (made from
        sets, or on another model) is expressed against the preset that needs the fewest edits."""
        from .runconfig import AdapterConfig

        choice, base = self.origin, self._base(self.origin, anatomy)
        if base is None:
            choice = self._nearest_preset(anatomy)
            base = self._base(choice, anatomy)
        return AdapterConfig(preset=choice.name, top_n=choice.top_n, embeddings=choice.embeddings,
                             head=choice.head, **self.settings, **self._edits(base))

    @staticmethod
    def _base(choice: PresetChoice | None, anatomy: Anatomy) -> "FreezePlan | None":
        if choice is None:
            return None
        try:
            return FreezePlan.preset(choice.name, anatomy, top_n=choice.top_n, embeddings=choice.embeddings,
                                     head=choice.head)
        except PlanError:
            return None

    def _edits(self, base: "FreezePlan") -> dict[str, list[str]]:
        return {"add_lora": sorted(self.lora_modules - base.lora_modules),
                "remove_lora": sorted(base.lora_modules - self.lora_modules),
                "add_train": sorted(self.train_params - base.train_params),
                "remove_train": sorted(base.train_params - self.train_params)}

    def _nearest_preset(self, anatomy: Anatomy) -> PresetChoice:
        """The preset needing the fewest edits, among a handful read off the plan: top_n from its
        lowest trained block, embeddings / head when all of theirs train."""
        emb = FreezePlan.embeddings(anatomy).train_params
        head = FreezePlan.head(anatomy).train_params if anatomy.head_module else frozenset()
        with_emb = bool(emb) and emb <= self.train_params
        with_head = bool(head) and head <= self.train_params and not (with_emb and head <= emb)
        blocks = self.blocks(anatomy)
        top = anatomy.n_blocks - blocks[0] if blocks else None
        names = ["none", "lora_attention", "lora_all_linear", "bitfit"]
        choices = [PresetChoice(n, None, e, h) for n in names for e, h in {(False, False), (with_emb, with_head)}]
        if top:
            choices += [PresetChoice(n, top, with_emb, with_head)
                        for n in ("lora_attention", "lora_top_blocks", "freeze_tuning")]
        best = None
        for choice in sorted(choices, key=lambda c: (PRESETS.index(c.name), c.top_n or 0, c.embeddings, c.head)):
            base = self._base(choice, anatomy)
            if base is None:
                continue
            size = sum(len(v) for v in self._edits(base).values())
            if best is None or size < best[0]:
                best = (size, choice)
        return best[1]


def build_plan(adapter, anatomy: Anatomy) -> FreezePlan:
    """``FreezePlan.from_adapter``: the plan an AdapterConfig describes."""
    return FreezePlan.from_adapter(adapter, anatomy)


def adapter_config_from_plan(plan: FreezePlan, anatomy: Anatomy):
    """``plan.to_adapter(anatomy)``: the AdapterConfig (preset + edits) of a plan."""
    return plan.to_adapter(anatomy)

"""FreezePlan: which modules get LoRA adapters and which parameters train directly.

A plan is two sets of names over a model's anatomy (LoRA modules, fully trained
parameters) plus the LoRA hyper-parameters. Its ``family`` says which PEFT method it is:
LoRA (with DoRA / rsLoRA as options), IA3 (learned scaling vectors on the same module grid),
or a prompt method (prompt tuning, prefix tuning, p-tuning, LLaMA-Adapter's adaption prompt)
that trains virtual tokens instead of modules (see ``FAMILIES``). Presets build the usual plans; set
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
from .fields import Int
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
    "ia3": "IA3: learned vectors scale the attention keys/values and the MLP down-projections (an adapter "
           "method; the grid shows where)",
    "prompt_tuning": "a soft prompt: adapter.virtual_tokens trained vectors in front of every prompt",
    "prefix_tuning": "trained keys and values (adapter.virtual_tokens) in front of every block's attention",
    "p_tuning": "a soft prompt made by a small trained MLP (p-tuning)",
    "adaption_prompt": "LLaMA-Adapter: adapter.virtual_tokens trained prompt vectors with zero-started gates in "
                       "the attention of the last top_n blocks (Llama, Mistral, GPT-2)",
    "none": "nothing: an empty start for explicit additions",
}
PRESETS = tuple(PRESET_MEANINGS)
VIRTUAL_TOKENS = Int(1, 512)  # how many virtual tokens a prompt method may have: the plan's and the run config's range
NEEDS_TOP_N = ("lora_top_blocks", "freeze_tuning")

# What a plan's ``family`` can be: the module-grid methods and the prompt methods, and how each
# one's result leaves the run. Prompt methods train virtual tokens, not modules: no grid edits.
PROMPT_FAMILIES = ("prompt_tuning", "prefix_tuning", "p_tuning", "adaption_prompt")
# peft's prompt learning (virtual tokens in front of the rows): runs of these get neither the loss on the trained
# positions only nor passes (engine.fast.supports_trained_positions_loss); LLaMA-Adapter is not one of them
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
FAMILIES = ("lora", "ia3", "full") + PROMPT_FAMILIES
FAMILY_NAMES = {"lora": "LoRA", "ia3": "IA3", "full": "full / BitFit", "prompt_tuning": "prompt tuning",
                "prefix_tuning": "prefix tuning", "p_tuning": "p-tuning", "adaption_prompt": "LLaMA-Adapter"}
# merging folds the update into the weights: LoRA (and DoRA) and IA3 can; a prompt can't
MERGEABLE = ("lora", "ia3")
# the model types peft's adaption prompt knows (peft.tuners.adaption_prompt.config; a test checks)
ADAPTION_PROMPT_MODELS = ("llama", "mistral", "gpt2")
# IA3 targets by default (peft's choice for Llama/GPT-2): the keys and values (or the fused qkv)
IA3_ATTENTION = ("k_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj", "key", "value", "Wqkv")


def ia3_feedforward(anatomy: Anatomy, name: str) -> bool:
    """IA3 scales a feedforward module's input (an MLP down-projection: more inputs than outputs), any
    other module's output."""
    li = anatomy.linear_by_name(name)
    return li.kind == "mlp" and li.in_features > li.out_features


def ia3_columns(anatomy: Anatomy) -> list[str]:
    """The default IA3 columns of a block: keys and values (or fused qkv), and the MLP down-projections."""
    attn = [c for c in anatomy.attention_columns if c.rsplit(".", 1)[-1] in IA3_ATTENTION] or anatomy.attention_columns
    block = min(b for b, _ in anatomy.linear) if anatomy.linear else 0
    down = [c for c in anatomy.mlp_columns if (block, c) in anatomy.linear
            and ia3_feedforward(anatomy, anatomy.linear[(block, c)].name)]
    return attn + down


def prefix_width(anatomy: Anatomy) -> int:
    """Values per virtual token and block in prefix tuning: a key and a value of the key/value heads."""
    return 2 * anatomy.attention_head_dim * (anatomy.n_kv_heads or anatomy.n_heads)


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
    # the PEFT method: "lora" / "ia3" put an adapter on ``lora_modules``; a prompt family trains
    # virtual tokens (``virtual_tokens``; ``prompt_init`` text or None for random; ``top_blocks``: the
    # blocks LLaMA-Adapter adapts). "full" is not stored: a "lora" plan without modules trains in place.
    family: str = "lora"
    use_dora: bool = False
    rslora: bool = False
    virtual_tokens: int = 20
    prompt_init: str | None = None
    top_blocks: int | None = None

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
        if self.family not in FAMILIES or self.family == "full":
            raise PlanError(f"family={self.family!r}; allowed: {', '.join(f for f in FAMILIES if f != 'full')}")
        if not VIRTUAL_TOKENS.accepts(self.virtual_tokens):
            raise PlanError(f"virtual_tokens={self.virtual_tokens!r} is not allowed; allowed: {VIRTUAL_TOKENS.describe()}")
        if self.prompt_init is not None and not (isinstance(self.prompt_init, str) and self.prompt_init.strip()):
            raise PlanError(f"prompt_init={self.prompt_init!r} must be a non-blank text, or None (random)")
        if self.family != "lora" and (self.use_dora or self.rslora):
            raise PlanError(f"adapter.use_dora / adapter.rslora are LoRA options; the {self.family} method has "
                            "neither (turn them off)")
        if self.family == "prompt_tuning" or self.prompt_init is None:
            return
        raise PlanError(f"adapter.prompt_init starts a soft prompt from text: only prompt_tuning has it, not "
                        f"{self.family} (set it to null)")

    # equal across the core class and the engine's subclass: the same sets and settings
    def _key(self) -> tuple:
        return (self.lora_modules, self.train_params, self.rank, self.alpha, self.dropout, self.label,
                self.family, self.use_dora, self.rslora, self.virtual_tokens, self.prompt_init, self.top_blocks)

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
        """The method's knobs (the names of the run config's adapter fields), kept when the preset changes."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "use_dora": self.use_dora,
                "rslora": self.rslora, "virtual_tokens": self.virtual_tokens, "prompt_init": self.prompt_init}

    @property
    def prompt_method(self) -> bool:
        """A prompt family: trains virtual tokens in front of the prompt (or of each block's attention)."""
        return self.family in PROMPT_FAMILIES

    @property
    def method(self) -> str:
        """How the result leaves a run: "lora" for every peft adapter (LoRA, IA3, the prompt methods:
        saved in ``adapter/``), "full" when parameters train in place (saved as a model)."""
        return "lora" if (self.lora_modules or self.prompt_method) else "full"

    @property
    def kind(self) -> str:
        """The PEFT method this plan is: one of FAMILIES ("full" for BitFit, freeze tuning, ...)."""
        if self.prompt_method or self.lora_modules:
            return self.family
        return "full"

    @property
    def kind_label(self) -> str:
        name = FAMILY_NAMES[self.kind]
        if self.kind == "lora" and self.use_dora:
            name = "DoRA"
        return name + (" (rsLoRA scaling)" if self.kind == "lora" and self.rslora else "")

    @property
    def mergeable(self) -> bool:
        """The update can fold into the weights (LoRA, DoRA, IA3, and parameters trained in place)."""
        return self.kind in MERGEABLE or self.kind == "full"

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
        settings = _settings_for(name, settings)
        if name in PROMPT_FAMILIES:
            if embeddings or head:
                raise PlanError(f"{name} trains only its virtual tokens; adapter.embeddings / adapter.head go with "
                                "LoRA, IA3 or full training (turn them off)")
            top = (top_n if top_n is not None else anatomy.n_blocks) if name == "adaption_prompt" else None
            choice = PresetChoice(name, top_n if name == "adaption_prompt" else None)
            return cls(family=name, top_blocks=top, label=choice.label, origin=choice, **settings)
        if name == "ia3":
            plan = cls.lora(anatomy, ia3_columns(anatomy), blocks, family="ia3", **settings)
        elif name == "lora_attention":
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
        if self.prompt_method:
            self._validate_prompt(anatomy)
            return
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

    def _validate_prompt(self, anatomy: Anatomy) -> None:
        if self.lora_modules or self.train_params:
            raise PlanError(f"{self.family} trains only its virtual tokens; it can't also put adapters on modules or "
                            "train parameters (adapter.add_lora / adapter.add_train): pick one method")
        if self.family == "adaption_prompt":
            if anatomy.model_type not in ADAPTION_PROMPT_MODELS:
                raise PlanError(f"adaption_prompt (LLaMA-Adapter) supports model types "
                                f"{', '.join(ADAPTION_PROMPT_MODELS)} in peft; this model is {anatomy.model_type}: "
                                "pick prompt_tuning, prefix_tuning, ia3 or a LoRA preset")
            if not (self.top_blocks and 1 <= self.top_blocks <= anatomy.n_blocks):
                raise PlanError(f"adaption_prompt: top_n={self.top_blocks} must be between 1 and {anatomy.n_blocks} "
                                "(the model's blocks)")

    def prompt_params(self, anatomy: Anatomy) -> int:
        """Trained values of a prompt method (0 for the others), as peft builds them."""
        v, h = self.virtual_tokens, anatomy.hidden_size
        if self.family == "prompt_tuning":
            return v * h
        if self.family == "prefix_tuning":
            return v * anatomy.n_blocks * prefix_width(anatomy)
        if self.family == "p_tuning":  # the prompt vectors and the encoder MLP h -> h -> h -> h (hidden = h)
            return v * h + 3 * (h * h + h)
        if self.family == "adaption_prompt":  # per adapted block: the prompt and one gate
            return self.top_blocks * (v * h + 1)
        return 0

    def resolve(self, anatomy: Anatomy) -> ResolvedPlan:
        self.validate(anatomy)
        if self.prompt_method:
            return ResolvedPlan((), (), "none", (), self.prompt_params(anatomy))
        if self.method == "full":
            count = sum(anatomy.params[n].numel for n in self.train_params)
            return ResolvedPlan((), (), "none", tuple(sorted(self.train_params)), count)
        biases = {n for n in self.train_params if anatomy.params[n].is_bias}
        all_biases = {p.name for p in anatomy.params.values() if p.is_bias}
        if biases and self.family == "ia3":
            raise PlanError("IA3 has no bias option in peft: take the biases out (adapter.remove_train) or use LoRA")
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
            if self.family == "ia3":  # one scale per output (per input of a feedforward module)
                count += li.in_features if ia3_feedforward(anatomy, name) else li.out_features
                continue
            count += self.rank * (li.in_features + li.out_features)
            if self.use_dora:  # DoRA's magnitude: one value per output
                count += li.out_features
        saved_params = {n for m in save for n in anatomy.params_of_module(m)}
        count += sum(anatomy.params[n].numel for n in saved_params)
        if biases:
            count += sum(anatomy.params[n].numel for n in all_biases - saved_params)
        return ResolvedPlan(tuple(sorted(self.lora_modules)), tuple(save), "all" if biases else "none", (), count)

    def trainable_params(self, anatomy: Anatomy) -> int:
        return self.resolve(anatomy).trainable

    def memory_estimate(self, anatomy: Anatomy, *, batch_size: int = 8, seq_len: int = 256,
                        weights: str = "float32", gradient_checkpointing: bool = False,
                        attention: str = "sdpa", trained_per_row: int | None = None,
                        pass_tokens: int | None = None, frozen: str | None = None) -> MemoryEstimate:
        """Bytes for weights, gradients, AdamW states and activations (see core.memory); ``frozen``: the
        frozen weights' storage when the run keeps them in another dtype (bf16 on CPUs with native bf16).

        What each method keeps for backward, measured on SmolLM2-135M with saved-tensor hooks
        (``tests/test_peft_methods.py`` checks it): LoRA keeps each adapted projection's input; IA3
        the scaled outputs (the inputs of the down-projections it scales); DoRA also keeps two
        outputs per token and module (the identity matrix it multiplies through the adapter to get
        its weight norm belongs to a graph it detaches: nothing of it is kept). Prompt methods train no
        projection: a block keeps about 9*h + 2*i values per token; prompt tuning and p-tuning make
        every row ``virtual_tokens`` longer (logits included); prefix tuning and LLaMA-Adapter add
        keys and values, not rows; LLaMA-Adapter's backward stops at its lowest adapted block.
        """
        r = self.resolve(anatomy)
        if self.method != "lora":  # runs keep plans that save the whole model in fp32 (engine/precision.py)
            frozen = None
        lowest = self.lowest_trained_block(anatomy)
        active = max(1, anatomy.n_blocks - lowest)
        if self.family in PROMPT_LEARNING:  # full logits, one pass: what their runs do (recipes.choose_batching)
            trained_per_row = pass_tokens = None
        common = dict(trainable=r.trainable, batch_size=batch_size, weights=weights,
                      gradient_checkpointing=gradient_checkpointing, attention=attention, lowest_trained_block=lowest,
                      trained_per_row=trained_per_row, pass_tokens=pass_tokens, frozen=frozen)
        if self.prompt_method:
            longer = self.family in ("prompt_tuning", "p_tuning")
            return estimate_memory(anatomy.numbers(), seq_len=seq_len + (self.virtual_tokens if longer else 0),
                                   adapters=True, projections_trained=False, **common)
        adapted = [li for li in anatomy.linear.values() if li.name in self.lora_modules]
        if self.family == "ia3":
            kept = sum(li.in_features if ia3_feedforward(anatomy, li.name) else li.out_features for li in adapted)
        else:
            kept = sum(li.in_features for li in adapted)
            if self.use_dora:
                kept += sum(2 * li.out_features for li in adapted)
        projections = (bool(self.lora_modules) and self.family == "lora") or any(
            anatomy.params[n].kind in ("attention", "mlp", "other") and not anatomy.params[n].is_bias
            for n in self.train_params)
        est = estimate_memory(anatomy.numbers(), seq_len=seq_len, lora_input_features=kept // active,
                              adapters=self.method == "lora", projections_trained=projections, **common)
        return est

    def lowest_trained_block(self, anatomy: Anatomy) -> int:
        """Backward runs down to here; n_blocks when no block trains (only the head)."""
        if self.prompt_method:  # virtual tokens in front: every block; LLaMA-Adapter: its lowest block
            return anatomy.n_blocks - self.top_blocks if self.family == "adaption_prompt" else 0
        # a trained input embedding (tied heads included) needs gradients through every block
        if any(anatomy.params[n].kind == "embedding" for n in self.train_params if n in anatomy.params):
            return 0
        blocks = self.blocks(anatomy)
        return blocks[0] if blocks else anatomy.n_blocks

    def blocks(self, anatomy: Anatomy) -> list[int]:
        if self.family == "adaption_prompt":
            return list(range(anatomy.n_blocks - (self.top_blocks or anatomy.n_blocks), anatomy.n_blocks))
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
                          head=adapter.head, rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout,
                          use_dora=adapter.use_dora, rslora=adapter.rslora, virtual_tokens=adapter.virtual_tokens,
                          prompt_init=adapter.prompt_init)
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
        if not plan.prompt_method and not plan.lora_modules and not plan.train_params:
            raise PlanError("the adapter section trains nothing: pick a preset or add modules (adapter.add_lora)")
        plan.resolve(anatomy)  # a method with edits it can't take (a prompt method with modules) fails here
        return plan

    def to_adapter(self, anatomy: Anatomy):
        """This plan as a run config's adapter section (an AdapterConfig): the preset it started
        from plus additions and removals, so it exports to readable, portable YAML and
        ``from_adapter`` builds back the same sets. A plan without a usable origin (made from
        sets, or on another model) is expressed against the preset that needs the fewest edits."""
        from .runconfig import AdapterConfig

        choice, base = self.origin, self._base(self.origin, anatomy)
        if self.prompt_method:  # no module sets: the method and its knobs say it all
            top = self.top_blocks if self.family == "adaption_prompt" and self.top_blocks != anatomy.n_blocks else None
            return AdapterConfig(preset=self.family, top_n=top, **self.settings)
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
        ia3 = self.family == "ia3" and bool(self.lora_modules)  # only the ia3 preset makes IA3 modules
        names = ["ia3"] if ia3 else ["none", "lora_attention", "lora_all_linear", "bitfit"]
        choices = [PresetChoice(n, None, e, h) for n in names for e, h in {(False, False), (with_emb, with_head)}]
        if top:
            choices += [PresetChoice(n, top, with_emb, with_head)
                        for n in (("ia3",) if ia3 else ("lora_attention", "lora_top_blocks", "freeze_tuning"))]
        best = None
        for choice in sorted(choices, key=lambda c: (PRESETS.index(c.name), c.top_n or 0, c.embeddings, c.head)):
            base = self._base(choice, anatomy)
            if base is None:
                continue
            size = sum(len(v) for v in self._edits(base).values())
            if best is None or size < best[0]:
                best = (size, choice)
        return best[1]


def _settings_for(preset: str, settings: dict) -> dict:
    """The knobs a preset's method has: the LoRA options only for LoRA presets, the text start only for
    prompt tuning (another method's knobs are dropped, so a picker can switch presets freely)."""
    out = {k: v for k, v in settings.items() if k != "family"}
    lora = preset not in PROMPT_FAMILIES and preset != "ia3"
    if not lora:
        out.pop("use_dora", None)
        out.pop("rslora", None)
    if preset != "prompt_tuning":
        out.pop("prompt_init", None)
    return out


def build_plan(adapter, anatomy: Anatomy) -> FreezePlan:
    """``FreezePlan.from_adapter``: the plan an AdapterConfig describes."""
    return FreezePlan.from_adapter(adapter, anatomy)


def adapter_config_from_plan(plan: FreezePlan, anatomy: Anatomy):
    """``plan.to_adapter(anatomy)``: the AdapterConfig (preset + edits) of a plan."""
    return plan.to_adapter(anatomy)

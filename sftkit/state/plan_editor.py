"""PlanEditor: a FreezePlan being edited, with its counters and memory estimate.

What the layer picker edits, without the widgets: the plan (a ``sftkit.engine.freeze.FreezePlan``,
so ``editor.plan.apply(model)`` works), the selected preset and top N, what a click on a cell
sets, the embeddings / head / biases toggles, the batch the estimate is for, and the derived
values: trainable parameters, the memory estimate, whether it fits the device, the error of a
plan that can't train. Every change calls the ``on_change`` callbacks with what changed
(``PLAN``, ``ESTIMATE``, ``SELECTION`` or ``ERROR``).
"""

from __future__ import annotations

from typing import Callable

from ..core.anatomy import Anatomy
from ..core.memory import MemoryEstimate
from ..core.plan import NEEDS_TOP_N, PRESET_MEANINGS, PRESETS, PlanError
from ..engine.freeze import FreezePlan
from .observable import Observable

# An estimate above this share of the device's memory "won't fit": the activation estimate is
# within about 20% (README), and the allocator, the CUDA context and fragmentation need the rest.
FIT_FRACTION = 0.9
FIT_ADVICE = ("lower the batch size or sequence length, turn on gradient checkpointing, train fewer blocks, "
              "or load the model in 4-bit")

PLAN = "plan"  # the plan changed: cells, counters and the controls showing its settings
ESTIMATE = "estimate"  # batch, sequence length or checkpointing changed: counters only
SELECTION = "selection"  # the selected preset / top N / click mode changed: nothing to recount
ERROR = "error"  # an edit was refused; ``error`` says why and the plan is unchanged
GROUPS = ("embeddings", "head", "biases")
CLICK_MODES = ("lora", "full")


def size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


class PlanEditor(Observable):
    """Edit what trains, block by block, and follow the cost.

    anatomy: the model's anatomy (``sftkit.engine.anatomy.inspect_model``); ``for_model`` makes
        one from a loaded model and probes the device.
    plan: the starting plan (default: LoRA on attention, rank 16).
    weights: how the weights are stored (float32, bfloat16, float16, 4bit, 8bit).
    frozen: how a run stores the frozen weights when that differs (bfloat16: a CPU with native bf16,
        the policy's ``frozen_dtype``; ``for_model`` asks the policy); None: as ``weights``.
    device_bytes, device_name: the memory the estimate is compared with (None: unknown, always fits).
    """

    def __init__(self, anatomy: Anatomy, plan: FreezePlan | None = None, *, weights: str = "float32",
                 device_bytes: int | None = None, device_name: str = "device", batch_size: int = 8,
                 seq_len: int = 256, gradient_checkpointing: bool = False, pass_tokens: int | None = None,
                 frozen: str | None = None):
        self.anatomy = anatomy
        self.weights = weights
        if frozen not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"frozen={frozen!r}; allowed: None, float32, bfloat16, float16")
        self.frozen = frozen if weights == "float32" and frozen != weights else None
        self.device_bytes = device_bytes
        self.device_name = device_name
        self.batch_size, self.seq_len, self.gradient_checkpointing = batch_size, seq_len, gradient_checkpointing
        # runs work through a batch in passes of at most training.max_pass_tokens (its default unless given)
        self.pass_tokens = _default_pass_tokens() if pass_tokens is None else (pass_tokens or None)
        self._plan = FreezePlan.of(plan) if plan is not None else FreezePlan.preset("lora_attention", anatomy)
        self.preset, self.top_n, self.click_sets = "lora_attention", anatomy.n_blocks, "lora"
        self.groups = {g: False for g in GROUPS}
        self._follow_origin(None)
        self.error: str | None = None
        self.estimate: MemoryEstimate | None = None
        self.trainable = 0
        self._listeners: list[Callable[[str], None]] = []
        self._recount()

    @classmethod
    def for_model(cls, model, plan: FreezePlan | None = None, *, device_bytes: int | None = None,
                  **kwargs) -> "PlanEditor":
        """An editor for a loaded model: its anatomy and weight format, and (device_bytes None)
        the free GPU memory, else the RAM, to compare the estimate with."""
        from ..engine.anatomy import inspect_model, weights_format

        anatomy = inspect_model(model)
        name = "device"
        if device_bytes is None:
            from ..engine.hardware import probe_hardware

            facts = probe_hardware()
            device_bytes = facts.cuda_free_bytes if facts.cuda_available else facts.ram_total_bytes
            name = facts.cuda_name if facts.cuda_available else "RAM"
        weights = weights_format(model, anatomy)
        if "frozen" not in kwargs and weights == "float32":
            # what a run on this model's device would do with its frozen weights (the policy decides)
            from ..engine.models import plan_load

            device = getattr(model, "device", None)
            kwargs["frozen"] = plan_load(device="cuda" if getattr(device, "type", "cpu") == "cuda" else "cpu",
                                         quantization="none").frozen_dtype
        return cls(anatomy, plan, weights=weights, device_bytes=device_bytes, device_name=name, **kwargs)

    # ---- notifications -----------------------------------------------------------------

    def _refuse(self, exc: PlanError) -> bool:
        self.error = str(exc)
        self._notify(ERROR)
        return False

    # ---- the plan ----------------------------------------------------------------------
    @property
    def plan(self) -> FreezePlan:
        return self._plan

    def set_plan(self, plan: FreezePlan) -> None:
        previous, self._plan = self._plan, FreezePlan.of(plan)
        self._follow_origin(previous.origin)
        self._recount()
        self._notify(PLAN)

    def _follow_origin(self, previous) -> None:
        """A plan from another preset selects that preset, its top N and its embeddings / head."""
        origin = self._plan.origin
        if origin is not None and origin != previous:
            self.preset, self.top_n = origin.name, origin.top_n or self.anatomy.n_blocks
            self.groups.update(embeddings=origin.embeddings, head=origin.head)

    def adapter_config(self):
        """The plan as a run config's adapter section (an AdapterConfig): preset + edits."""
        return self._plan.to_adapter(self.anatomy)

    @staticmethod
    def presets() -> dict[str, str]:
        """Preset names and what each means."""
        return dict(PRESET_MEANINGS)

    def select(self, preset: str | None = None, top_n: int | None = None, click_sets: str | None = None) -> None:
        """Choose the preset and top N the next ``apply_preset`` uses, or what a click sets."""
        new = (preset or self.preset, self.top_n if top_n is None else int(top_n), click_sets or self.click_sets)
        if new[0] not in PRESETS or new[2] not in CLICK_MODES:
            raise ValueError(f"preset must be one of {PRESETS}, click_sets one of {CLICK_MODES}; got {new}")
        if new != (self.preset, self.top_n, self.click_sets):
            self.preset, self.top_n, self.click_sets = new
            self._notify(SELECTION)

    def apply_preset(self, name: str | None = None, top_n: int | None = None) -> bool:
        """Replace the plan by a preset (default: the selected one), keeping the settings and the
        embeddings / head toggles. top_n equal to the number of blocks means all blocks."""
        self.select(name, top_n)
        top = None if (self.top_n == self.anatomy.n_blocks and self.preset not in NEEDS_TOP_N) else self.top_n
        try:
            plan = FreezePlan.preset(self.preset, self.anatomy, top_n=top, embeddings=self.groups["embeddings"],
                                     head=self.groups["head"], **self._plan.settings)
        except PlanError as exc:
            return self._refuse(exc)
        self.set_plan(plan)
        return True

    def set_settings(self, **settings) -> bool:
        """New rank / alpha / dropout; a value out of range is refused (``error`` says why)."""
        if all(getattr(self._plan, k) == v for k, v in settings.items()):
            return True
        try:
            plan = self._plan.with_settings(**settings)
        except PlanError as exc:
            return self._refuse(exc)
        self.set_plan(plan)
        return True

    def set_group(self, group: str, on: bool) -> bool:
        """Train the embeddings, the head or every bias, or stop training them."""
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        if self.groups[group] == bool(on):
            return True
        try:
            part = getattr(FreezePlan, group)(self.anatomy)
        except PlanError as exc:
            return self._refuse(exc)
        self.groups[group] = bool(on)
        self.set_plan((self._plan | part) if on else (self._plan - part))
        return True

    def set_budget(self, *, batch_size: int | None = None, seq_len: int | None = None,
                   gradient_checkpointing: bool | None = None) -> None:
        """What the memory estimate is for."""
        new = (self.batch_size if batch_size is None else int(batch_size),
               self.seq_len if seq_len is None else int(seq_len),
               self.gradient_checkpointing if gradient_checkpointing is None else bool(gradient_checkpointing))
        if new != (self.batch_size, self.seq_len, self.gradient_checkpointing):
            self.batch_size, self.seq_len, self.gradient_checkpointing = new
            self._recount()
            self._notify(ESTIMATE)

    # ---- cells ---------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """The grid's columns: the linear modules of a block, then its norms."""
        return self.anatomy.linear_columns + self.anatomy.norm_columns

    def cell_params(self, block: int, column: str) -> int:
        a = self.anatomy
        if (block, column) in a.linear:
            return a.linear[(block, column)].n_params
        return sum(a.params[p].numel for p in a.params_of_module(a.module_name(block, column)))

    def cell_state(self, block: int, column: str) -> str:
        """"lora", "ia3", "full", "prompt" (LLaMA-Adapter's adapted attention) or "off" for one module of one block."""
        a = self.anatomy
        module = a.module_name(block, column)
        if module in self._plan.lora_modules:
            return "ia3" if self._plan.family == "ia3" else "lora"
        if self._plan.family == "adaption_prompt" and a.column_kind(column) == "attention" \
                and block in self._plan.blocks(a):
            return "prompt"
        names = [n for n in a.params_of_module(module) if not a.params[n].is_bias] or a.params_of_module(module)
        if names and all(n in self._plan.train_params for n in names):
            return "full"
        return "off"

    def toggle(self, block: int, column: str, mode: str | None = None) -> None:
        """What a click on a cell does: set it to ``mode`` (default the click mode; norms are
        always "full"), or back to frozen when it is in that state already."""
        a = self.anatomy
        if self._plan.prompt_method:
            self._refuse(PlanError(f"{self._plan.kind_label} trains virtual tokens, not modules: apply a module "
                                   "preset (LoRA, IA3, BitFit, freeze tuning) to edit cells"))
            return
        module = a.module_name(block, column)
        want = (mode or self.click_sets) if (block, column) in a.linear else "full"
        lora = set(self._plan.lora_modules) - {module}
        params = set(self._plan.train_params) - set(a.params_of_module(module))
        if self.cell_state(block, column).replace("ia3", "lora") != want:  # a click on an IA3 plan adds IA3
            if want == "lora":
                lora.add(module)
            else:
                params |= set(a.params_of_module(module))
        self.set_plan(self._plan.with_settings(lora_modules=frozenset(lora), train_params=frozenset(params),
                                               label="custom"))

    # ---- prompt methods ------------------------------------------------------------------------
    def virtual_tokens_text(self) -> str | None:
        """Where a prompt method's virtual tokens go, in words (None for module methods)."""
        plan, a = self._plan, self.anatomy
        if not plan.prompt_method:
            return None
        v = plan.virtual_tokens
        if plan.family in ("prompt_tuning", "p_tuning"):
            start = f"started from the text {plan.prompt_init!r}" if plan.prompt_init else "started at random"
            made = " made by a small trained MLP" if plan.family == "p_tuning" else ""
            return f"{v} virtual tokens{made} in front of every prompt ({start}); every row is {v} tokens longer"
        if plan.family == "prefix_tuning":
            return f"{v} trained keys and values in front of the attention of each of the {a.n_blocks} blocks"
        blocks = plan.blocks(a)
        return (f"{v} trained prompt vectors with a zero-started gate in the attention of blocks "
                f"{blocks[0]} to {blocks[-1]}")

    # ---- derived ---------------------------------------------------------------------------
    def _recount(self) -> None:
        try:
            self.trainable = self._plan.trainable_params(self.anatomy)
            self.estimate = self._plan.memory_estimate(
                self.anatomy, batch_size=self.batch_size, seq_len=self.seq_len, weights=self.weights,
                gradient_checkpointing=self.gradient_checkpointing, pass_tokens=self.pass_tokens, frozen=self.frozen)
            self.error = None
        except PlanError as exc:
            self.estimate = None
            self.error = str(exc)

    @property
    def total_params(self) -> int:
        return self.anatomy.total_params

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total_params if self.total_params else 0.0

    @property
    def fits(self) -> bool:
        """The estimate is within FIT_FRACTION of the device's memory (True when either is unknown)."""
        if self.estimate is None or self.device_bytes is None:
            return True
        return self.estimate.total <= FIT_FRACTION * self.device_bytes

    @property
    def device_text(self) -> str:
        return f"{self.device_name}: {size_text(self.device_bytes)}" if self.device_bytes else "device memory unknown"

    @property
    def warning(self) -> str | None:
        """Why the run won't fit, and what to change; None when it fits."""
        if self.fits:
            return None
        return f"The estimate ({size_text(self.estimate.total)}) won't fit in {self.device_text}: {FIT_ADVICE}."


def _default_pass_tokens() -> int | None:
    from dataclasses import fields

    from ..core.runconfig import TrainingConfig

    return next(f.default for f in fields(TrainingConfig) if f.name == "max_pass_tokens")

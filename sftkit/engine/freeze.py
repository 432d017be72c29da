"""FreezePlan applied to a torch model: ``requires_grad`` flags or a peft ``LoraConfig``.

The plan itself (two sets of names, presets, set operations, validation, counts, the memory
estimate, the adapter-section form) is ``sftkit.core.plan.FreezePlan``, plain Python. This
``FreezePlan`` is that class plus what needs torch and peft: ``lora_config`` (``target_modules``
+ ``layers_to_transform`` when the choice is a rectangle of blocks x module kinds, exact module
names otherwise) and ``apply``. Its presets, set operations and ``from_adapter`` return this
class, so ``FreezePlan.preset(...).apply(model)`` works as before; ``FreezePlan.of(plan)``
turns a core plan into one.
"""

from __future__ import annotations

from ..core.anatomy import Anatomy, anatomy_numbers
from ..core.plan import (
    NEEDS_TOP_N,
    PRESET_MEANINGS,
    PRESETS,
    PlanError,
    PresetChoice,
    ResolvedPlan,
    adapter_config_from_plan,
)
from ..core.plan import FreezePlan as CoreFreezePlan
from .anatomy import base_model_of, inspect_model

__all__ = ["FreezePlan", "PlanError", "PRESETS", "PRESET_MEANINGS", "NEEDS_TOP_N", "PresetChoice", "ResolvedPlan",
           "Anatomy", "anatomy_numbers", "inspect_model", "base_model_of", "build_plan", "adapter_config_from_plan"]


class FreezePlan(CoreFreezePlan):
    """A ``sftkit.core.plan.FreezePlan`` that can also be applied to a model."""

    @classmethod
    def of(cls, plan: CoreFreezePlan) -> "FreezePlan":
        """The same plan as this class (a core plan gains ``apply`` and ``lora_config``)."""
        if isinstance(plan, cls):
            return plan
        return cls(lora_modules=plan.lora_modules, train_params=plan.train_params, rank=plan.rank, alpha=plan.alpha,
                   dropout=plan.dropout, label=plan.label, origin=plan.origin)

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


def build_plan(adapter, anatomy: Anatomy) -> FreezePlan:
    """The FreezePlan (applicable to a model) a config's adapter section describes."""
    return FreezePlan.from_adapter(adapter, anatomy)

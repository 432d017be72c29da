"""FreezePlan applied to a torch model: ``requires_grad`` flags or a peft ``LoraConfig``.

The plan itself (two sets of names, presets, set operations, validation, counts, the memory
estimate, the adapter-section form) is ``sftkit.core.plan.FreezePlan``, plain Python. This
``FreezePlan`` is that class plus what needs torch and peft: ``lora_config`` (``target_modules``
+ ``layers_to_transform`` when the choice is a rectangle of blocks x module kinds, exact module
names otherwise), ``peft_config`` (the peft config of any family: LoRA / DoRA / rsLoRA, IA3,
prompt tuning, prefix tuning, p-tuning, adaption prompt) and ``apply``. Its presets, set operations and ``from_adapter`` return this
class, so ``FreezePlan.preset(...).apply(model)`` works as before; ``FreezePlan.of(plan)``
turns a core plan into one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.anatomy import Anatomy, anatomy_numbers
from ..core.plan import (
    FAMILIES,
    MERGEABLE,
    NEEDS_TOP_N,
    PRESET_MEANINGS,
    PRESETS,
    PROMPT_FAMILIES,
    PlanError,
    PresetChoice,
    ResolvedPlan,
    adapter_config_from_plan,
    ia3_feedforward,
)
from ..core.plan import FreezePlan as CoreFreezePlan
from .anatomy import base_model_of, inspect_model

__all__ = ["FreezePlan", "PlanError", "PRESETS", "FAMILIES", "PROMPT_FAMILIES", "MERGEABLE",
           "PRESET_MEANINGS", "NEEDS_TOP_N", "PresetChoice", "ResolvedPlan",
           "Anatomy", "anatomy_numbers", "inspect_model", "base_model_of", "build_plan", "adapter_config_from_plan"]


class FreezePlan(CoreFreezePlan):
    """A ``sftkit.core.plan.FreezePlan`` that can also be applied to a model."""

    @classmethod
    def of(cls, plan: CoreFreezePlan) -> "FreezePlan":
        """The same plan as this class (a core plan gains ``apply`` and ``lora_config``)."""
        if isinstance(plan, cls):
            return plan
        return cls(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})

    def lora_config(self, anatomy: Anatomy):
        """The peft LoraConfig for this plan (raises if the plan has no LoRA modules)."""
        from peft import LoraConfig

        r = self.resolve(anatomy)
        if not r.lora_modules or self.family != "lora":
            raise PlanError(f"this plan is {self.kind_label}, not LoRA; use peft_config() or apply()")
        cells = {(li.block, li.column) for li in anatomy.linear.values() if li.name in self.lora_modules}
        blocks = sorted({b for b, _ in cells})
        columns = sorted({c for _, c in cells})
        rectangle = len(cells) == len(blocks) * len(columns) and all(
            (b, c) in anatomy.linear for b in blocks for c in columns)
        kwargs = dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=r.bias,
                      task_type="CAUSAL_LM", modules_to_save=list(r.modules_to_save) or None,
                      use_dora=self.use_dora, use_rslora=self.rslora)
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

    def ia3_config(self, anatomy: Anatomy):
        """peft's IA3Config for this plan: the exact module names, the down-projections as feedforward."""
        from peft import IA3Config

        r = self.resolve(anatomy)
        if self.family != "ia3" or not r.lora_modules:
            raise PlanError(f"this plan is {self.kind_label}, not IA3")
        names = sorted(r.lora_modules)
        return IA3Config(task_type="CAUSAL_LM", target_modules=names,
                         feedforward_modules=[n for n in names if ia3_feedforward(anatomy, n)],
                         modules_to_save=list(r.modules_to_save) or None,
                         fan_in_fan_out=any(anatomy.linear_by_name(n).conv1d for n in names))

    def prompt_config(self, anatomy: Anatomy, tokenizer_path: str | None = None):
        """peft's config for a prompt family. prompt_init text needs a local tokenizer folder."""
        import peft

        self.resolve(anatomy)
        common = dict(task_type="CAUSAL_LM", num_virtual_tokens=self.virtual_tokens)
        if self.family == "prompt_tuning":
            if self.prompt_init is None:
                return peft.PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
            if not tokenizer_path or not Path(tokenizer_path).is_dir():
                raise PlanError("adapter.prompt_init starts the soft prompt from text, which needs the model's "
                                f"tokenizer in a local folder (got {tokenizer_path!r}); or set it to null (random)")
            return peft.PromptTuningConfig(**common, prompt_tuning_init="TEXT", prompt_tuning_init_text=self.prompt_init,
                                           tokenizer_name_or_path=str(tokenizer_path))
        if self.family == "prefix_tuning":
            return peft.PrefixTuningConfig(**common)
        if self.family == "p_tuning":
            return peft.PromptEncoderConfig(**common, encoder_hidden_size=anatomy.hidden_size)
        if self.family == "adaption_prompt":
            return peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=self.virtual_tokens,
                                             adapter_layers=self.top_blocks)
        raise PlanError(f"this plan is {self.kind_label}, not a prompt method")

    def peft_config(self, anatomy: Anatomy, tokenizer_path: str | None = None):
        """The peft config of this plan's method (None for a plan that trains parameters in place)."""
        if self.prompt_method:
            return self.prompt_config(anatomy, tokenizer_path)
        if not self.resolve(anatomy).lora_modules:
            return None
        return self.ia3_config(anatomy) if self.family == "ia3" else self.lora_config(anatomy)

    def apply(self, model, anatomy: Anatomy | None = None, tokenizer=None):
        """Freeze the model and make the plan trainable. Returns the model to train (a
        PeftModel when the plan is a peft method). tokenizer: prompt tuning started from text
        reads its folder (default: the model's own folder)."""
        anatomy = anatomy or inspect_model(model)
        r = self.resolve(anatomy)
        if r.lora_modules or self.prompt_method:
            from peft import get_peft_model

            base = base_model_of(model)
            path = getattr(tokenizer, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
            return get_peft_model(base, self.peft_config(anatomy, path))
        wanted = set(r.full_params)
        for name, p in base_model_of(model).named_parameters():
            p.requires_grad_(name in wanted)
        return model


def build_plan(adapter, anatomy: Anatomy) -> FreezePlan:
    """The FreezePlan (applicable to a model) a config's adapter section describes."""
    return FreezePlan.from_adapter(adapter, anatomy)

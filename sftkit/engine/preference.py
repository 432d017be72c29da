"""The preference recipe (``objective: dpo`` or ``kto``): TRL's DPOTrainer / KTOTrainer inside sftkit's run.

The same steps as supervised fine-tuning (``recipes.py``): one run folder, one process, the same
callbacks (status, metrics, the finiteness guard, Stop, samples, checkpoints), the same started /
resumed / finished events and the same adapter output. What differs:

- the model: with ``adapter.init_from`` the finished run's adapter is loaded as the trained adapter
  ("default"); TRL then copies it into a second, frozen adapter ("ref") on the same base model, and the
  reference log-probs come from that copy. No second model is loaded. Without ``init_from`` a new
  adapter is made from the config's plan and the reference is its starting point (the base model).
- the rows: rendered by the run's own template (the exact prompt tokens SFT trains and generation
  sees), the chosen / rejected answers (or the completion) with their end of turn; TRL's collator cuts
  at the template's max_length, keeping the start.
- TRL's defaults that are wrong here are overridden: fp32 on CPU (bf16 only where the device policy
  says), no activation checkpointing unless the config asks, explicit max length, the run's own
  learning rate and schedule.
- metrics lines carry TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and (dpo)
  ``rewards/accuracies``; held-out pairs add the same under ``eval_``.
- at the end, warnings when the pairs are few or the run memorised its pairs (events ``warning``).
"""

from __future__ import annotations

import dataclasses
import os
import time

from ..core.errors import ConfigError
from ..core.runconfig import RunConfig, RunConfigError
from ..core.rundata import RowReport, RunRows
from ..core.runstore import RunFolder, RunWriter
from ..core.template import Template
from .callbacks import RunContext, run_callbacks
from .recipes import DataParts, ModelParts, RunResult, Setting, begin, build_model, finish, store_frozen

REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a loaded adapter


# ---- the model ----------------------------------------------------------------------------------------------
def build_preference_model(cfg: RunConfig, setting: Setting) -> ModelParts:
    """The base model with the adapter to train: ``adapter.init_from``'s (trainable, as "default"), or a
    new one from the plan. Preference runs train an adapter (the reference is then a copy of it on the
    same base model, never a second full model)."""
    from peft import PeftModel

    if cfg.adapter.init_from is None:
        parts = build_model(cfg, setting)
        if not isinstance(parts.model, PeftModel):
            raise RunConfigError(f"adapter.preset={cfg.adapter.preset!r} trains the model's own weights; a preference "
                                 "run trains an adapter (its frozen reference is then the starting adapter on the same "
                                 "base model, not a second full model); allowed: a LoRA preset, or adapter.init_from")
        return parts
    from transformers import set_seed

    from ..core.runstore import RunFolder
    from .anatomy import inspect_model
    from .models import load_model
    from .train import build_plan, keep_4bit_layers_in_train_mode

    init_cfg = cfg.init_run_config()
    set_seed(cfg.training.seed)
    model, tokenizer = load_model(cfg.model.spec, quantization=setting.quantization, device=setting.device,
                                  dtype=setting.dtype, attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    anatomy = inspect_model(model)
    plan = build_plan(init_cfg.adapter, anatomy)  # how that adapter was made (for the run's started event)
    if setting.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    adapter_dir = RunFolder(cfg.adapter.init_from).adapter_dir
    model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="default", is_trainable=True)
    if setting.quantized and setting.device == "cpu":
        keep_4bit_layers_in_train_mode(model)
    if cfg.training.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    store_frozen(model, setting)
    return ModelParts(model, tokenizer, anatomy, plan)


# ---- candidates to rate ---------------------------------------------------------------------------------------
def sample_candidates(model, tokenizer, template: Template, rows: list[dict], *, k: int = 2, temperature: float = 0.8,
                      top_p: float = 0.95, max_new_tokens: int = 32, seed: int = 0, stop=None) -> list[list[str]]:
    """``k`` sampled answers per row (the template's prompt without its few-shot examples, as the run trains
    and answers), batched with left padding. ``stop``: a threading.Event checked between tokens. The
    comparison's safeguards (``compare.py``): every stop id ends an answer (the generation config's and the
    tokenizer's end of sequence), no KV cache for prompt / p-tuning, prefix tuning decoded by full forwards a
    row at a time."""
    import copy

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from .compare import FORWARD_DECODED_TYPES, NO_CACHE_TYPES, _active_peft_type, _stop_ids, decode_by_forward

    kind = _active_peft_type(model)
    if kind in FORWARD_DECODED_TYPES:  # generate gets a prefix wrong (compare.py says why): full forwards
        stops = _stop_ids(model, tokenizer)
        out = []
        was_training = model.training
        model.eval()
        try:
            for i, row in enumerate(rows):
                generator = torch.Generator()  # decode_by_forward draws on the CPU
                generator.manual_seed(seed + i)
                ids = tokenizer(template.prompt_text(row, tokenizer, with_examples=False),
                                add_special_tokens=False).input_ids
                seqs = [decode_by_forward(model, ids, max_new_tokens, stops, temperature=temperature, top_p=top_p,
                                          generator=generator, stop_event=stop) for _ in range(k)]
                seqs = [s[:next((j for j, t in enumerate(s) if t in stops), len(s))] for s in seqs]  # up to its stop
                out.append([t.strip() for t in tokenizer.batch_decode(seqs, skip_special_tokens=True)])
        finally:
            model.train(was_training)
        return out
    tok = copy.copy(tokenizer)  # our own padding side; the caller's tokenizer is untouched
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    prompts = [template.prompt_text(r, tok, with_examples=False) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    stops = _stop_ids(model, tok)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(stop is not None and stop.is_set()), dtype=torch.bool,
                              device=input_ids.device)

    was_training = model.training
    model.eval()
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 num_return_sequences=k, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(stops) or None, use_cache=kind not in NO_CACHE_TYPES,
                                 stopping_criteria=StoppingCriteriaList([_Stop()]))
    finally:
        model.train(was_training)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    new = [seq[:next((j for j, t in enumerate(seq) if t in stops), len(seq))] for seq in new]  # up to its stop
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(len(rows))]


# ---- the rows -----------------------------------------------------------------------------------------------
def _answer_ids(tpl: Template, row: dict, answer, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer + end-of-turn ids) of ``row`` answered with ``answer``, as the template renders it."""
    ex = tpl.render({**row, tpl.answer_field: answer}, tokenizer, with_examples=False)
    p = ex.prompt_length
    return list(ex.input_ids[:p]), list(ex.input_ids[p:p + sum(ex.loss_mask)])


def preference_examples(template: Template, rows: list[dict], tokenizer, objective: str, *,
                        split: str = "train") -> tuple[list[dict], RowReport]:
    """Token ids of each row the way TRL's collators take them: ``prompt_ids`` + ``chosen_ids`` /
    ``rejected_ids`` (dpo) or ``completion_ids`` + ``label`` (kto). Rows whose prompt alone fills the
    template's max_length train nothing and are left out (and reported); longer ones are cut."""
    from ..core.data import DataError

    full = dataclasses.replace(template, max_length=1 << 20, train_on="completion")  # cut later, by the collator
    limit = template.max_length
    out: list[dict] = []
    dropped, truncated = [], []
    for i, row in enumerate(rows):
        if objective == "dpo":
            prompt, chosen = _answer_ids(full, row, row["chosen"], tokenizer)
            prompt_r, rejected = _answer_ids(full, row, row["rejected"], tokenizer)
            if prompt_r != prompt:  # the template renders the prompt apart from the answer: never differs
                raise DataError(f"{split} row {i}: the prompt renders differently with the chosen and the rejected "
                                "answer; sftkit can't tell which tokens are the answer")
            example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            longest = len(prompt) + max(len(chosen), len(rejected))
        else:
            prompt, completion = _answer_ids(full, row, row["completion"], tokenizer)
            example = {"prompt_ids": prompt, "completion_ids": completion, "label": bool(row["label"])}
            longest = len(prompt) + len(completion)
        if len(prompt) >= limit:
            dropped.append(i)
            continue
        if longest > limit:
            truncated.append(i)
        out.append(example)
    report = RowReport(split, len(rows), limit, tuple(dropped), tuple(truncated))
    if rows and not out:
        raise DataError(f"no {split} row has an answer token left: every prompt fills max_length={limit} "
                        "(training.max_length, or the template's max_length). Raise it, or shorten the prompts.")
    return out, report


def build_preference_datasets(cfg: RunConfig, rows: RunRows, tokenizer) -> DataParts:
    train, train_report = preference_examples(rows.template, rows.train, tokenizer, cfg.objective, split="train")
    reports = [train_report]
    evals = None
    if rows.eval:
        evals, eval_report = preference_examples(rows.template, rows.eval, tokenizer, cfg.objective, split="eval")
        reports.append(eval_report)
    return DataParts(train, evals or None, tuple(reports))


# ---- the trainer ----------------------------------------------------------------------------------------------
def preference_arguments(cfg: RunConfig, output_dir, *, device: str, compute_dtype: str, has_eval: bool):
    """DPOConfig / KTOConfig: every setting the supervised run would get (``build_training_arguments``, one
    source), plus the preference knobs, with TRL's CPU-unfriendly defaults overridden."""
    from transformers import TrainingArguments

    from .train import build_training_arguments

    base = build_training_arguments(cfg, output_dir, device=device, compute_dtype=compute_dtype, has_eval=has_eval)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    p = cfg.preference
    loss = p.resolved_loss(cfg.objective)
    limit = cfg.resolved_template().max_length
    common.update(
        bf16=base.bf16, fp16=base.fp16,  # TRL's default is bf16: ~100x slower on most CPUs
        activation_checkpointing=cfg.training.gradient_checkpointing,  # TRL's default is on: 30% slower
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        max_length=limit, pad_to_multiple_of=None, precompute_ref_log_probs=False, disable_dropout=True,
        beta=p.beta, model_init_kwargs=None, dataset_num_proc=None,
    )
    if cfg.objective == "dpo":
        from trl import DPOConfig

        losses = [loss] + (["sft"] if p.sft_weight > 0 else [])
        weights = [1.0] + ([p.sft_weight] if p.sft_weight > 0 else [])
        return DPOConfig(**common, loss_type=losses, loss_weights=weights, label_smoothing=p.label_smoothing,
                         truncation_mode="keep_start", padding_free=False)
    from trl import KTOConfig

    common.pop("train_sampling_strategy", None)  # KTO pairs each row with its batch neighbour: sequential order
    return KTOConfig(**common, loss_type=loss, desirable_weight=p.desirable_weight,
                     undesirable_weight=p.undesirable_weight)


def _trainer_class(objective: str):
    """TRL's trainer for the objective, taking rows sftkit already tokenized and handing each micro-step's
    loss to the run's finiteness guard (as ``GuardedTrainer`` does for supervised runs)."""
    from datasets import Dataset

    if objective == "dpo":
        from trl import DPOTrainer as Base
    else:
        from trl import KTOTrainer as Base

    class PreferenceTrainer(Base):
        loss_guard = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not (isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if objective == "kto" and self.calculate_KL:  # each completion again, after its neighbour's prompt
                size = args.per_device_train_batch_size

                def add_kl(batch):
                    ids = batch["completion_ids"]
                    return {"KL_completion_ids": [ids[-1]] + ids[:-1]}

                dataset = dataset.map(add_kl, batched=True, batch_size=size)
            return dataset

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.loss_guard is not None:
                self.loss_guard(loss)
            return loss

    return PreferenceTrainer


def build_preference_trainer(cfg: RunConfig, parts: ModelParts, data: DataParts, ctx: RunContext, setting: Setting):
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    args = preference_arguments(cfg, ctx.run.checkpoints_dir, device=setting.device,
                                compute_dtype=setting.compute_dtype, has_eval=bool(data.eval))
    guard, callbacks = run_callbacks(ctx)
    if cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.training.early_stopping_patience,
                                               cfg.training.early_stopping_threshold))
    tokenizer = parts.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = _trainer_class(cfg.objective)(
        model=parts.model, ref_model=None, args=args, train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None, processing_class=tokenizer,
        callbacks=callbacks)
    trainer.loss_guard = guard.check_loss
    return trainer


# ---- warnings -------------------------------------------------------------------------------------------------
def _warn(ctx: RunContext, step: int, messages: list[str]) -> None:
    if ctx.is_main:
        for message in messages:
            ctx.writer.event("warning", step=step, message=message)


def _final_eval(ctx: RunContext, trainer, data: DataParts) -> None:
    """The end-of-run evaluation (finish does it too; here it must happen while the reference exists)."""
    step = trainer.state.global_step
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if data.eval and not ctx.stopped and not ctx.failure and not (evals and evals[-1].get("step") == step):
        trainer.evaluate()


def _drop_reference(model) -> None:
    """The frozen copy is not part of the result: the saved adapter is the trained one alone."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)


# ---- the recipe -----------------------------------------------------------------------------------------------
def preference(cfg: RunConfig, run: RunFolder, writer: RunWriter | None, rows: RunRows, setting: Setting, *,
               resume: bool, stop_signal: dict, process_started: float) -> RunResult:
    """Preference tuning (dpo / kto) in sftkit's run: the steps of ``sft`` with TRL's trainer."""
    from ..core.preferences import preference_warnings

    if cfg.objective not in ("dpo", "kto"):
        raise ConfigError(f"objective={cfg.objective!r} is not a preference objective; allowed: dpo, kto")
    started = time.perf_counter()
    parts = build_preference_model(cfg, setting)
    data = build_preference_datasets(cfg, rows, parts.tokenizer)
    ctx = RunContext(run, writer, cfg, rows, parts.tokenizer, setting.device, world=setting.world,
                     rank=int(os.environ.get("RANK", "0")), stop_signal=stop_signal)
    trainer = build_preference_trainer(cfg, parts, data, ctx, setting)
    checkpoint = begin(ctx, parts, data, resume=resume, process_started=process_started)
    n_pairs = rows.n_rows if rows.n_rows is not None else len(rows.train) + len(rows.eval)  # max_eval_rows aside
    _warn(ctx, trainer.state.global_step, preference_warnings(n_pairs, []))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _final_eval(ctx, trainer, data)
    if ctx.is_main and not ctx.failure:
        _warn(ctx, trainer.state.global_step, preference_warnings(None, run.metrics()))
    _drop_reference(trainer.model)
    return finish(cfg, ctx, trainer, parts, data, started=started)


def trl_features(objective: str = "dpo"):
    """The ``datasets.Features`` of ``export_trl``'s file (every content a string, the label a bool)."""
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    if objective == "dpo":
        return Features({"prompt": message, "chosen": message, "rejected": message})
    return Features({"prompt": message, "completion": message, "label": Value("bool")})

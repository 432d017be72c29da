"""Training recipes: small explicit steps, each with a typed result, composed per objective.

    build_model      the base model (4-bit where the policy says), its anatomy, the plan applied
    build_datasets   rows rendered to ids + labels, with what rendering found (dropped, cut rows)
    build_trainer    TrainingArguments, collator, the run's callbacks, the guarded Trainer
    begin            resume point, the started/resumed events, row reports, stale Stop cleared
    finish           final eval, the adapter saved, last samples, the final status

``sft`` composes them for supervised fine-tuning. Another objective (preference tuning) is a
second recipe reusing the steps it shares, registered in RECIPES.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..core.runconfig import RunConfig
from ..core.rundata import RowReport, RunRows, render_rows
from ..core.runproto import RunState
from ..core.runstore import RunFolder, RunStateError, RunWriter
from .callbacks import RunContext, generate_samples, run_callbacks
from .precision import frozen_dtype_of


@dataclass(frozen=True)
class RunResult:
    state: str
    message: str
    run: RunFolder


@dataclass(frozen=True)
class ModelParts:
    model: object  # the peft-wrapped (or partly unfrozen) model
    tokenizer: object
    anatomy: object
    plan: object


@dataclass(frozen=True)
class DataParts:
    train: list[dict]
    eval: list[dict] | None
    reports: tuple[RowReport, ...]


@dataclass(frozen=True)
class Setting:
    """Where the run trains: the device policy, decided once by the run process (``run_training``)
    and passed to every step; the model is loaded with these values, not decided again."""

    device: str
    compute_dtype: str
    quantization: str
    dtype: str
    world: int = 1
    frozen_dtype: str | None = None  # the frozen weights' storage and matmul dtype (None: ``dtype``)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def build_model(cfg: RunConfig, setting: Setting) -> ModelParts:
    from transformers import set_seed

    from .anatomy import inspect_model
    from .models import load_model
    from .train import build_plan, keep_4bit_layers_in_train_mode

    set_seed(cfg.training.seed)  # adapter initialisation too: the same seed gives the same run
    model, tokenizer = load_model(cfg.model.spec, quantization=setting.quantization, device=setting.device,
                                  dtype=setting.dtype, attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False  # packed batches stay apart only without a KV cache
    anatomy = inspect_model(model)
    plan = build_plan(cfg.adapter, anatomy)
    if setting.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    model = plan.apply(model, anatomy, tokenizer=tokenizer)  # prompt tuning started from text reads its folder
    if setting.quantized and setting.device == "cpu":
        keep_4bit_layers_in_train_mode(model)
    if cfg.training.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    check_trainable(model, plan, anatomy)
    store_frozen(model, setting, plan)
    return ModelParts(model, tokenizer, anatomy, plan)


def store_frozen(model, setting: Setting, plan=None) -> int:
    """The setting's frozen-weight dtype applied once the plan has set what trains (engine/precision.py).
    Only for adapter plans: a plan that trains weights in place saves the whole model, whose frozen
    weights must leave the run as they came in (fp32), so those runs stay fp32."""
    if not setting.frozen_dtype or setting.frozen_dtype == setting.dtype or setting.quantized:
        return 0
    if plan is not None and plan.method != "lora":
        return 0
    from .precision import store_frozen_in

    return store_frozen_in(model, setting.frozen_dtype, activations=setting.dtype)


def check_trainable(model, plan, anatomy) -> int:
    """The parameters with requires_grad are exactly as many as the plan says (every method's count, in
    the picker, the started event and the shoot-out table, is the one that trains); a mismatch stops
    the run before it trains."""
    from ..core.plan import PlanError

    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    said = plan.trainable_params(anatomy)
    if counted != said:
        raise PlanError(f"the plan ({plan.label}, {plan.kind_label}) says {said:,} parameters train, but the model "
                        f"has {counted:,} with requires_grad; this method/model pair is not supported")
    return counted


def build_datasets(rows: RunRows, tokenizer) -> DataParts:
    train, train_report = render_rows(rows.template, rows.train, tokenizer, split="train")
    reports = [train_report]
    evals = None
    if rows.eval:
        evals, eval_report = render_rows(rows.template, rows.eval, tokenizer, split="eval")
        reports.append(eval_report)
    return DataParts(train, evals or None, tuple(reports))


@dataclass(frozen=True)
class Batching:
    """How batches are made and the loss computed, decided once from the config, the model and the rows."""

    packing: bool
    padding_share: float  # of padded batches of these rows (what packing saves)
    why: str
    fast_loss: bool  # the head and the loss only at trained positions
    loss_why: str
    max_pass_tokens: int | None
    packed_attention: bool  # each packed row's attention on its own block

    def to_event(self) -> dict:
        return {"packing": self.packing, "padding_share": round(self.padding_share, 4), "message": self.why,
                "fast_loss": self.fast_loss, "loss": self.loss_why, "max_pass_tokens": self.max_pass_tokens,
                "packed_attention": self.packed_attention}


def choose_batching(cfg: RunConfig, parts: ModelParts, data: DataParts, setting: Setting) -> Batching:
    """``training.packing`` (auto: packing when padded batches of these rows would be mostly padding),
    the loss on trained positions where the model allows it, passes of ``training.max_pass_tokens``
    (one process only: several processes would synchronise gradients after every pass)."""
    from .fast import choose_packing, supports_trained_positions_loss, use_packed_attention

    t = cfg.training
    lengths = [len(r["input_ids"]) for r in data.train]
    fast, why_not = supports_trained_positions_loss(parts.model)
    from ..core.plan import PROMPT_FAMILIES

    setting_value = {"on": True, "off": False}.get(t.packing, "auto")
    prompt_method = cfg.adapter.preset in PROMPT_FAMILIES or (not fast and why_not.startswith("prompt-learning"))
    if setting_value == "auto" and prompt_method:
        setting_value = False  # virtual tokens / adapter prompts belong to every row: never packed
    packing, share, why = choose_packing(setting_value, lengths, t.batch_size)
    if setting_value is False and t.packing == "auto":
        why = f"packing: off (auto): adapter.preset {cfg.adapter.preset} adds a prompt to every row"
    attention = use_packed_attention(parts.model) if packing else False
    loss_why = ("the head and the loss at the trained positions only" if fast
                else f"the model's own loss on every position ({why_not})")
    passes = t.max_pass_tokens if fast and setting.world == 1 else None
    return Batching(packing, share, why, fast, loss_why, passes, attention)


def build_trainer(cfg: RunConfig, parts: ModelParts, data: DataParts, ctx: RunContext, setting: Setting,
                  batching: Batching | None = None):
    from transformers import EarlyStoppingCallback

    from .train import GuardedTrainer, build_collator, build_training_arguments

    batching = batching or choose_batching(cfg, parts, data, setting)
    args = build_training_arguments(cfg, ctx.run.checkpoints_dir, device=setting.device,
                                    compute_dtype=setting.compute_dtype, has_eval=bool(data.eval),
                                    packed=batching.packing)
    guard, callbacks = run_callbacks(ctx)
    if cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.training.early_stopping_patience,
                                               cfg.training.early_stopping_threshold))
    trainer = GuardedTrainer(model=parts.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                             data_collator=build_collator(parts.tokenizer, batching.packing),
                             processing_class=parts.tokenizer, callbacks=callbacks)
    trainer.loss_guard = guard.check_loss
    trainer.fast_loss, trainer.max_pass_tokens = batching.fast_loss, batching.max_pass_tokens
    trainer.saved_dtype = frozen_dtype_of(parts.model)  # bf16 frozen weights: backward keeps bf16 activations too
    trainer.batching = batching
    return trainer


def begin(ctx: RunContext, parts: ModelParts, data: DataParts, *, resume: bool, process_started: float):
    """The checkpoint to resume from (None for a new run); the run's first events."""
    run, writer = ctx.run, ctx.writer
    checkpoint = None
    if resume:
        checkpoint = run.last_checkpoint()
        if checkpoint is None:
            raise RunStateError(f"run {run.name} has no complete checkpoint to resume from")
        step = int(checkpoint.name.split("-")[1])
        if ctx.is_main:
            run.truncate_metrics(step)
            frozen = frozen_dtype_of(parts.model)
            attempts = [e for e in run.events() if e.get("event") in ("started", "resumed") and "frozen_dtype" in e]
            before = attempts[-1]["frozen_dtype"] if attempts else frozen  # the attempt this one continues
            writer.event("resumed", step=step, checkpoint=str(checkpoint.relative_to(run.path)),
                         attempt=writer.current.attempt, frozen_dtype=frozen)
            if before != frozen:  # e.g. resumed on a CPU without native bf16: the curve goes on in another precision
                writer.event("warning", message=f"the frozen weights are now {frozen or 'in the run dtype'} where the "
                             f"run started with {before or 'the run dtype'} (this machine's precision policy); the "
                             "loss curve goes on in the other precision")
    elif ctx.is_main:
        writer.event("started", pid=os.getpid(), world_size=ctx.world, device=ctx.device,
                     train_rows=len(data.train), eval_rows=len(data.eval or []), plan=parts.plan.label,
                     trainable=parts.plan.trainable_params(parts.anatomy), frozen_dtype=frozen_dtype_of(parts.model))
    if ctx.is_main:
        for report in data.reports:
            if report.dropped:
                writer.event("rows_dropped", **report.to_dict(), message=report.lines()[0])
            if report.truncated or report.end_cut:
                writer.event("truncated", **report.to_dict(), message="; ".join(report.lines()))
        run.clear_stop(older_than=process_started)  # a Stop from an earlier session, not one made while loading
    return checkpoint


def _final_message(cfg: RunConfig, ctx: RunContext, trainer, step: int, final_eval) -> str:
    if ctx.stopped:
        return f"stopped at step {step}; adapter saved"
    message = f"finished {step} steps" + (f", eval loss {final_eval:.4f}" if final_eval is not None else "")
    t = cfg.training
    if t.early_stopping_patience and step < trainer.state.max_steps:
        message = (f"early stopping at step {step} of {trainer.state.max_steps}: eval loss did not improve by "
                   f"more than {t.early_stopping_threshold} for {t.early_stopping_patience} evaluation(s)")
    best = trainer.state.best_model_checkpoint
    if best and t.early_stopping_patience:
        message += f"; the adapter is the best checkpoint ({Path(best).name}, eval loss {trainer.state.best_metric:.4f})"
    return message


def finish(cfg: RunConfig, ctx: RunContext, trainer, parts: ModelParts, data: DataParts, *,
           started: float) -> RunResult:
    """The final state: failed (nothing saved), or the adapter saved and finished / stopped."""
    from .train import save_output

    run, writer, step = ctx.run, ctx.writer, trainer.state.global_step
    ended, seconds = datetime.now().isoformat(timespec="seconds"), time.perf_counter() - started
    if ctx.failure:
        if ctx.is_main:
            writer.status(RunState.FAILED, step=step, message=ctx.failure, ended_at=ended, seconds=seconds)
            writer.event("failed", step=step, message=ctx.failure)
        return RunResult("failed", ctx.failure, run)
    final_eval = None
    # decided from the trainer's own log (the same on every rank: they all evaluate, or none does)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1].get("step") == step:
        final_eval = evals[-1]["eval_loss"]
    elif data.eval and not ctx.stopped:
        final_eval = trainer.evaluate().get("eval_loss")
    state = RunState.STOPPED if ctx.stopped else RunState.FINISHED
    if not ctx.is_main:
        return RunResult(state.value, "", run)
    writer.status(RunState.STOPPING if ctx.stopped else RunState.RUNNING, step=step, message="saving the adapter")
    target = save_output(trainer, parts.tokenizer, run, parts.plan)
    if ctx.rows.samples and not ctx.stopped and ctx.sampled_at != step:
        generate_samples(ctx, trainer.model, step)
    message = _final_message(cfg, ctx, trainer, step, final_eval)
    writer.status(state, step=step, message=message, ended_at=ended, seconds=seconds,
                  output=str(target.relative_to(run.path)))
    writer.event(state.value, step=step, seconds=seconds, eval_loss=final_eval)
    return RunResult(state.value, message, run)


def sft(cfg: RunConfig, run: RunFolder, writer: RunWriter | None, rows: RunRows, setting: Setting, *,
        resume: bool, stop_signal: dict, process_started: float) -> RunResult:
    """Supervised fine-tuning: completion-only loss on the template's trained tokens."""
    started = time.perf_counter()
    parts = build_model(cfg, setting)
    data = build_datasets(rows, parts.tokenizer)
    ctx = RunContext(run, writer, cfg, rows, parts.tokenizer, setting.device, world=setting.world,
                     rank=int(os.environ.get("RANK", "0")), stop_signal=stop_signal)
    trainer = build_trainer(cfg, parts, data, ctx, setting)
    checkpoint = begin(ctx, parts, data, resume=resume, process_started=process_started)
    if ctx.is_main:
        writer.event("batching", **trainer.batching.to_event())
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return finish(cfg, ctx, trainer, parts, data, started=started)


def preference(*args, **kwargs) -> RunResult:
    """Preference tuning (objective dpo / kto) through TRL: ``sftkit.engine.preference`` (imported on use)."""
    from .preference import preference as recipe

    return recipe(*args, **kwargs)


RECIPES: dict[str, Callable[..., RunResult]] = {"sft": sft, "dpo": preference, "kto": preference}

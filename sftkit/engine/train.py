"""The training job: one RunConfig, one run folder, one process.

``run_training`` is what ``sftkit train`` (and therefore the notebook launcher, and
``accelerate launch``) runs: it opens the run folder, decides the device policy once, locks the
device, and hands over to a recipe (``recipes.py``: small steps composed per objective) whose
callbacks (``callbacks.py``, one job each) write what a view needs into the run folder. The
``build_*`` functions here turn config sections into library objects. Stop is a file in the run
folder (or SIGTERM), honoured at the next step boundary by every process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
import traceback
from datetime import datetime
from pathlib import Path

from transformers import Trainer

from ..core.errors import ConfigError
from ..core.faults import fault_point
from ..core.runconfig import AdapterConfig, RunConfig
from ..core.rundata import render_rows, run_rows
from ..core.runopen import OpenRun, open_run
from ..core.runproto import ProcessId, RunState
from ..core.runstore import DeviceLock, RunFolder, RunStateError, RunWriter
from ..core.template import Template
from .recipes import RunResult

OOM_ADVICE = ("lower training.batch_size (raise training.grad_accum to keep the effective batch), "
              "lower training.max_length, turn on training.gradient_checkpointing, or load the model "
              "in 4-bit (model.quantization: 4bit)")


# ---- builders: config -> library objects ------------------------------------------------------
def build_plan(adapter: AdapterConfig, anatomy):
    """The FreezePlan a config's adapter section describes (names checked against the model);
    ``FreezePlan.from_adapter`` of ``sftkit.engine.freeze``, which can be applied to the model."""
    from .freeze import FreezePlan

    return FreezePlan.from_adapter(adapter, anatomy)


def adapter_config_from_plan(plan, anatomy) -> AdapterConfig:
    """A FreezePlan as the adapter section: the preset it started from plus additions/removals
    (``plan.to_adapter``, in ``sftkit.core.plan``)."""
    return plan.to_adapter(anatomy)


def build_examples(template: Template, rows: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels (-100 where the template's mask says "not trained"); rows that
    train nothing are left out (``render_rows`` also reports them)."""
    return render_rows(template, rows, tokenizer)[0]


def build_collator(tokenizer, packing: bool):
    """Packing: padding-free batches, sequences kept apart by position_ids. Otherwise pad per batch."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def _checkpointing_args(cls, on: bool) -> dict:
    """Activation (gradient) checkpointing under the name this transformers version uses."""
    import dataclasses

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing" for f in dataclasses.fields(cls)) \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def build_training_arguments(cfg: RunConfig, output_dir: str | Path, *, device: str, compute_dtype: str,
                             has_eval: bool, packed: bool = False):
    from transformers import TrainingArguments

    t = cfg.training
    early = t.early_stopping_patience > 0
    # length-grouped batches: a sampling strategy in newer transformers, a flag in older ones
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names
                else {"group_by_length": True}) if t.group_by_length else {}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule,
        warmup_steps=t.warmup,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_every,
        logging_nan_inf_filter=False,  # a NaN must reach the recorder, not be averaged away
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every or None,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=None,  # the recorder rotates, after the new checkpoint is marked complete
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=t.seed,
        data_seed=t.seed,
        **_checkpointing_args(TrainingArguments, t.gradient_checkpointing),
        **grouping,
        bf16=device == "cuda" and compute_dtype == "bfloat16",
        fp16=device == "cuda" and compute_dtype == "float16",
        use_cpu=device == "cpu",
        optim="adamw_torch",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="all" if packed else "non_padding",  # packed batches have no padding
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


class GuardedTrainer(Trainer):
    """``transformers.Trainer`` that hands every micro-step's loss to a guard, so a non-finite loss
    is seen at the step it happens, not at the next logging step.

    fast_loss: the head and the loss only at trained positions (``fast.trained_positions_loss``, equal
    to the model's own loss). max_pass_tokens: with the fast loss, a batch runs as passes of at most
    this many tokens (``fast.split_batch``): the same gradient, the activations of one pass."""

    loss_guard = None
    fast_loss = False
    max_pass_tokens: int | None = None
    saved_dtype: str | None = None  # what backward keeps is stored in this dtype (engine/precision.saved_in)

    def training_step(self, model, inputs, num_items_in_batch=None):
        from .fast import split_batch

        passes = split_batch(inputs, self.max_pass_tokens) if self.fast_loss else [inputs]
        if len(passes) == 1:
            loss = self._one_pass(model, inputs, num_items_in_batch)
        else:
            if num_items_in_batch is None:  # each pass's loss is a share of the whole batch's mean
                num_items_in_batch = int((inputs["labels"][:, 1:] != -100).sum())
            loss = sum(self._one_pass(model, part, num_items_in_batch) for part in passes)
        if self.loss_guard is not None:
            self.loss_guard(loss)
        return loss

    def _one_pass(self, model, inputs, num_items_in_batch):
        """Forward and backward of one pass, its saved activations in ``saved_dtype`` when set."""
        if not self.saved_dtype:
            return super().training_step(model, inputs, num_items_in_batch)
        from .precision import saved_in

        with saved_in(model, self.saved_dtype):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.fast_loss or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from .fast import trained_positions_loss

        loss = trained_positions_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer scales the model's own loss
        return loss


# ---- pieces the recipes use -------------------------------------------------------------------
def keep_4bit_layers_in_train_mode(model) -> int:
    """bitsandbytes repacks a 4-bit weight into an inference-only layout the first time a
    CPU with AVX512-BF16 runs it in eval mode without grad; training after that has no
    backward through it. Eval and sample generation inside a run must not trigger that, so
    the 4-bit layers (which have no train/eval behaviour of their own) stay in train mode."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train = (lambda self_mode=True, _m=module: _m)  # noqa: E731 - ignore eval()
            module.training = True
            n += 1
    return n


# ---- the job ---------------------------------------------------------------------------------------
def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _share_run_folder(cfg: RunConfig, run: RunFolder | None, setting) -> RunFolder:
    """With several processes, rank 0's folder is everyone's (sent over the process group, which
    the Trainer's arguments set up)."""
    if setting.world == 1:
        return run
    import torch.distributed as dist
    from transformers import TrainingArguments

    # minimal arguments: joining the process group must not depend on the run's own settings
    _ = TrainingArguments(output_dir=str(run.path if run is not None else "."), use_cpu=setting.device == "cpu",
                          report_to="none").device
    box = [str(run.path) if run is not None else None]
    dist.broadcast_object_list(box, src=0)
    return RunFolder(box[0])


def save_output(trainer, tokenizer, run: RunFolder, plan) -> Path:
    """adapter/ (LoRA) or model/ (a plan that trains parameters directly), swapped in whole:
    written to a temporary folder, the old one renamed aside, the new one renamed in."""
    target = run.adapter_dir if plan.method == "lora" else run.path / "model"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.model
    from .fast import restore_attention

    restore_attention(model)  # a saved config names sdpa, which loads anywhere
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    fault_point("adapter_tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _lock_devices(device: str, world: int, local_rank: int, run: RunFolder) -> DeviceLock | None:
    """The device this process trains on, locked for its life. CPU processes of one run share
    the CPU: the local rank 0 process holds its lock for all of them."""
    if device == "cuda":
        key = f"cuda:{local_rank if world > 1 else 0}"
    elif local_rank == 0:
        key = "cpu"
    else:
        return None
    lock = DeviceLock(key)
    lock.acquire(run)
    return lock


def run_training(cfg: RunConfig, run: RunFolder | None = None, *, resume: bool = False,
                 allow_changed_data: bool = False, max_steps: int | None = None,
                 opened: OpenRun | None = None) -> RunResult:
    """Train ``cfg`` into ``run`` (a fresh folder from the config's store when None).

    resume: continue ``run`` from its last complete checkpoint.
    opened: the run already opened by this process (``sftkit train`` opens it before importing
    the training stack).
    Returns the final state; every outcome is also in the run folder. A refusal to open the run
    (another process writes it, a live run, changed data on resume) raises before anything is
    written to it.
    """
    world, rank, local_rank = _dist()
    is_main = rank == 0
    if is_main and opened is None:
        opened = open_run(cfg, run, resume=resume, allow_changed_data=allow_changed_data, max_steps=max_steps)
    if opened is not None:
        run, cfg = opened.run, opened.cfg
    elif max_steps is not None:  # the other ranks apply the same change rank 0 saved
        cfg = cfg.with_changes(training={"max_steps": max_steps})
    writer = opened.writer if opened is not None else None
    lock: DeviceLock | None = None
    stop_signal = {"set": False}

    def on_signal(signum, frame):
        stop_signal["set"] = True

    try:
        from .models import plan_load

        plan_words = plan_load(cfg.model.quantization, cfg.model.device, cfg.model.dtype,
                               cfg.model.attn_implementation)
        device = plan_words.device
        lock = _lock_devices(device, world, local_rank, run or RunFolder("."))
        if writer is not None:
            writer.status(RunState.PENDING, world_size=world, device=device, plan=plan_words.describe(),
                          message="loading the model")
        if _in_main_thread():
            signal.signal(signal.SIGTERM, on_signal)
        from .recipes import RECIPES, Setting

        setting = Setting(device, plan_words.compute_dtype, plan_words.quantization, plan_words.dtype, world,
                          frozen_dtype=plan_words.frozen_dtype)
        run = _share_run_folder(cfg, run, setting)
        return RECIPES[cfg.objective](cfg, run, writer, opened.rows if opened is not None else run_rows(cfg), setting,
                              resume=resume, stop_signal=stop_signal, process_started=ProcessId.current().start or time.time())
    except Exception as exc:  # every failure ends as a state with a message in the run folder
        message = _failure_message(exc)
        if writer is not None:
            _record_failure(run, writer, message)
        if isinstance(exc, (ConfigError, RunStateError)) or _is_oom(exc):
            return RunResult("failed", message, run)
        raise
    finally:
        if lock is not None:
            lock.release()
        if opened is not None:
            opened.close()


def _record_failure(run: RunFolder, writer: RunWriter, message: str) -> None:
    """The run ends as failed with ``message`` (unless it already ended: then only the log says so).
    A failure to record (a full disk) must not hide the error being recorded."""
    try:
        with open(run.log_path, "a", encoding="utf-8") as fh:
            fh.write(traceback.format_exc())
        if writer.current.state is None or writer.current.state.active:
            writer.status(RunState.FAILED, message=message, ended_at=datetime.now().isoformat(timespec="seconds"))
            writer.event("failed", message=message)
    except Exception:  # noqa: BLE001 - the original error is re-raised or returned by the caller
        pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        return False


def _failure_message(exc: BaseException) -> str:
    if _is_oom(exc):
        return f"out of GPU memory ({str(exc).splitlines()[0][:200]}). To fit: {OOM_ADVICE}."
    return f"{type(exc).__name__}: {exc}"

"""The training job: one RunConfig, one run folder, one process.

``run_training`` is what ``sftkit train`` (and therefore the notebook launcher, and
``accelerate launch``) runs. It builds the library objects from the config with explicit
``build_*`` functions, trains with ``transformers.Trainer`` (peft adapters, bitsandbytes
4-bit where the policy says so), and a ``RunRecorder`` callback writes everything a view
needs into the run folder: metrics, events, samples, status with a heartbeat. Stop is a
file in the run folder (or SIGTERM), honoured at the next step boundary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..core.atomic import write_text_atomic
from ..core.errors import ConfigError
from ..core.faults import fault_point, fault_raise
from ..core.rundata import RunRows, render_rows, run_rows
from ..core.runconfig import AdapterConfig, RunConfig, RunConfigError
from ..core.runopen import OpenRun, open_run
from ..core.runproto import RunState
from ..core.runstore import CHECKPOINT_MARKER, DeviceLock, RunFolder, RunStateError, RunWriter
from ..core.template import Template, as_text

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
                             has_eval: bool):
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
        include_num_input_tokens_seen="all" if t.packing else "non_padding",  # packed batches have no padding
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


class GuardedTrainer(Trainer):
    """``transformers.Trainer`` that hands every micro-step's loss to a guard, so a non-finite loss
    is seen at the step it happens, not at the next logging step."""

    loss_guard = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_guard is not None:
            self.loss_guard(loss)
        return loss


# ---- the recorder ------------------------------------------------------------------------------
def _memory_bytes(device: str) -> tuple[str, int]:
    if device == "cuda":
        import torch

        return "cuda_peak", int(torch.cuda.max_memory_allocated())
    import psutil

    return "rss", int(psutil.Process().memory_info().rss)


def _finite(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


def _all_finite(tensors) -> bool:
    """Whether every value of many tensors is finite, with one norm kernel and one sync where the
    tensors allow it (a finite fp32 norm means finite values; fp16 ones are checked value by value,
    since their norm overflows long before their values do)."""
    import torch

    ts = [t.detach() for t in tensors if t is not None]
    if not ts:
        return True
    wide = [t for t in ts if t.dtype in (torch.float32, torch.float64, torch.bfloat16)]
    narrow = [t for t in ts if t.dtype not in (torch.float32, torch.float64, torch.bfloat16)]
    ok = True
    if wide:
        try:
            norms = torch._foreach_norm(wide)
            ok = bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())
        except (RuntimeError, TypeError, AttributeError):
            ok = all(bool(torch.isfinite(t).all()) for t in wide)
    return ok and all(bool(torch.isfinite(t).all()) for t in narrow)


def _keep_4bit_layers_in_train_mode(model) -> int:
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


def _checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def rotate_checkpoints(run: RunFolder, keep: int, *, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (and ``protect``, e.g. the best one),
    plus incomplete ones older than the newest complete one. A folder loses its completion marker
    before anything else, so a kill mid-delete never leaves a marked, half-deleted checkpoint."""
    complete = run.checkpoints()
    if not complete:
        return []
    newest = complete[-1][0]
    keep_paths = {p.resolve() for _, p in complete[-keep:]} | {Path(p).resolve() for p in protect}
    doomed = [p for _, p in complete if p.resolve() not in keep_paths]
    for p in run.checkpoints_dir.iterdir():  # left by a kill mid-save: never loadable, never resumed from
        step = _checkpoint_step(p)
        if step is not None and step < newest and p.is_dir() and not (p / CHECKPOINT_MARKER).exists():
            doomed.append(p)
    for p in doomed:
        (p / CHECKPOINT_MARKER).unlink(missing_ok=True)
        fault_point("rotation_unmarked", _checkpoint_step(p))
        files = sorted(p.iterdir())
        for f in files[: len(files) // 2]:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        fault_point("rotation_partial", _checkpoint_step(p))
        shutil.rmtree(p, ignore_errors=True)
    return doomed


class RunRecorder(TrainerCallback):
    """Trainer callback that writes the run folder through its RunWriter; honours Stop (agreed
    across processes every step), checks every update for non-finite values, marks checkpoints
    complete and rotates them."""

    def __init__(self, run: RunFolder, writer: RunWriter | None, rows: RunRows, tokenizer, cfg: RunConfig,
                 device: str, *, world: int = 1, stop_signal: dict | None = None):
        self.run, self.writer, self.rows, self.tokenizer, self.cfg, self.device = \
            run, writer, rows, tokenizer, cfg, device
        self.is_main = writer is not None
        self.world = world
        self.failure: str | None = None
        self.stopped = False
        self._bad: str | None = None  # what went non-finite in this step (set before the step ends)
        self._last_time = None
        self._last_tokens = 0
        self._last_step = 0
        self._nan_step = int(os.environ.get("SFTKIT_FAULT_NAN_AT_STEP", "0") or 0)  # fault injection for tests
        # fault injection: only this rank sees a Stop at this step ("RANK@STEP"); the ranks must agree
        rank, _, at = os.environ.get("SFTKIT_FAULT_STOP_RANK", "").partition("@")
        self._lone_stop = (int(rank), int(at)) if at else None
        self._rank = int(os.environ.get("RANK", "0"))
        self.stop_signal = stop_signal if stop_signal is not None else {}
        self.sampled_at: int | None = None
        self._trainable: list | None = None
        self._last_status = 0.0

    # Trainer hooks
    def on_train_begin(self, args, state, control, model=None, **kw):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self._last_step = state.global_step
        if model is not None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        if self.is_main:
            self.writer.status(RunState.RUNNING, step=state.global_step, max_steps=state.max_steps,
                               message="training")

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self._nan_step and state.global_step + 1 == self._nan_step and model is not None:
            import torch

            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
                        break

    def check_loss(self, loss) -> None:
        """Called by the trainer with every micro-step's loss (a NaN between logging steps is seen)."""
        import torch

        if self._bad is None and loss is not None and not bool(torch.isfinite(loss).all()):
            self._bad = "the loss"

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if args.fp16:
            return  # a loss scaler's overflow skips the step and lowers the scale: not a failure
        if self._bad is None and self._trainable and not _all_finite(p.grad for p in self._trainable):
            self._bad = "the gradient"

    def on_optimizer_step(self, args, state, control, **kw):
        if self._bad is None and self._trainable and not _all_finite(self._trainable):
            self._bad = "a trained weight"

    def _fail(self, what: str, step: int, control) -> None:
        if self.failure is None:
            last = self.run.last_checkpoint()
            self.failure = (f"{what} became non-finite (NaN or inf) at step {step}; training stopped and nothing "
                            f"from this step was saved. Last good checkpoint: "
                            f"{last.relative_to(self.run.path) if last else 'none yet'}. "
                            "Try a lower training.learning_rate, training.max_grad_norm: 1.0, or fp32 weights.")
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        logs = dict(logs or {})
        if "train_loss" in logs:  # the end-of-training summary
            if self.is_main:
                self.writer.event("train_summary", **{k: v for k, v in logs.items() if _finite(v)})
            return
        step = state.global_step
        record: dict = {"step": step, "epoch": round(float(state.epoch or 0), 4), "time": time.time()}
        if "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
            self._last_time = time.perf_counter()  # eval time is not training time
        if "loss" in logs:
            now = time.perf_counter()
            dt = max(now - (self._last_time or now), 1e-9)
            dsteps = max(step - self._last_step, 1)
            record.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                          tokens_per_s=(state.num_input_tokens_seen - self._last_tokens) / dt,
                          steps_per_s=dsteps / dt, tokens_seen=state.num_input_tokens_seen)
            kind, value = _memory_bytes(self.device)
            record[f"memory_{kind}"] = value
            self._last_time, self._last_tokens, self._last_step = now, state.num_input_tokens_seen, step
        bad = [k for k in ("loss", "grad_norm", "eval_loss") if k in record and not _finite(record[k])]
        if bad:
            self._fail(bad[0].replace("_", " "), step, control)
        if self.is_main:
            self.writer.metric(record)
            if "eval_loss" in record:
                self.writer.event("eval", step=step, eval_loss=record["eval_loss"])

    def _agree(self, stop: bool, bad: bool) -> tuple[bool, bool]:
        """Every process leaves the loop at the same step: Stop and failures are or-ed across ranks."""
        if self.world <= 1:
            return stop, bad
        import torch
        import torch.distributed as dist

        device = f"cuda:{torch.cuda.current_device()}" if self.device == "cuda" else "cpu"
        flags = torch.tensor([float(stop), float(bad)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        stop = self.run.stop_requested() or bool(self.stop_signal.get("set")) or \
            self._lone_stop == (self._rank, step)
        stop, bad = self._agree(stop, self._bad is not None)
        if bad:
            self._fail(self._bad or "a value on another process", step, control)
        self._bad = None
        if stop:
            control.should_training_stop = True
            self.stopped = True
        every = self.cfg.training.sample_every
        if self.is_main and every and step % every == 0 and not self.failure and model is not None:
            self.generate_samples(model, step)
        now = time.monotonic()
        if self.is_main and (self.stopped or now - self._last_status >= 1.0):
            self.writer.status(RunState.STOPPING if self.stopped else RunState.RUNNING, step=step,
                               max_steps=state.max_steps)
            self._last_status = now

    def on_save(self, args, state, control, **kw):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.world > 1:  # every rank has written its part (its RNG state) before rank 0 marks it
            import torch.distributed as dist

            dist.barrier()
        if not self.is_main or not folder.is_dir() or self.failure:
            return
        fault_point("checkpoint_saved", state.global_step)
        write_text_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": state.global_step, "time": time.time()}))
        fault_point("checkpoint_marked", state.global_step)
        best = state.best_model_checkpoint
        rotate_checkpoints(self.run, self.cfg.training.keep_checkpoints,
                           protect=(Path(best),) if best else ())
        self.writer.event("checkpoint", step=state.global_step, path=str(folder.relative_to(self.run.path)))

    # samples
    def generate_samples(self, model, step: int) -> None:
        """Generate from the held-out prompts; a failure is an event, never the end of the run."""
        import torch

        from .generate import generate_text

        if not self.rows.samples:
            return
        was_training = model.training
        started = time.perf_counter()
        model.eval()
        try:
            with torch.no_grad():
                fault_raise("sample")
                for i, row in enumerate(self.rows.samples):
                    prompt = self.rows.template.prompt_text(row, self.tokenizer, with_examples=False)
                    ans = generate_text(model, self.tokenizer, prompt,
                                        max_new_tokens=self.cfg.training.sample_max_new_tokens)
                    self.writer.sample({"step": step, "index": i, "prompt": self.rows.template.user_text(row),
                                        "target": as_text(row.get(self.rows.template.answer_field)),
                                        "output": ans.text, "seconds": round(ans.seconds, 3)})
        except Exception as exc:  # noqa: BLE001 - samples are a view; training goes on
            self.sampled_at = step  # tried at this step: not again at the end
            self.writer.event("sample_failed", step=step, message=f"{type(exc).__name__}: {exc}"[:500])
            with open(self.run.log_path, "a", encoding="utf-8") as fh:
                fh.write(traceback.format_exc())
            return
        finally:
            model.train(was_training)
            if self._last_time is not None:
                self._last_time += time.perf_counter() - started  # generation time is not training time
        self.sampled_at = step
        self.writer.event("sample", step=step, n=len(self.rows.samples))


# ---- the job ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    state: str
    message: str
    run: RunFolder


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _share_run_folder(run: RunFolder | None, world: int) -> RunFolder:
    """With several processes, rank 0's folder is everyone's."""
    if world == 1:
        return run
    import torch.distributed as dist

    box = [str(run.path) if run is not None else None]
    dist.broadcast_object_list(box, src=0)
    return RunFolder(box[0])


def _save_output(trainer, tokenizer, run: RunFolder, plan) -> Path:
    """adapter/ (LoRA) or model/ (a plan that trains parameters directly), swapped in whole:
    written to a temporary folder, the old one renamed aside, the new one renamed in."""
    target = run.adapter_dir if plan.method == "lora" else run.path / "model"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.model
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
        return _train(cfg, run, writer, opened.rows if opened is not None else None, resume=resume, world=world,
                      device=device, compute_dtype=plan_words.compute_dtype,
                      quantized=plan_words.quantization != "none", stop_signal=stop_signal)
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


def _process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or restricted: fall back to now
        return time.time()


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


def _train(cfg: RunConfig, run: RunFolder | None, writer: RunWriter | None, rows: RunRows | None, *,
           resume: bool, world: int, device: str, compute_dtype: str, quantized: bool,
           stop_signal: dict) -> RunResult:
    started = time.perf_counter()
    process_started = _process_start_time()
    is_main = writer is not None
    if rows is None:
        rows = run_rows(cfg)  # errors here name the row/field, before the model loads

    from transformers import EarlyStoppingCallback, set_seed

    from .anatomy import inspect_model
    from .models import load_model

    set_seed(cfg.training.seed)  # adapter initialisation too: the same seed gives the same run
    model, tokenizer = load_model(cfg.model.spec, quantization=cfg.model.quantization, device=cfg.model.device,
                                  dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False  # packed batches stay apart only without a KV cache
    anatomy = inspect_model(model)
    plan = build_plan(cfg.adapter, anatomy)
    train_set, train_report = render_rows(rows.template, rows.train, tokenizer, split="train")
    eval_set, eval_report = render_rows(rows.template, rows.eval, tokenizer, split="eval") if rows.eval \
        else (None, None)
    eval_set = eval_set or None
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    model = plan.apply(model, anatomy)
    if quantized and device == "cpu":
        _keep_4bit_layers_in_train_mode(model)
    if cfg.training.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()

    args = build_training_arguments(cfg, run.checkpoints_dir if run is not None else "checkpoints",
                                    device=device, compute_dtype=compute_dtype, has_eval=bool(eval_set))
    if world > 1:
        _ = args.device  # sets up the process group the folder is shared over
    run = _share_run_folder(run, world)
    args.output_dir = str(run.checkpoints_dir)
    recorder = RunRecorder(run, writer, rows, tokenizer, cfg, device, world=world, stop_signal=stop_signal)
    callbacks = [recorder]
    if cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.training.early_stopping_patience,
                                               cfg.training.early_stopping_threshold))
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             data_collator=build_collator(tokenizer, cfg.training.packing), processing_class=tokenizer,
                             callbacks=callbacks)
    trainer.loss_guard = recorder.check_loss

    checkpoint = None
    if resume:
        checkpoint = run.last_checkpoint()
        if checkpoint is None:
            raise RunStateError(f"run {run.name} has no complete checkpoint to resume from")
        step = int(checkpoint.name.split("-")[1])
        if is_main:
            run.truncate_metrics(step)
            writer.event("resumed", step=step, checkpoint=str(checkpoint.relative_to(run.path)),
                         attempt=writer.current.attempt)
    elif is_main:
        writer.event("started", pid=os.getpid(), world_size=world, device=device,
                     train_rows=len(train_set), eval_rows=len(eval_set or []), plan=plan.label,
                     trainable=plan.trainable_params(anatomy))
    if is_main:
        for report in (train_report, eval_report):
            if report is not None and report.dropped:
                writer.event("rows_dropped", **report.to_dict(), message=report.lines()[0])
            if report is not None and (report.truncated or report.end_cut):
                writer.event("truncated", **report.to_dict(), message="; ".join(report.lines()))
        run.clear_stop(older_than=process_started)  # a Stop from an earlier session, not one made while loading

    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    step = trainer.state.global_step
    ended = datetime.now().isoformat(timespec="seconds")
    seconds = time.perf_counter() - started

    if recorder.failure:
        if is_main:
            writer.status(RunState.FAILED, step=step, message=recorder.failure, ended_at=ended, seconds=seconds)
            writer.event("failed", step=step, message=recorder.failure)
        return RunResult("failed", recorder.failure, run)

    final_eval = None
    # decided from the trainer's own log (the same on every rank: they all evaluate, or none does)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1].get("step") == step:
        final_eval = evals[-1]["eval_loss"]
    elif eval_set and not recorder.stopped:
        final_eval = trainer.evaluate().get("eval_loss")
    if is_main:
        writer.status(RunState.STOPPING if recorder.stopped else RunState.RUNNING, step=step,
                      message="saving the adapter")
        target = _save_output(trainer, tokenizer, run, plan)
        if rows.samples and not recorder.stopped and recorder.sampled_at != step:
            recorder.generate_samples(trainer.model, step)
        state = RunState.STOPPED if recorder.stopped else RunState.FINISHED
        message = (f"stopped at step {step}; adapter saved" if recorder.stopped else
                   f"finished {step} steps" + (f", eval loss {final_eval:.4f}" if final_eval is not None else ""))
        best = trainer.state.best_model_checkpoint
        if not recorder.stopped and cfg.training.early_stopping_patience and step < trainer.state.max_steps:
            message = (f"early stopping at step {step} of {trainer.state.max_steps}: eval loss did not improve "
                       f"by more than {cfg.training.early_stopping_threshold} for "
                       f"{cfg.training.early_stopping_patience} evaluation(s)")
        if best and cfg.training.early_stopping_patience:
            message += f"; the adapter is the best checkpoint ({Path(best).name}, eval loss " \
                       f"{trainer.state.best_metric:.4f})"
        writer.status(state, step=step, message=message, ended_at=ended, seconds=seconds,
                      output=str(target.relative_to(run.path)))
        writer.event(state.value, step=step, seconds=seconds, eval_loss=final_eval)
        return RunResult(state.value, message, run)
    return RunResult("stopped" if recorder.stopped else "finished", "", run)

"""The run's Trainer callbacks, one job each, sharing one ``RunContext``.

    StatusCallback      the status: running at the start, the step (throttled), stopping
    MetricsCallback     metrics.jsonl lines (loss, lr, grad norm, tokens/s, memory) and eval events
    FiniteGuard         a NaN or inf loss, gradient or weight at any step (not only logged ones)
    StopCallback        Stop (the STOP file, SIGTERM) and a guard's failure, agreed by every process
    SamplesCallback     generations from held-out prompts every N steps (a failure is an event)
    CheckpointCallback  marks a checkpoint complete, then rotates older ones

The order matters and is fixed by ``run_callbacks``: the guard sees the update before Stop
decides at the end of the step, both decide before the Trainer saves or evaluates that step, and
the status is written last (it says "stopping" at the step Stop was agreed).
Only the main process (``ctx.writer`` set) writes; every process takes part in the agreement.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from ..core.atomic import write_text_atomic
from ..core.faults import fault_point, fault_raise
from ..core.runconfig import RunConfig
from ..core.rundata import RunRows
from ..core.runproto import RunState
from ..core.runstore import CHECKPOINT_MARKER, RunFolder, RunWriter
from ..core.template import as_text


@dataclass
class RunContext:
    """What the callbacks of one run share."""

    run: RunFolder
    writer: RunWriter | None  # None on processes other than the main one
    cfg: RunConfig
    rows: RunRows
    tokenizer: object
    device: str
    world: int = 1
    rank: int = 0
    stop_signal: dict = field(default_factory=dict)  # {"set": True} after SIGTERM
    failure: str | None = None  # why the run fails (set once)
    stopped: bool = False
    bad: str | None = None  # what went non-finite in the current step
    sampled_at: int | None = None
    paused_s: float = 0.0  # time spent on samples since the last metric line (not training time)

    @property
    def is_main(self) -> bool:
        return self.writer is not None

    def fail(self, what: str, step: int, control) -> None:
        """End the run at this step, saving and evaluating nothing from it."""
        if self.failure is None:
            last = self.run.last_checkpoint()
            self.failure = (f"{what} became non-finite (NaN or inf) at step {step}; training stopped and nothing "
                            f"from this step was saved. Last good checkpoint: "
                            f"{last.relative_to(self.run.path) if last else 'none yet'}. "
                            "Try a lower training.learning_rate, training.max_grad_norm: 1.0, or fp32 weights.")
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False


def _finite(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


def all_finite(tensors) -> bool:
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


def memory_bytes(device: str) -> tuple[str, int]:
    if device == "cuda":
        import torch

        return "cuda_peak", int(torch.cuda.max_memory_allocated())
    import psutil

    return "rss", int(psutil.Process().memory_info().rss)


class StatusCallback(TrainerCallback):
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kw):
        if self.ctx.is_main:
            self.ctx.writer.status(RunState.RUNNING, step=state.global_step, max_steps=state.max_steps,
                                   message="training")

    def on_step_end(self, args, state, control, **kw):
        now = time.monotonic()
        if self.ctx.is_main and (self.ctx.stopped or now - self._last >= 1.0):
            self.ctx.writer.status(RunState.STOPPING if self.ctx.stopped else RunState.RUNNING,
                                   step=state.global_step, max_steps=state.max_steps)
            self._last = now


class MetricsCallback(TrainerCallback):
    """A metrics line per log; tokens/s and steps/s leave out eval and sample time."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._time: float | None = None
        self._tokens = 0
        self._step = 0

    def on_train_begin(self, args, state, control, **kw):
        self._time, self._tokens, self._step = time.perf_counter(), state.num_input_tokens_seen, state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        ctx, logs = self.ctx, dict(logs or {})
        if "train_loss" in logs:  # the end-of-training summary
            if ctx.is_main:
                ctx.writer.event("train_summary", **{k: v for k, v in logs.items() if _finite(v)})
            return
        step = state.global_step
        record: dict = {"step": step, "epoch": round(float(state.epoch or 0), 4), "time": time.time()}
        if "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
            self._time, ctx.paused_s = time.perf_counter(), 0.0  # eval (and sample) time is not training time
        if "loss" in logs:
            now = time.perf_counter()
            dt = max(now - (self._time or now) - ctx.paused_s, 1e-9)
            record.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                          tokens_per_s=(state.num_input_tokens_seen - self._tokens) / dt,
                          steps_per_s=max(step - self._step, 1) / dt, tokens_seen=state.num_input_tokens_seen)
            kind, value = memory_bytes(ctx.device)
            record[f"memory_{kind}"] = value
            self._time, self._tokens, self._step, ctx.paused_s = now, state.num_input_tokens_seen, step, 0.0
        # preference runs: TRL's reward metrics as TRL names them (rewards/margins, ...; eval_rewards/... held out)
        record.update({k: v for k, v in logs.items() if k.startswith(("rewards/", "eval_rewards/")) and _finite(v)})
        bad = [k for k in ("loss", "grad_norm", "eval_loss") if k in record and not _finite(record[k])]
        if bad:
            ctx.fail(bad[0].replace("_", " "), step, control)
        if ctx.is_main:
            ctx.writer.metric(record)
            if "eval_loss" in record:
                ctx.writer.event("eval", step=step, eval_loss=record["eval_loss"])


class FiniteGuard(TrainerCallback):
    """Every update is checked: the loss (handed over by the trainer), the gradients (unless a
    loss scaler handles overflow itself) and the trained weights after the step."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._trainable: list = []
        self._nan_step = int(os.environ.get("SFTKIT_FAULT_NAN_AT_STEP", "0") or 0)  # fault injection for tests

    def on_train_begin(self, args, state, control, model=None, **kw):
        if model is not None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self._nan_step and state.global_step + 1 == self._nan_step and self._trainable:
            import torch

            with torch.no_grad():
                self._trainable[0].fill_(float("nan"))

    def check_loss(self, loss) -> None:
        import torch

        if self.ctx.bad is None and loss is not None and not bool(torch.isfinite(loss).all()):
            self.ctx.bad = "the loss"

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if args.fp16:
            return  # a loss scaler's overflow skips the step and lowers the scale: not a failure
        if self.ctx.bad is None and self._trainable and not all_finite(p.grad for p in self._trainable):
            self.ctx.bad = "the gradient"

    def on_optimizer_step(self, args, state, control, **kw):
        if self.ctx.bad is None and self._trainable and not all_finite(self._trainable):
            self.ctx.bad = "a trained weight"


class StopCallback(TrainerCallback):
    """Leave the loop at the end of the step for a Stop or a guard's failure, on every process at
    the same step: the flags are or-ed across processes (one small all-reduce per step)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        rank, _, at = os.environ.get("SFTKIT_FAULT_STOP_RANK", "").partition("@")
        self._lone_stop = (int(rank), int(at)) if at else None  # fault injection: one rank sees a Stop

    def _agree(self, stop: bool, bad: bool) -> tuple[bool, bool]:
        if self.ctx.world <= 1:
            return stop, bad
        import torch
        import torch.distributed as dist

        device = f"cuda:{torch.cuda.current_device()}" if self.ctx.device == "cuda" else "cpu"
        flags = torch.tensor([float(stop), float(bad)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def on_step_end(self, args, state, control, **kw):
        ctx, step = self.ctx, state.global_step
        stop = ctx.run.stop_requested() or bool(ctx.stop_signal.get("set")) or self._lone_stop == (ctx.rank, step)
        stop, bad = self._agree(stop, ctx.bad is not None)
        if bad:
            ctx.fail(ctx.bad or "a value on another process", step, control)
        ctx.bad = None
        if stop:
            control.should_training_stop = True
            ctx.stopped = True


class SamplesCallback(TrainerCallback):
    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def on_step_end(self, args, state, control, model=None, **kw):
        every = self.ctx.cfg.training.sample_every
        if self.ctx.is_main and every and state.global_step % every == 0 and not self.ctx.failure and model:
            generate_samples(self.ctx, model, state.global_step)


def generate_samples(ctx: RunContext, model, step: int) -> None:
    """Generate from the held-out prompts; a failure is an event, never the end of the run."""
    import torch

    from .generate import generate_text

    if not ctx.rows.samples:
        return
    was_training, started = model.training, time.perf_counter()
    model.eval()
    try:
        with torch.no_grad():
            fault_raise("sample")
            for i, row in enumerate(ctx.rows.samples):
                prompt = ctx.rows.template.prompt_text(row, ctx.tokenizer, with_examples=False)
                ans = generate_text(model, ctx.tokenizer, prompt, max_new_tokens=ctx.cfg.training.sample_max_new_tokens)
                ctx.writer.sample({"step": step, "index": i, "prompt": ctx.rows.template.user_text(row),
                                   "target": as_text(row.get(ctx.rows.template.answer_field)),
                                   "output": ans.text, "seconds": round(ans.seconds, 3)})
    except Exception as exc:  # noqa: BLE001 - samples are a view; training goes on
        ctx.writer.event("sample_failed", step=step, message=f"{type(exc).__name__}: {exc}"[:500])
        with open(ctx.run.log_path, "a", encoding="utf-8") as fh:
            fh.write(traceback.format_exc())
    else:
        ctx.writer.event("sample", step=step, n=len(ctx.rows.samples))
    finally:
        model.train(was_training)
        ctx.sampled_at = step  # tried at this step: not again at the end
        ctx.paused_s += time.perf_counter() - started  # generation time is not training time


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


class CheckpointCallback(TrainerCallback):
    """A checkpoint counts once every process has written its part and it is marked complete;
    older ones are rotated out only after that (the Trainer's own rotation is off)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def on_save(self, args, state, control, **kw):
        ctx = self.ctx
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ctx.world > 1:  # every rank has written its part (its RNG state) before rank 0 marks it
            import torch.distributed as dist

            dist.barrier()
        if not ctx.is_main or not folder.is_dir() or ctx.failure:
            return
        fault_point("checkpoint_saved", state.global_step)
        write_text_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": state.global_step, "time": time.time()}))
        fault_point("checkpoint_marked", state.global_step)
        best = state.best_model_checkpoint
        rotate_checkpoints(ctx.run, ctx.cfg.training.keep_checkpoints, protect=(Path(best),) if best else ())
        ctx.writer.event("checkpoint", step=state.global_step, path=str(folder.relative_to(ctx.run.path)))


def run_callbacks(ctx: RunContext) -> tuple[FiniteGuard, list[TrainerCallback]]:
    """The run's callbacks in the order they must run (the guard, for the trainer's loss hook, too)."""
    guard = FiniteGuard(ctx)
    return guard, [MetricsCallback(ctx), guard, StopCallback(ctx), SamplesCallback(ctx), CheckpointCallback(ctx),
                   StatusCallback(ctx)]

"""Training speed and memory: sftkit's run engine against what a user writes instead.

"Plain" is ``transformers.Trainer`` + peft written the way their docs show it: the chat template
tokenised with ``apply_chat_template``, the prompt masked with -100, ``DataCollatorForSeq2Seq``
padding each batch, ``LoraConfig(target_modules="all-linear")``, fp32 on CPU (4-bit NF4 through
bitsandbytes where asked). sftkit runs the same model, rows, LoRA, batch, steps, learning rate and
seed through its run engine with its default settings. Each run is a fresh process (peak RSS is
that process's); plain and sftkit alternate. Tokens/s counts real (non-padding) tokens over the
steps after the first (warm-up); the matmul limit is the machine's fp32 GEMM rate measured in the
same invocation, at 4 x N FLOPs per real token (forward 2N, backward through frozen weights 2N).

    python benchmarks/train_throughput.py [--steps 12] [--rows mixed,uniform] [--no-4bit]

Writes the "Training speed" section of benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
BATCH, LR, WARMUP, SEED = 8, 1e-3, 0.1, 42


# ---- rows ----------------------------------------------------------------------------------------
def make_rows(kind: str, n: int = 400) -> list[dict]:
    """uniform: the dates task (short rows of similar length). mixed: support messages repeated 1 to
    12 times (lengths vary about 8x, like real chat data)."""
    from sftkit.core.teaching import teaching_task

    if kind == "uniform":
        return teaching_task("dates").rows(n)
    rng = random.Random(0)
    return [{"message": " ".join([r["message"]] * rng.randint(1, 12)), "label": r["label"]}
            for r in teaching_task("intent").rows(n)]


def template_for(kind: str):
    import dataclasses

    from sftkit.core.teaching import teaching_task

    task = teaching_task("dates" if kind == "uniform" else "intent")
    return dataclasses.replace(task.template, max_length=2048)


# ---- one run per process ---------------------------------------------------------------------------
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def run_plain(job: dict) -> dict:
    """The plain alternative, as the transformers / peft docs write it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from sftkit.engine.models import prepare_default_model

    folder = str(prepare_default_model(progress=lambda *a: None))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the precision sftkit's policy picks on this device: bf16 on a GPU that has it, fp32 on a CPU
    bf16 = job["device"] == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if job["quantization"] == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    template = template_for(job["rows"])

    def tokenize(row):
        messages = [{"role": "system", "content": template.system},
                    {"role": "user", "content": template.user_text(row)},
                    {"role": "assistant", "content": str(row[template.answer_field])}]
        full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
        return {"input_ids": full, "attention_mask": [1] * len(full),
                "labels": [-100] * len(prompt) + full[len(prompt):]}

    data = Dataset.from_list([tokenize(r) for r in job["train_rows"]])
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    real_tokens: list[int] = []

    def counting_collator(features):  # the benchmark's own count of real tokens per batch
        batch = collate(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=job["out"], per_device_train_batch_size=BATCH, max_steps=job["steps"],
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, logging_steps=1,
                             save_strategy="no", report_to="none", seed=SEED, use_cpu=job["device"] == "cpu",
                             disable_tqdm=True, bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": times[-1] - times[0], "tokens": sum(real_tokens[1:len(times)]), "final_loss": losses[-1],
            "all_tokens": sum(real_tokens[:len(times)])}


def sftkit_config(job: dict):
    from sftkit.core.examples import example_config

    return example_config().with_changes(
        name="bench", store=job["out"],
        model={"quantization": job["quantization"], "device": job["device"]},
        data={"source": job["source"], "rows": None, "eval_fraction": 0.0, "sample_prompts": 0},
        template=template_for(job["rows"]).to_dict(),
        adapter={"preset": "lora_all_linear", "rank": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]},
        training={"max_steps": job["steps"], "batch_size": BATCH, "learning_rate": LR, "warmup": WARMUP,
                  "lr_schedule": "cosine", "seed": SEED, "eval_every": 0, "sample_every": 0,
                  "checkpoint_every": 100_000, "logging_every": 1, **job.get("training", {})})


def _from_metrics(run) -> dict:
    rows = [m for m in run.metrics() if "loss" in m]
    first, last = rows[0], rows[-1]
    batching = next((e for e in run.events() if e["event"] == "batching"), {})
    started = next((e for e in run.events() if e["event"] == "started"), {})
    return {"frozen_dtype": started.get("frozen_dtype"),
            "seconds": last["time"] - first["time"], "tokens": last["tokens_seen"] - first["tokens_seen"],
            "final_loss": last["loss"], "all_tokens": last["tokens_seen"], "batching": batching.get("message", ""),
            "run_rss": max(m.get("memory_rss", 0) for m in rows)}


def run_sftkit(job: dict) -> dict:
    from sftkit.engine.train import run_training

    result = run_training(sftkit_config(job))
    if result.state != "finished":
        raise SystemExit(f"sftkit run failed: {result.message}")
    return _from_metrics(result.run)


def run_sftkit_fp32(job: dict) -> dict:
    """sftkit with every weight in fp32 (``model.dtype: float32``): what the bf16 frozen weights add."""
    from sftkit.engine.train import run_training

    cfg = sftkit_config(job)
    result = run_training(cfg.with_changes(model={"dtype": "float32"}))
    if result.state != "finished":
        raise SystemExit(f"sftkit run failed: {result.message}")
    return _from_metrics(result.run)


def run_sftkit_live(job: dict) -> dict:
    """The same run started from a RunLauncher in this process, which follows and redraws it while it
    trains (the live view's cost is what this run loses against the headless one)."""
    from sftkit.ui import RunLauncher

    launcher = RunLauncher(sftkit_config(job), poll_s=0.5, min_redraw_s=0.5)
    launcher.start_button.click()
    if launcher.handle is None:
        raise SystemExit(f"the launcher did not start: {launcher.message.value}")
    state = launcher.wait(3600)
    if state != "finished":
        raise SystemExit(f"live run ended {state}")
    out = _from_metrics(launcher.handle.run)
    out["redraws"] = launcher.view.redraws
    out["rss_is_sampled"] = True  # the run trains in its own process: its RSS at each logged step
    return out


def child(job: dict) -> None:
    fn = {"plain": run_plain, "sftkit": run_sftkit, "sftkit_live": run_sftkit_live,
          "sftkit_fp32": run_sftkit_fp32}[job["who"]]
    out = fn(job)
    out["peak_rss"] = out["run_rss"] if out.get("rss_is_sampled") else peak_rss()
    if job["device"] == "cuda":
        import torch

        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    print("RESULT " + json.dumps(out), flush=True)


# ---- the invocation ------------------------------------------------------------------------------------
def gemm_rate(device: str, size: int = 1536, reps: int = 20) -> float:
    """fp32 matmul rate of this machine, FLOP/s (the best of a few timings)."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 * reps / best


def spawn(job: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    spec = Path(job["out"] + ".job.json")  # the rows are too long for a command line
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{job['who']} on {job['rows']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def measure_one(base, tmp, kind, who, quant, repeat, train_rows, rate, n_params) -> dict:
    job = {**base, "who": who, "quantization": quant, "out": str(Path(tmp) / f"{kind}-{who}-{quant}-{repeat}"),
           "train_rows": train_rows if who == "plain" else None}
    r = spawn(job)
    r.update(rows=kind, who=who, quantization=quant, repeat=repeat)
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    r["mfu"] = r["tokens_per_s"] * 4 * n_params / rate
    print(f"{kind:8} {who:12} {quant:5} {r['tokens_per_s']:7.1f} real tokens/s  {r['seconds']:7.1f} s  "
          f"{r['peak_rss'] / 2**30:.2f} GiB peak RSS  loss {r['final_loss']:.3f}  {r.get('batching', '')}", flush=True)
    return r


def median_rows(results: list[dict]) -> list[dict]:
    """One row per (rows, run, weights): the median tokens/s over the repeats (max of peak RSS)."""
    import statistics

    out, seen = [], []
    for r in results:
        key = (r["rows"], r["who"], r["quantization"])
        if key in seen:
            continue
        seen.append(key)
        same = [x for x in results if (x["rows"], x["who"], x["quantization"]) == key]
        row = dict(same[0])
        row["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in same)
        row["mfu"] = statistics.median(x["mfu"] for x in same)
        row["peak_rss"] = max(x["peak_rss"] for x in same)
        row["n"] = len(same)
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", default="mixed,uniform")
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--no-live", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the order flips each time")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(Path(args.child).read_text()))

    import torch

    from sftkit.core.rundata import run_rows

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rate = gemm_rate(device)
    print(f"fp32 matmul: {rate / 1e9:.0f} GFLOP/s", flush=True)
    n_params = 134_515_008  # SmolLM2-135M
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.rows.split(","):
            source = Path(tmp) / f"{kind}.jsonl"
            source.write_text("".join(json.dumps(r) + "\n" for r in make_rows(kind)))
            base = {"rows": kind, "source": str(source), "steps": args.steps, "device": device}
            train_rows = run_rows(sftkit_config({**base, "out": tmp, "quantization": "none"})).train
            lengths = None
            quants = ["none"] + (["4bit"] if kind == "mixed" and not args.no_4bit else [])
            order = 0
            for quant in quants:
                for repeat in range(args.repeats):
                    pair = ["plain", "sftkit"] if order % 2 == 0 else ["sftkit", "plain"]  # alternating order
                    order += 1
                    for who in pair:
                        results.append(measure_one(base, tmp, kind, who, quant, repeat, train_rows, rate, n_params))
            if kind == "mixed" and not args.no_live:
                results.append(measure_one(base, tmp, kind, "sftkit_live", "none", 0, train_rows, rate, n_params))
            if kind == "mixed" and any(r.get("frozen_dtype") for r in results if r["who"] == "sftkit"):
                results.append(measure_one(base, tmp, kind, "sftkit_fp32", "none", 0, train_rows, rate, n_params))
            if lengths is None:
                from transformers import AutoTokenizer

                from sftkit.core.rundata import render_rows
                from sftkit.engine.models import prepare_default_model

                tok = AutoTokenizer.from_pretrained(str(prepare_default_model(progress=lambda *a: None)))
                lengths = [len(e["input_ids"]) for e in render_rows(template_for(kind), train_rows, tok)[0]]
                for r in results:
                    if r["rows"] == kind:
                        r["lengths"] = (min(lengths), max(lengths))
    section = report(median_rows(results), rate, args, device)
    print(section)
    from prompting_baseline import write_section

    write_section(Path(args.out), "## Training speed", section)


def report(results: list[dict], rate: float, args, device: str) -> str:
    import peft
    import torch
    import transformers

    def plain_of(r):
        return next(p for p in results if p["rows"] == r["rows"] and p["who"] == "plain"
                    and p["quantization"] == r["quantization"])

    lines = [f"## Training speed ({device}): sftkit vs plain transformers.Trainer + peft", "",
             f"`python benchmarks/train_throughput.py --steps {args.steps}`, {datetime.date.today()}, "
             f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}. Default model (SmolLM2-135M), LoRA r=16 on all "
             f"linear layers, batch {BATCH}, {args.steps} steps, the same rows and seed; each run a fresh process, "
             f"plain and sftkit in alternating order, the median of {args.repeats} run(s) each. Real tokens/s over the "
             f"steps after the first; fp32 matmul measured here: {rate / 1e9:.0f} GFLOP/s. \"Of matmul limit\" "
             f"counts 4 x 134.5M FLOPs per real token for both (sftkit does less work per token than that: its "
             f"head runs at the trained positions only; where its frozen weights are bf16, their matmuls run at the "
             f"bf16 rate, about twice the fp32 one, so the fp32 limit is not a ceiling). Peak RSS: the training process's peak "
             f"(the launcher row: "
             f"the largest RSS its run process logged).", "",
             "| rows | run | weights | real tokens/s | vs plain | of matmul limit | peak RSS | final loss | batching |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["tokens_per_s"] / plain_of(r)["tokens_per_s"]
        span = f" ({r['lengths'][0]}-{r['lengths'][1]} tokens)" if r.get("lengths") else ""
        who = {"plain": "plain Trainer + peft", "sftkit": "sftkit defaults",
               "sftkit_live": "sftkit defaults, launcher redrawing",
               "sftkit_fp32": "sftkit, `model.dtype: float32`"}[r["who"]]
        weights = ("4-bit NF4" if r["quantization"] == "4bit" else
                   f"fp32, frozen in {r['frozen_dtype']}" if r.get("frozen_dtype") else "fp32")
        lines.append(f"| {r['rows']}{span} | {who} | {weights} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | "
                     f"{r['mfu']:.0%} | {r['peak_rss'] / 2**30:.2f} GiB | "
                     f"{r['final_loss']:.3f} | {r.get('batching', '') or 'padded batches'} |")
    live = next((r for r in results if r["who"] == "sftkit_live"), None)
    if live is not None:
        head = next(r for r in results if r["rows"] == live["rows"] and r["who"] == "sftkit"
                    and r["quantization"] == "none")
        cost = 1 - live["tokens_per_s"] / head["tokens_per_s"]
        words = (f"costs {cost:.1%} of the run's throughput" if cost > 0 else
                 f"costs nothing measurable: the run with it was {-cost:.1%} faster than the headless one (run-to-run "
                 f"noise)")
        lines += ["", f"The live view (a RunLauncher in the kernel polling the run folder and redrawing its figure while "
                      f"the run trains) {words}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

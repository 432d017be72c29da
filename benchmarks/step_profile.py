"""Where a training step's time goes: one batch of mixed-length rows, forward + backward, five ways.

    python benchmarks/step_profile.py [--rows 8] [--reps 3]

1. padded batch, the model's own loss (what plain Trainer + peft runs)
2. packed (one sequence), sdpa under a block mask, the model's own loss (packing before this round)
3. packed, attention per row (``sftkit.engine.fast.packed_attention``), the model's own loss
4. packed, attention per row, the head and loss at trained positions only (sftkit's default path)
5. as 4, in passes of at most 1024 tokens (``training.max_pass_tokens``)

For 1, 2 and 4 the torch profiler splits the time into attention, the LM head + loss, and the rest.
Default model, LoRA r=16 on all linear layers, fp32 on this machine's CPU. Prints a markdown table
and appends it to benchmarks/RESULTS.md's "Training step profile" section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from sftkit.core.teaching import teaching_task
    from sftkit.engine import fast
    from sftkit.engine.models import load_model
    from sftkit.engine.train import build_collator, build_examples

    torch.manual_seed(0)
    model, tok = load_model("default", quantization="none", device="cpu")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    rng = random.Random(0)
    task = teaching_task("intent")
    rows = [{"message": " ".join([r["message"]] * rng.randint(1, 12)), "label": r["label"]}
            for r in task.rows(args.rows, seed=7)]
    examples = build_examples(dataclasses.replace(task.template, max_length=2048), rows, tok)
    padded, packed = build_collator(tok, False)(examples), build_collator(tok, True)(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    trained = int((padded["labels"][:, 1:] != -100).sum())

    def step(fn, inputs):
        """Forward and backward of one batch; returns its loss."""
        model.zero_grad(set_to_none=True)
        return fn(inputs)

    def own(inputs):
        loss = model(**inputs).loss
        loss.backward()
        return float(loss)

    def trained_only(inputs):
        loss = fast.trained_positions_loss(model, inputs)
        loss.backward()
        return float(loss)

    def passes(inputs):
        items = torch.tensor(int((inputs["labels"][:, 1:] != -100).sum()))
        total = 0.0
        for part in fast.split_batch(inputs, 1024):
            loss = fast.trained_positions_loss(model, part, items)
            loss.backward()
            total += float(loss)
        return total

    def timed(name, fn, inputs, attention):
        if attention:
            fast.use_packed_attention(model)
        try:
            step(fn, inputs)  # warm-up
            times, loss = [], None
            for _ in range(args.reps):
                t = time.perf_counter()
                loss = step(fn, inputs)
                times.append(time.perf_counter() - t)
            profile = None
            if name in PROFILED:
                profile = profile_step(lambda: step(fn, inputs))
        finally:
            fast.restore_attention(model)
        return {"name": name, "seconds": min(times), "loss": loss, "profile": profile}

    variants = [("padded, model's own loss", own, padded, False),
                ("packed, sdpa block mask, model's own loss", own, packed, False),
                ("packed, attention per row, model's own loss", own, packed, True),
                ("packed, attention per row, head at trained positions", trained_only, packed, True),
                ("as above, passes of <= 1024 tokens", passes, packed, True)]
    results = [timed(*v) for v in variants]
    lines = [f"## Training step profile (cpu, {datetime.date.today()})", "",
             f"`python benchmarks/step_profile.py --rows {args.rows}`: one batch of {args.rows} mixed-length rows "
             f"({real} real tokens, padded to {padded['input_ids'].numel()}; {trained} trained tokens), forward + "
             f"backward, default model, LoRA r=16 all linear, fp32, best of {args.reps}.", "",
             "| step | seconds | vs padded | real tokens/s | attention | LM head + loss | rest | loss |",
             "|---|---|---|---|---|---|---|---|"]
    base = results[0]["seconds"]
    for r in results:
        p = r["profile"] or {}
        def share(k):
            return (f"{p[k]:.0%}" if k in p else "")
        lines.append(f"| {r['name']} | {r['seconds']:.2f} | {base / r['seconds']:.2f}x | {real / r['seconds']:.0f} | "
                     f"{share('attention')} | {share('head')} | {share('rest')} | {r['loss']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from prompting_baseline import write_section

    write_section(Path(args.out), "## Training step profile", text)


PROFILED = ("padded, model's own loss", "packed, sdpa block mask, model's own loss",
            "packed, attention per row, head at trained positions")


def profile_step(run) -> dict:
    """Shares of the step's CPU time: attention kernels, the head's matmul with the loss, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key or "flash" in e.key)
    head = sum(e.self_cpu_time_total for e in events
               if any(k in e.key for k in ("log_softmax", "nll_loss", "cross_entropy")))
    # the head's matmul: the largest single mm/addmm shapes are the vocabulary projection
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::matmul") and "49152" in str(e.input_shapes):
            head += e.self_cpu_time_total
    rest = max(total - attention - head, 0)
    return {"attention": attention / total, "head": head / total, "rest": rest / total}


if __name__ == "__main__":
    main()

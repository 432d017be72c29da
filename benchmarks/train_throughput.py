"""Training throughput of the run engine on the default model: steps/s and tokens/s.

Same rows, same seed, same step count; only one setting changes per line, so the ratios
compare against the plain alternative (padded batches, fp32 LoRA) measured in the same run.

    python benchmarks/train_throughput.py [--steps 8] [--device auto]

Writes a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
from pathlib import Path

from prompting_baseline import write_section

HERE = Path(__file__).resolve().parent

VARIANTS = (
    ("padded batches, fp32 LoRA (plain)", {}, {}),
    ("packing (padding-free)", {"packing": True}, {}),
    ("packing + gradient checkpointing", {"packing": True, "gradient_checkpointing": True}, {}),
    ("packing, 4-bit NF4 weights (QLoRA)", {"packing": True}, {"quantization": "4bit"}),
)


MIXED = (
    ("mixed lengths, padded batches (plain)", {}),
    ("mixed lengths, packing (padding-free)", {"packing": True}),
)


def mixed_length_rows(path: Path, n: int = 400) -> Path:
    """Support messages repeated 1 to 6 times: rows from about 90 to 400 tokens, like real chat data."""
    import json
    import random

    from sftkit.core.teaching import teaching_task

    rng = random.Random(0)
    rows = [{"message": " ".join([r["message"]] * rng.randint(1, 6)), "label": r["label"]}
            for r in teaching_task("intent").rows(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(steps: int, device: str, training: dict, model: dict, store: Path, data: dict | None = None,
            template=None) -> dict:
    from sftkit.core.examples import example_config
    from sftkit.engine.train import run_training

    cfg = example_config().with_changes(
        store=str(store),
        model={"device": device, **model},
        training={"max_steps": steps + 1, "eval_every": 0, "sample_every": 0, "checkpoint_every": 10_000,
                  "packing": False, **training},
        data={"sample_prompts": 0, **(data or {})},
        **({"template": template} if template is not None else {}))
    result = run_training(cfg)
    if result.state != "finished":
        raise SystemExit(f"run failed: {result.message}")
    rows = [m for m in result.run.metrics() if "loss" in m and m["step"] > 1]  # step 1 warms up
    mem_key = "memory_cuda_peak" if "memory_cuda_peak" in rows[-1] else "memory_rss"
    return {
        "steps_per_s": statistics.mean(m["steps_per_s"] for m in rows),
        "tokens_per_s": statistics.mean(m["tokens_per_s"] for m in rows),
        "memory": max(m[mem_key] for m in rows),
        "memory_kind": "CUDA peak" if mem_key == "memory_cuda_peak" else "process RSS",
        "device": result.run.read_status().get("device"),
        "final_loss": rows[-1]["loss"],
    }


def table(results: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows; "vs plain" is against the first line, measured in the same run."""
    base = results[0][1]["tokens_per_s"]
    return ["| variant | steps/s | tokens/s | vs plain | memory |", "|---|---|---|---|---|"] + [
        f"| {name} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
        f"{r['memory'] / 2**20:.0f} MiB {r['memory_kind']} |" for name, r in results]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, training, model in VARIANTS:
            r = measure(args.steps, args.device, training, model, Path(tmp))
            results.append((name, r))
            print(f"{name}: {r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['memory'] / 2**20:.0f} MiB {r['memory_kind']}", flush=True)
        from sftkit.core.teaching import teaching_task

        rows = mixed_length_rows(Path(tmp) / "mixed.jsonl")
        template = teaching_task("intent").template
        mixed = []
        for name, training in MIXED:
            r = measure(args.steps, args.device, training, {}, Path(tmp), data={"source": str(rows)},
                        template=dataclasses.replace(template, max_length=512))
            mixed.append((name, r))
            print(f"{name}: {r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:.0f} tokens/s", flush=True)
    device = results[0][1]["device"]
    lines = [f"## Training throughput ({device}, default model, example config: LoRA all linear r=16, batch 8)",
             "",
             f"`python benchmarks/train_throughput.py --steps {args.steps}` on {platform.machine()}, "
             f"{os.cpu_count()} cores. Mean over {args.steps} optimizer steps after a warm-up step; "
             "tokens/s counts real (non-padding) tokens, so the padded and packed lines compare useful work.",
             "",
             *table(results)]
    lines += ["", "Rows of mixed lengths (intent messages repeated 1 to 6 times, about 90 to 400 tokens), "
              "where padded batches carry many padding tokens (the sdpa kernel still computes attention over the "
              "whole packed sequence under a block mask, so packing gains less than the padding share):", "",
              *table(mixed)]
    lines.append("")
    write_section(Path(args.out), f"## Training throughput ({device}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

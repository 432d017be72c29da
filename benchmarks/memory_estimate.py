"""The layer picker's memory estimate against one measured training step on the default
model, per preset. Writes the "Memory estimate" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/memory_estimate.py [--batch 4] [--seq 128]
"""

import argparse
import time

from prompting_baseline import HERE, write_section

import sftkit
from sftkit.engine.anatomy import inspect_model
from sftkit.engine.freeze import FreezePlan
from sftkit.engine.measure import measure_training_step

CASES = [("lora_attention", None, False), ("lora_all_linear", None, False), ("lora_top_blocks", 8, False),
         ("freeze_tuning", 4, False), ("bitfit", None, False), ("lora_attention", None, True)]


def mib(n):
    return f"{n / 2**20:,.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    lines = []
    for preset, top, gc in CASES:
        model = sftkit.load_model("default").model
        a = inspect_model(model)
        plan = FreezePlan.preset(preset, a, top_n=top)
        est = plan.memory_estimate(a, batch_size=args.batch, seq_len=args.seq, gradient_checkpointing=gc)
        trained = plan.apply(model, a)
        if gc:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trained.enable_input_require_grads()
        m = measure_training_step(trained, args.batch, args.seq)
        name = plan.label + (" + checkpointing" if gc else "")
        lines.append(f"| {name} | {plan.trainable_params(a):,} | {mib(est.weights_grads_optimizer)} | "
                     f"{mib(m.weights + m.gradients + m.optimizer)} | {mib(est.activations)} | {mib(m.activations)} | "
                     f"{est.activations / m.activations:.2f} |")
        print(lines[-1], flush=True)
    table = ("| plan | trainable | est. weights+grads+AdamW MiB | measured MiB | est. activations MiB | "
             "measured MiB | est./measured |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    section = (f"## Memory estimate (default model, fp32, batch {args.batch} x {args.seq} tokens)\n\n"
               f"`python benchmarks/memory_estimate.py --batch {args.batch} --seq {args.seq}`, "
               f"{time.strftime('%Y-%m-%d')}. Measured: tensor bytes after one AdamW step; activations "
               "as the distinct storages autograd saved (saved-tensor hooks).\n\n" + table + "\n")
    write_section(HERE / "RESULTS.md", "## Memory estimate", section)


if __name__ == "__main__":
    main()

"""The "before" that fine-tuning must beat: the default model prompted zero-shot and
few-shot on each teaching task's held-out rows. Writes benchmarks/RESULTS.md's section.

    .venv/bin/python benchmarks/prompting_baseline.py [--n 100] [--shots 3]
"""

import argparse
import platform
import time
from pathlib import Path

import sftkit
from sftkit.core.data import split_rows
from sftkit.core.teaching import TASKS
from sftkit.engine.generate import score_prompting

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="held-out rows scored per task")
    ap.add_argument("--shots", type=int, default=3, help="few-shot examples from the training split")
    args = ap.parse_args()
    model, tok = sftkit.load_model("default")
    lines = []
    for name, task in TASKS.items():
        train, held_out = split_rows(task.rows(), eval_size=args.n, seed=0)
        for few in (False, True):
            tpl = task.template.with_examples(train[: args.shots]) if few else task.template
            t = time.perf_counter()
            s = score_prompting(model, tok, tpl, held_out, task.scorer, few_shot=few,
                                max_new_tokens=32)
            secs = time.perf_counter() - t
            mode = f"{args.shots}-shot" if few else "zero-shot"
            lines.append(f"| {name} | {mode} | {s.mean:.1%} | {s.ci_low:.1%} to {s.ci_high:.1%} | {s.n} | {secs:.0f} s |")
            print(lines[-1], "| e.g.", repr(s.answers[0]), "for", held_out[0][task.template.answer_field], flush=True)
    table = ("| task | prompt | accuracy | 95% CI (Wilson) | n | time |\n|---|---|---|---|---|---|\n"
             + "\n".join(lines))
    section = (f"## Prompting baseline (default model, greedy)\n\n"
               f"`python benchmarks/prompting_baseline.py --n {args.n} --shots {args.shots}` on "
               f"{platform.machine()} CPU, {time.strftime('%Y-%m-%d')}.\n\n{table}\n")
    write_section(HERE / "RESULTS.md", "## Prompting baseline", section)


def write_section(path: Path, heading: str, section: str):
    """Replace the section that starts with ``heading`` (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()

"""What following a run costs the kernel: CPU time of a RunView's redraw and of a poll that finds nothing new.

    python benchmarks/live_view_cost.py RUN_FOLDER [--steps-per-s 0.25]

The throughput benchmark's "launcher redrawing" row is a single run against a single headless run, and on a
shared 2-core machine their difference is within run-to-run noise (-18% to +15% on the same day). This
measures the view's own CPU time instead: a redraw (the figure's traces and the samples, as a new logged
step triggers) and a poll (reading the run folder's new lines), each the mean of 20, in process CPU time.
With at most one redraw per logged step and one poll every ``poll_s``, their share of a run's time follows.
Prints a markdown section and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--steps-per-s", type=float, default=0.25, help="logged steps a second of the run followed")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    from sftkit.engine.launch import attach
    from sftkit.ui.run_view import RunView

    view = RunView()
    view.follow(attach(args.run))
    n = 20
    t = time.process_time()
    for _ in range(n):
        view.refresh(force=True)
    redraw = (time.process_time() - t) / n
    t = time.process_time()
    for _ in range(n):
        view.refresh()
    poll = (time.process_time() - t) / n
    lines = sum(1 for _ in open(Path(args.run) / "metrics.jsonl", encoding="utf-8"))
    share = redraw * args.steps_per_s + poll / view.poll_s
    text = "\n".join([
        f"## Live view cost ({datetime.date.today()})", "",
        f"`python benchmarks/live_view_cost.py RUN --steps-per-s {args.steps_per_s}` on a run with {lines} metrics "
        f"lines, outside a browser (the kernel side only): a redraw takes {redraw * 1e3:.1f} ms of CPU, a poll "
        f"that finds nothing new {poll * 1e3:.2f} ms. With one redraw per logged step at {args.steps_per_s} steps/s "
        f"and a poll every {view.poll_s} s, following a run costs {share:.2%} of one core's time.", ""])
    print(text)
    from prompting_baseline import write_section

    write_section(Path(args.out), "## Live view cost", text)


if __name__ == "__main__":
    main()

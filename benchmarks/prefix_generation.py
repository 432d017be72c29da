"""Prefix tuning: answers by ``generate`` against answers by full forwards, on one trained adapter.

Trains the shoot-out's prefix-tuning method on the dates task (60 steps of batch 8, 400 rows, seed 0, the
default model), then scores the same 40 held-out items twice: with ``generate`` (no KV cache, one row at a
time: how sftkit answered before) and with ``decode_by_forward`` (full forwards: the computation training
does, how sftkit answers now). Paired: items right only one way, exact McNemar. Writes the "Prefix tuning
generation" section of benchmarks/RESULTS.md. About 10 minutes on a 2-core CPU.

    .venv/bin/python benchmarks/prefix_generation.py [WORKDIR]
"""

import sys
import tempfile
import time
from pathlib import Path

from prompting_baseline import HERE, write_section


def main(work: Path) -> None:
    from scipy.stats import binomtest

    from sftkit.core.runstore import RunStore
    from sftkit.engine import compare
    from sftkit.engine.shootout import METHODS, Budget, compare_methods, score_runs

    store = work / "runs"
    t = time.perf_counter()
    result = compare_methods("dates", ["prefix tuning"], Budget(steps=60, batch_size=8, rows=400, eval_items=40,
                                                                seed=0), store=store)
    run = RunStore(store).get(result.methods[0]["run"])
    train_minutes = (time.perf_counter() - t) / 60

    def scores() -> list[float]:
        comparison, _ = score_runs("dates", [(METHODS["prefix tuning"], run)], items=40, seed=0)
        return [r["score"] for r in comparison.results["prefix tuning"]]

    current, decoded, version = compare._generate, compare.FORWARD_DECODED_TYPES, compare.GENERATION_VERSION

    def by_generate(model, tokenizer, prompts, n):  # generate without the cache, a row at a time
        parts = [current(model, tokenizer, [p], n) for p in prompts]
        return [x for p in parts for x in p[0]], [c for p in parts for c in p[1]], sum(p[2] for p in parts)

    new = scores()  # as sftkit answers now (the shoot-out's own scoring, read back from the run's cache)
    try:  # the comparison's cache is keyed by the generation version: generate's answers are its own entries
        compare._generate, compare.FORWARD_DECODED_TYPES, compare.GENERATION_VERSION = by_generate, (), -1
        old = scores()
    finally:
        compare._generate, compare.FORWARD_DECODED_TYPES, compare.GENERATION_VERSION = current, decoded, version
    only_new = sum(n > o for o, n in zip(old, new))
    only_old = sum(o > n for o, n in zip(old, new))
    p = binomtest(only_new, only_new + only_old).pvalue if only_new + only_old else 1.0
    section = (
        "## Prefix tuning generation\n\n"
        "`python benchmarks/prefix_generation.py`: one prefix-tuning adapter (dates, 60 steps of batch 8, seed 0, "
        f"default model; trained and scored in {train_minutes:.1f} min), the same {len(old)} held-out items answered "
        "two ways.\n\n"
        "| answered by | score |\n|---|---|\n"
        f"| `generate`, no KV cache, a row at a time (before) | {100 * sum(old) / len(old):.1f}% |\n"
        f"| full forwards, `decode_by_forward` (now) | {100 * sum(new) / len(new):.1f}% |\n\n"
        f"Items right only with the full forwards: {only_new}; only with `generate`: {only_old}; "
        f"exact McNemar p = {p:.2g}.\n")
    write_section(HERE / "RESULTS.md", "## Prefix tuning generation", section)
    print(section)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="sftkit-prefix-") as tmp:
            main(Path(tmp))

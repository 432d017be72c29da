"""Measure how long each workshop notebook takes, top to bottom, and write the tables.

    .venv/bin/python lab/time_notebooks.py                    # every notebook, in workshop order
    .venv/bin/python lab/time_notebooks.py 00_quickstart      # some of them
    .venv/bin/python lab/time_notebooks.py --fast 00_quickstart   # the fast profile the tests run
    .venv/bin/python lab/time_notebooks.py --keep /tmp/executed   # also keep each executed notebook there

Each notebook runs in the `sftkit` kernel under nbclient, as *Run All* would, in one temporary working
folder shared by the notebooks of this call (so, as in a workshop, notebook 5 reuses the run notebook 4
trained), with a private sftkit cache that links the converted default model (a prepared laptop). The
time is wall-clock from kernel start to the last cell's end.

The full profile (the notebooks as committed) is written to lab/timings.json, keyed by notebook and
device (cpu / gpu); the notebooks' headers (lab/build_notebooks.py) and the table in lab/README.md are
then regenerated from it. ``--fast`` (SFTKIT_NOTEBOOK_FAST=1: 3 steps, 8 items, 24 prompts, one PEFT method a family, as
``sftkit.notebook_knob`` reads it) is written under "fast" and shown in its own column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

LAB = Path(__file__).resolve().parent
ROOT = LAB.parent
NOTEBOOKS = ROOT / "notebooks"
TIMINGS = LAB / "timings.json"
README = LAB / "README.md"
START, END = "<!-- timings:start (lab/time_notebooks.py writes this table) -->", "<!-- timings:end -->"
FAST_ENV = {"SFTKIT_NOTEBOOK_FAST": "1"}  # every knob at its fast value (sftkit.notebook_knob)
PROFILE_ENV = ("SFTKIT_NOTEBOOK_FAST", "SFTKIT_NOTEBOOK_STEPS", "SFTKIT_NOTEBOOK_ITEMS", "SFTKIT_NOTEBOOK_PROMPTS",
               "SFTKIT_NOTEBOOK_METHODS")


def workshop_order() -> list[str]:
    sys.path.insert(0, str(LAB))
    import build_notebooks

    return list(build_notebooks.NOTEBOOKS)


def machine() -> tuple[str, str]:
    """(device key, words): 'gpu' with the GPU's name where torch sees CUDA, else 'cpu' with the CPU."""
    import torch

    if torch.cuda.is_available():
        return "gpu", torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "cpu", f"a {os.cpu_count()}-core CPU ({model})"


def commit() -> str | None:
    """The repository's commit, with "+changes" when the tree differs from it (None outside git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def private_cache(folder: Path) -> Path:
    from sftkit.core.paths import models_cache_dir

    folder.mkdir(parents=True)
    (folder / "models").symlink_to(models_cache_dir().resolve(), target_is_directory=True)
    return folder


def run_one(name: str, workdir: Path, timeout: int, keep: Path | None = None) -> float:
    """Seconds from kernel start to the last cell's end; with ``keep``, the executed notebook is written there
    (also when a cell fails: the outputs up to that cell), so the tables it printed can be read afterwards."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="sftkit",
                       resources={"metadata": {"path": str(workdir)}}).execute()
        return time.perf_counter() - t0  # the clock stops when the kernel has shut down, before anything is written
    finally:
        if keep is not None:
            try:
                keep.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, str(keep / name))
            except OSError as exc:  # never hides a cell's error
                print(f"could not keep {name} in {keep}: {exc}", file=sys.stderr)


def table(timings: dict, order: list[str]) -> str:
    def cell(entry: dict | None) -> str:
        return "not measured" if not entry else f"{entry['seconds'] / 60:.1f} min"

    rows = ["| notebook | CPU, as committed | GPU, as committed | CPU, fast profile (CI) |", "| --- | --- | --- | --- |"]
    machines = set()
    for name in order:
        t = timings.get("notebooks", {}).get(name, {})
        for key in ("cpu", "gpu", "fast"):
            if t.get(key):
                machines.add(f"{key}: {t[key]['machine']}, {t[key]['date']}")
        rows.append(f"| `{name}` | {cell(t.get('cpu'))} | {cell(t.get('gpu'))} | {cell(t.get('fast'))} |")
    notes = "".join(f"\n- {m}" for m in sorted(machines))
    return "\n".join(rows) + ("\n\nMeasured on:" + notes if notes else "")


def write_readme_table(timings: dict, order: list[str]) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} markers for the table")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table(timings, order)}\n{END}",
                 text, flags=re.S)
    README.write_text(new)


def main(argv: list[str] | None = None) -> int:
    order = workshop_order()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebooks (e.g. 00_quickstart or 04_training.ipynb); default: all")
    ap.add_argument("--fast", action="store_true", help="the fast profile (the tests' environment variables)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take (default 3600)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="also write each executed notebook, with its outputs, into DIR (a folder outside the repository)")
    args = ap.parse_args(argv)
    names = []
    for n in args.names or order:
        name = n if n.endswith(".ipynb") else n + ".ipynb"
        if name not in order:
            ap.error(f"no notebook {name!r}; the notebooks: {', '.join(order)}")
        names.append(name)
    names.sort(key=order.index)
    if args.keep is not None and args.keep.resolve().is_relative_to(ROOT):
        ap.error(f"--keep {args.keep}: a folder outside the repository (executed copies never replace the notebooks)")
    for var in PROFILE_ENV:  # the full profile is the notebook as committed: no shortening from the caller
        os.environ.pop(var, None)
    if args.fast:
        os.environ.update(FAST_ENV)
    device, words = machine()
    key = "fast" if args.fast else device
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="sftkit-timing-") as tmp:
        os.environ["SFTKIT_CACHE_DIR"] = str(private_cache(Path(tmp) / "cache"))  # the kernels inherit it
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        done = []
        for name in names:
            print(f"{name} ({key}) ...", flush=True)
            load_before = os.getloadavg()[0]
            seconds = run_one(name, workdir, args.timeout, args.keep)
            print(f"{name}: {seconds:.0f} s", flush=True)
            timings.setdefault("notebooks", {}).setdefault(name, {})[key] = {
                "seconds": round(seconds, 1), "date": dt.date.today().isoformat(), "machine": words,
                "after": list(done), "env": {v: os.environ[v] for v in PROFILE_ENV if v in os.environ},
                "commit": commit(), "load_before": round(load_before, 2),  # 1-minute load averages: was the
                "load_after": round(os.getloadavg()[0], 2)}  # machine otherwise idle (about 2 = its own work)?
            done.append(name)
            TIMINGS.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")  # kept even if a later one fails
    write_readme_table(timings, order)
    sys.path.insert(0, str(LAB))
    import build_notebooks

    build_notebooks.main()  # the headers carry the new times
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

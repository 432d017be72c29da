"""Deterministic fault injection for tests: pause the run process at a named phase.

With ``SFTKIT_FAULT_PAUSE_AT=<phase>@<step>`` (or just ``<phase>``) in its environment, the run
process creates the file named by ``SFTKIT_FAULT_READY`` when it reaches that phase and then
waits there for ever, so a test can ``kill -9`` it at exactly that moment. Phases:

    checkpoint_saved      the Trainer wrote checkpoint-N, before its completion marker
    checkpoint_marked     checkpoint-N is marked complete, before older ones are rotated out
    rotation_unmarked     an old checkpoint's marker is gone, its files not yet
    rotation_partial      an old checkpoint is half deleted
    adapter_tmp           the final adapter is written to a temporary folder, not yet swapped in

``SFTKIT_FAULT_RAISE_AT=sample`` makes sample generation raise (a run must go on without it).
``SFTKIT_FAULT_STOP_RANK=<rank>@<step>``: only that process of a multi-process run sees a Stop at
that step (the processes must still leave together). ``SFTKIT_FAULT_NAN_AT_STEP=<step>`` makes a
trained weight NaN before that step.
Without the variables this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PHASES = ("checkpoint_saved", "checkpoint_marked", "rotation_unmarked", "rotation_partial", "adapter_tmp")


def fault_point(phase: str, step: int | None = None) -> None:
    want = os.environ.get("SFTKIT_FAULT_PAUSE_AT")
    if not want:
        return
    name, _, at = want.partition("@")
    if name != phase or (at and step is not None and int(at) != step):
        return
    ready = os.environ.get("SFTKIT_FAULT_READY")
    if ready:
        Path(ready).write_text(f"{phase}@{step}\n", encoding="utf-8")
    while True:  # held here until the test kills the process
        time.sleep(60)


def fault_raise(phase: str) -> None:
    """With ``SFTKIT_FAULT_RAISE_AT=<phase>``, raise a RuntimeError at that phase (e.g. ``sample``)."""
    if os.environ.get("SFTKIT_FAULT_RAISE_AT") == phase:
        raise RuntimeError(f"fault injected at {phase}")

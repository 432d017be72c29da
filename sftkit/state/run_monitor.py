"""The state behind the run launcher: a run being configured (``RunControl``) and a run being
followed (``RunMonitor``). Plain Python: the launcher view binds widgets to these and redraws.

``RunMonitor`` follows one run folder: metrics and samples so far (started over on a rewind),
the state and its message, progress with seconds per step and ETA, curves as numpy arrays,
errors met while reading. ``refresh()`` is safe from several threads (the view's poller and the
notebook both call it) and says whether anything changed.

``RunControl`` turns a base config plus knob values into the config a Start would run (rows from
the notebook go to a content-addressed file in the store), and starts, stops, resumes or attaches.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import SftkitError
from ..core.runconfig import RunConfig
from ..core.runproto import ACTIVE_STATES
from ..core.runstore import RunFolder
from ..engine import launch as launcher

# (trace name, metrics key, scale to display units): the curves a run view shows
CURVES = (
    ("train loss", "loss", 1.0),
    ("eval loss", "eval_loss", 1.0),
    ("learning rate", "lr", 1.0),
    ("grad norm", "grad_norm", 1.0),
    ("tokens/s", "tokens_per_s", 1.0),
    ("memory MiB", "memory", 1 / 2**20),
    # preference runs (dpo / kto): TRL's rewards; accuracy = share of pairs whose chosen answer gained more
    ("pref. accuracy", "rewards/accuracies", 1.0),
    ("held-out pref. accuracy", "eval_rewards/accuracies", 1.0),
    ("reward margin", "rewards/margins", 1.0),
    ("chosen reward", "rewards/chosen", 1.0),
    ("rejected reward", "rewards/rejected", 1.0),
)


def _value(row: dict, key: str):
    if key == "memory":
        return row.get("memory_cuda_peak", row.get("memory_rss"))
    return row.get(key)


def curve_arrays(metrics: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of CURVES: (steps, values) as float arrays, skipping rows without the value."""
    out = []
    for _, key, scale in CURVES:
        pts = [(r["step"], v) for r in metrics
               if isinstance(v := _value(r, key), (int, float)) and not isinstance(v, bool)]
        x = np.fromiter((p[0] for p in pts), dtype=np.float64, count=len(pts))
        y = np.fromiter((p[1] for p in pts), dtype=np.float64, count=len(pts)) * scale
        out.append((x, y))
    return out


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    seconds_per_step: float | None
    eta_seconds: float | None

    @property
    def label(self) -> str:
        text = f"step {self.step}/{self.total}" if self.total else f"step {self.step}"
        if self.seconds_per_step is not None:
            text += f" · {self.seconds_per_step:.2f} s/step"
        if self.eta_seconds is not None:
            text += f" · ETA {format_eta(self.eta_seconds)}"
        return text


def progress_of(step: int, total: int, metrics: Sequence[dict], active: bool) -> Progress:
    """Seconds per step from the last ten timed lines; an ETA while the run is active."""
    timed = [m for m in metrics if isinstance(m.get("steps_per_s"), (int, float)) and m["steps_per_s"] > 0][-10:]
    if not timed:
        return Progress(step, total, None, None)
    sec = sum(1 / m["steps_per_s"] for m in timed) / len(timed)
    return Progress(step, total, sec, sec * (total - step) if total and active else None)


@dataclass
class Change:
    """What one refresh found: ``data`` when curves or samples changed, ``rewound`` when the run
    started its curves over (a resume), ``status`` always."""

    state: str
    message: str
    data: bool = False
    rewound: bool = False


def batching_line(event: dict) -> str:
    """The run's ``batching`` event in words: packing chosen or not and why, the loss path, the passes."""
    line = str(event.get("message", ""))
    if event.get("loss"):
        line += f"; loss: {event['loss']}"
    if event.get("max_pass_tokens"):
        line += f"; passes of at most {event['max_pass_tokens']} tokens"
    return line


class RunMonitor:
    """Follows one run (a RunHandle) for a view."""

    def __init__(self, handle: launcher.RunHandle | None = None):
        self._lock = threading.RLock()
        self.handle: launcher.RunHandle | None = None
        self.metrics: list[dict] = []
        self.samples: list[dict] = []
        self.state, self.message = "idle", ""
        self.batching = ""  # how the run batches and computes its loss, from its events
        self.warnings: list[str] = []  # the run's own warning events (e.g. a resume in another precision)
        self.step, self.total = 0, 0
        self.errors = 0
        self.last_error: Exception | None = None
        if handle is not None:
            self.follow(handle)

    def follow(self, handle: launcher.RunHandle) -> None:
        with self._lock:
            self.handle = handle
            self.metrics, self.samples = [], []
            self.state, self.message, self.batching = "pending", "", ""
            self.warnings = []

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def refresh(self) -> Change:
        """Read what the run wrote since the last look (raises what reading raised)."""
        with self._lock:
            if self.handle is None:
                return Change("idle", "")
            update = self.handle.poll()
            if update.rewound:
                self.metrics, self.samples = [], []
            self.metrics += update.metrics
            self.samples += update.samples
            for event in update.events:
                if event.get("event") == "batching":
                    self.batching = batching_line(event)
                elif event.get("event") == "warning" and event.get("message"):
                    self.warnings.append(str(event["message"]))
            self.state, self.message = update.state, update.message
            self.step, self.total = update.status.step, update.status.max_steps or 0
            return Change(update.state, update.message, data=not update.empty, rewound=update.rewound)

    def safe_refresh(self) -> Change | None:
        """refresh(), with any error counted and kept (for a poller that must go on)."""
        try:
            return self.refresh()
        except Exception as exc:  # noqa: BLE001 - a view shows it and keeps polling
            with self._lock:
                self.errors += 1
                self.last_error = exc
            return None

    def snapshot(self) -> tuple[list[dict], list[dict]]:
        with self._lock:
            return list(self.metrics), list(self.samples)

    def curves(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return curve_arrays(self.snapshot()[0])

    def progress(self) -> Progress:
        with self._lock:
            return progress_of(self.step, self.total, self.metrics, self.active)

    def can_resume(self) -> bool:
        return not self.active and self.handle is not None and self.handle.run.last_checkpoint() is not None


@dataclass
class RunControl:
    """A run being set up: the base config, the knobs' values on top, and the actions."""

    base_config: RunConfig
    rows: list[dict] | None = None  # rows from the notebook (written to the store at Start)
    in_kernel: bool = False
    knobs: dict[str, Any] = field(default_factory=dict)  # dotted field -> value

    @classmethod
    def create(cls, config: RunConfig | None = None, *, template=None, plan=None, anatomy=None, data=None,
               in_kernel: bool = False) -> "RunControl":
        """config (default: the example) with a template, a plan (+ the anatomy it was made on)
        and data (a source string or a list of row dicts) from the notebook."""
        if config is None:
            from ..core.examples import example_config

            config = example_config()
        changes: dict = {}
        if template is not None:
            changes["template"] = template
        if plan is not None:
            if anatomy is None:
                raise SftkitError("plan= needs anatomy= too (picker.anatomy): the config stores module names")
            changes["adapter"] = plan.to_adapter(anatomy).__dict__
        rows = None
        if data is not None:
            if isinstance(data, (list, tuple)):
                rows = [dict(r) for r in data]
                changes["data"] = {"source": "(rows from the notebook)"}
            else:
                changes["data"] = {"source": str(data)}
        base = config.with_changes(**changes) if changes else config
        return cls(base, rows=rows, in_kernel=in_kernel)

    @property
    def config(self) -> RunConfig:
        """The base config with the knobs applied (raises naming the field if one is out of range)."""
        sections: dict[str, dict] = {}
        top: dict[str, Any] = {}
        for dotted, value in self.knobs.items():
            if "." in dotted:
                section, name = dotted.split(".", 1)
                sections.setdefault(section, {})[name] = value
            else:
                top[dotted] = value
        return self.base_config.with_changes(**sections, **top) if (sections or top) else self.base_config

    def config_for_launch(self) -> RunConfig:
        """The config a Start runs: notebook rows go to a content-addressed JSONL in the store."""
        cfg = self.config
        if self.rows is not None:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            path = Path(cfg.store).expanduser().resolve() / "data" / f"rows-{digest}.jsonl"
            if not path.exists():
                from ..core.atomic import write_text_atomic

                write_text_atomic(path, text)
            cfg = cfg.with_changes(data={"source": str(path)})
        return cfg

    def policy_words(self) -> str:
        """The device policy this config gets, in words (what runs where, in which precision)."""
        from ..engine.models import plan_load

        m = self.config.model
        return plan_load(m.quantization, m.device, m.dtype, m.attn_implementation).describe()

    def export_yaml(self, path: str | Path | None = None, *, overwrite: bool = False) -> Path:
        """Write the config a Start would run. An existing file is replaced only if it is a run
        config itself (an earlier export) or ``overwrite``: never a file of the user's."""
        cfg = self.config_for_launch()
        path = Path(path or f"{cfg.name}.yaml")
        if path.exists() and not overwrite:
            try:
                RunConfig.load(path)
            except SftkitError:
                raise SftkitError(f"{path} exists and is not a run config; not overwritten (give another path, "
                                  "or overwrite=True)") from None
        cfg.save(path)
        return path

    def start(self) -> launcher.RunHandle:
        cfg = self.config_for_launch()
        return launcher.launch_in_kernel(cfg) if self.in_kernel else launcher.launch(cfg)

    @staticmethod
    def resume(run: RunFolder, max_steps: int | None = None, allow_changed_data: bool = False) -> launcher.RunHandle:
        return launcher.resume(run, max_steps=max_steps, allow_changed_data=allow_changed_data)

    @staticmethod
    def attach(run: str | Path | RunFolder) -> launcher.RunHandle:
        return launcher.attach(run)

"""RunLauncher: configure, start, stop, resume and watch a run from a notebook.

A thin view over ``sftkit.engine.launch`` (the run is its own process, ``sftkit train``)
and the run folder it writes (followed with ``sftkit.core.follow``). Curves update in
place in a plotly FigureWidget from a poller thread: numpy arrays, one ``batch_update`` per
redraw, at most ``1 / min_redraw_s`` redraws a second.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import time
from pathlib import Path

import ipywidgets as W
import plotly.graph_objects as go

from ..core.errors import SftkitError
from ..core.runconfig import LR_SCHEDULES, RunConfig
from ..core.runproto import ACTIVE_STATES
from ..core.runstore import RunFolder
from ..core.template import Template
from ..engine import launch as launcher
from . import run_figures

STATE_COLOURS = {"pending": "#6b7280", "running": "#2563eb", "stopping": "#d97706", "finished": "#047857",
                 "stopped": "#d97706", "failed": "#b91c1c", "interrupted": "#b91c1c", "idle": "#6b7280"}


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


class RunLauncher:
    """Start and watch a training run.

    config: a RunConfig (default: the example config).
    template: a Template (e.g. ``builder.template``) to train with instead of the config's.
    plan, anatomy: a FreezePlan (e.g. ``picker.plan``) and the model anatomy it was made on
        (``picker.anatomy``); stored in the config as preset + additions/removals.
    data: a data source (``"teaching:dates"``, a file path) or a list of row dicts.
    run: attach to an existing run folder instead (e.g. after a kernel restart).
    in_kernel: run in a thread of this kernel instead of a process of its own (tiny models,
        quick experiments; the run then ends with the kernel).
    """

    def __init__(self, config: RunConfig | None = None, *, template: Template | None = None, plan=None,
                 anatomy=None, data=None, run: str | Path | RunFolder | None = None, in_kernel: bool = False,
                 poll_s: float = 0.5, min_redraw_s: float = 0.5):
        self.in_kernel = in_kernel
        if config is None:
            from ..core.examples import example_config

            config = example_config()
        changes: dict = {}
        if template is not None:
            changes["template"] = template
        if plan is not None:
            if anatomy is None:
                raise SftkitError("plan= needs anatomy= too (picker.anatomy): the config stores module names")
            from ..engine.train import adapter_config_from_plan

            changes["adapter"] = adapter_config_from_plan(plan, anatomy).__dict__
        self._rows = None
        if data is not None:
            if isinstance(data, (list, tuple)):
                self._rows = [dict(r) for r in data]
                changes["data"] = {"source": "(rows from the notebook)"}
            else:
                changes["data"] = {"source": str(data)}
        self.base_config = config.with_changes(**changes) if changes else config
        self.poll_s, self.min_redraw_s = poll_s, min_redraw_s
        self.handle: launcher.RunHandle | None = None
        self._metrics: list[dict] = []
        self._samples: list[dict] = []
        self._lock = threading.Lock()
        self._refresh_lock = threading.RLock()
        self.errors = 0  # errors met while following (shown in the message area)
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._last_redraw = 0.0
        self.redraws = 0
        self._build()
        if run is not None:
            self.attach(run)

    # ---- widgets --------------------------------------------------------------------------
    def _build(self):
        t = self.base_config.training
        style = {"description_width": "150px"}
        lay = W.Layout(width="300px")
        self.name = W.Text(value=self.base_config.name, description="run name", style=style, layout=lay)
        self.max_steps = W.BoundedIntText(value=t.max_steps or 0, min=0, max=10**7, description="max steps (0: epochs)",
                                          style=style, layout=lay)
        self.epochs = W.BoundedFloatText(value=t.epochs, min=0.01, max=1000, description="epochs", style=style,
                                         layout=lay)
        self.batch_size = W.BoundedIntText(value=t.batch_size, min=1, max=4096, description="batch size",
                                           style=style, layout=lay)
        self.grad_accum = W.BoundedIntText(value=t.grad_accum, min=1, max=1024, description="grad accumulation",
                                           style=style, layout=lay)
        self.learning_rate = W.FloatLogSlider(value=t.learning_rate, base=10, min=-6, max=-1, step=0.1,
                                              description="learning rate", readout_format=".1e", style=style,
                                              layout=lay)
        self.lr_schedule = W.Dropdown(options=LR_SCHEDULES, value=t.lr_schedule, description="schedule",
                                      style=style, layout=lay)
        self.eval_every = W.BoundedIntText(value=t.eval_every, min=0, max=10**6, description="eval every (steps)",
                                           style=style, layout=lay)
        self.sample_every = W.BoundedIntText(value=t.sample_every, min=0, max=10**6,
                                             description="samples every (steps)", style=style, layout=lay)
        self.checkpoint_every = W.BoundedIntText(value=t.checkpoint_every, min=1, max=10**6,
                                                 description="checkpoint every", style=style, layout=lay)
        self.packing = W.Checkbox(value=t.packing, description="packing (no padding)", indent=False)
        self.grad_ckpt = W.Checkbox(value=t.gradient_checkpointing, description="gradient checkpointing",
                                    indent=False)
        self.quantization = W.Dropdown(options=("auto", "4bit", "8bit", "none"),
                                       value=self.base_config.model.quantization, description="quantization",
                                       style=style, layout=lay)
        knobs = [self.name, self.max_steps, self.epochs, self.batch_size, self.grad_accum, self.learning_rate,
                 self.lr_schedule, self.eval_every, self.sample_every, self.checkpoint_every, self.quantization,
                 self.packing, self.grad_ckpt]
        for k in knobs:
            k.observe(self._on_knob, "value")
        self.policy = W.HTML()
        self.yaml_view = W.HTML()
        self.message = W.HTML()
        self.start_button = W.Button(description="Start", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.resume_button = W.Button(description="Resume", icon="repeat", disabled=True)
        self.export_button = W.Button(description="Export YAML", icon="download")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.resume())
        self.export_button.on_click(lambda _: self.export_yaml())
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="320px"))
        self.progress_label = W.Label("")
        self.state_label = W.HTML()
        self.figure = go.FigureWidget(run_figures.run_figure(title=""))
        self.samples = W.HTML(run_figures.samples_html([]), layout=W.Layout(width="330px", max_height="440px",
                                                                          overflow="auto"))
        config_box = W.VBox([W.HTML("<b>Main knobs</b> (the rest: <code>launcher.config</code>)"), *knobs[:-2],
                             W.HBox([self.packing, self.grad_ckpt]), self.export_button])
        details = W.Accordion(children=[self.yaml_view])
        details.set_title(0, "the whole config (YAML, what `sftkit train` gets)")
        self.widget = W.VBox([
            W.HBox([config_box, W.VBox([self.policy, details], layout=W.Layout(width="100%"))]),
            W.HBox([self.start_button, self.stop_button, self.resume_button, self.state_label]),
            W.HBox([self.progress, self.progress_label]),
            self.message,
            W.HBox([self.figure, W.VBox([W.HTML("<b>Samples</b> (held-out prompts)"), self.samples])]),
        ])
        self._on_knob()
        self._set_state("idle")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- config ---------------------------------------------------------------------------
    @property
    def config(self) -> RunConfig:
        """The base config with the knobs applied (raises naming the field if a knob is out of range)."""
        return self.base_config.with_changes(
            name=self.name.value.strip() or "run",
            model={"quantization": self.quantization.value},
            training={"max_steps": self.max_steps.value or None, "epochs": float(self.epochs.value),
                      "batch_size": self.batch_size.value, "grad_accum": self.grad_accum.value,
                      "learning_rate": float(f"{self.learning_rate.value:.3g}"),
                      "lr_schedule": self.lr_schedule.value, "eval_every": self.eval_every.value,
                      "sample_every": self.sample_every.value, "checkpoint_every": self.checkpoint_every.value,
                      "packing": self.packing.value, "gradient_checkpointing": self.grad_ckpt.value})

    def _on_knob(self, change=None):
        try:
            cfg = self.config
        except SftkitError as exc:
            self.message.value = f"<span style='color:#b91c1c'>{html.escape(str(exc))}</span>"
            return
        self.message.value = ""
        self.yaml_view.value = f"<pre style='font-size:11px;max-height:300px;overflow:auto'>{html.escape(cfg.to_yaml())}</pre>"
        if change is not None and change.get("owner") is not self.quantization:
            return  # only the quantization knob changes the device policy
        try:
            from ..engine.models import plan_load

            words = plan_load(cfg.model.quantization, cfg.model.device, cfg.model.dtype,
                              cfg.model.attn_implementation).describe()
            self.policy.value = "<b>Device policy</b><br>" + html.escape(words).replace("\n", "<br>")
        except SftkitError as exc:
            self.policy.value = f"<span style='color:#b91c1c'>{html.escape(str(exc))}</span>"

    def export_yaml(self, path: str | Path | None = None) -> Path:
        """Write the config the Start button would run (for ``sftkit train``)."""
        cfg = self._config_for_launch()
        path = Path(path or f"{cfg.name}.yaml")
        cfg.save(path)
        self.message.value = f"wrote <code>{html.escape(str(path))}</code>: run it with <code>sftkit train {html.escape(str(path))}</code>"
        return path

    def _config_for_launch(self) -> RunConfig:
        cfg = self.config
        if self._rows is not None:  # rows from the notebook go to a file the run process can read
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows)
            digest = hashlib.sha1(text.encode()).hexdigest()[:12]
            path = Path(cfg.store).expanduser().resolve() / "data" / f"rows-{digest}.jsonl"
            if not path.exists():
                from ..core.atomic import write_text_atomic

                write_text_atomic(path, text)
            cfg = cfg.with_changes(data={"source": str(path)})
        return cfg

    # ---- actions ----------------------------------------------------------------------------
    def start(self):
        """Start a new run (errors in data, template or settings show here; nothing starts)."""
        try:
            cfg = self._config_for_launch()
            handle = launcher.launch_in_kernel(cfg) if self.in_kernel else launcher.launch(cfg)
        except Exception as exc:  # noqa: BLE001 - every error of a button goes to the message area
            self._error(exc)
            return None
        self._follow(handle, reset=True)
        return handle

    def stop(self):
        """Ask the run to stop at the next step boundary (it saves the adapter)."""
        if self.handle is not None:
            self.handle.stop()
            self._set_state("stopping")

    def resume(self, max_steps: int | None = None, *, allow_changed_data: bool = False):
        """Continue the current run from its last checkpoint (max_steps: a new total)."""
        if self.handle is None:
            return None
        try:
            handle = launcher.resume(self.handle.run, max_steps=max_steps, allow_changed_data=allow_changed_data)
        except Exception as exc:  # noqa: BLE001
            self._error(exc)
            return None
        self._follow(handle, reset=True)
        return handle

    def attach(self, run: str | Path | RunFolder):
        """Follow a run folder (started by another kernel or by `sftkit train`)."""
        self._follow(launcher.attach(run), reset=True)
        return self.handle

    def _error(self, exc: Exception, what: str = "Not started"):
        text = str(exc) if isinstance(exc, SftkitError) else f"{type(exc).__name__}: {exc}"
        self.message.value = f"<span style='color:#b91c1c'><b>{html.escape(what)}:</b> {html.escape(text)}</span>"

    def _follow(self, handle: launcher.RunHandle, reset: bool):
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.handle = handle
        with self._lock:
            self._metrics, self._samples = [], []
        notes = "".join(f"<br><span style='color:#92400e'>&#9888; {html.escape(line)}</span>"
                        for report in handle.reports for line in report.lines())
        self.message.value = f"run folder: <code>{html.escape(str(handle.run.path))}</code>{notes}"
        self._stop_polling = threading.Event()
        try:
            state = self.refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - shown; the poller keeps trying
            self.errors += 1
            self._error(exc, "Following the run failed (still trying)")
            state = "pending"
        if state in ACTIVE_STATES:  # an ended run needs no poller
            self._poller = threading.Thread(target=self._poll_loop, args=(self._stop_polling,), daemon=True)
            self._poller.start()
        else:
            self._poller = None

    # ---- following ---------------------------------------------------------------------------
    def _poll_loop(self, stop: threading.Event):
        """Follow the run until it ends; an error is shown in the message area and polling goes on."""
        while not stop.is_set():
            try:
                state = self.refresh()
                if state not in ACTIVE_STATES:
                    self.refresh(force=True)
                    return
            except Exception as exc:  # noqa: BLE001 - a failed look must not freeze the view
                self.errors += 1
                self._error(exc, "Following the run failed (still trying)")
            stop.wait(self.poll_s)

    def refresh(self, force: bool = False) -> str:
        """Read what the run wrote since the last look and redraw (throttled)."""
        if self.handle is None:
            return "idle"
        with self._refresh_lock:  # the poller thread and the notebook both call this
            return self._refresh(force)

    def _refresh(self, force: bool) -> str:
        update = self.handle.poll()
        with self._lock:
            if update.rewound:
                self._metrics, self._samples = [], []
            self._metrics += update.metrics
            self._samples += update.samples
            metrics, samples = list(self._metrics), list(self._samples)
        now = time.monotonic()
        if force or (not update.empty and now - self._last_redraw >= self.min_redraw_s):
            self._redraw(metrics, samples)
            self._last_redraw = now
        self._show_status(update.status, update.state, update.message, metrics)
        return update.state

    def _redraw(self, metrics: list[dict], samples: list[dict]):
        arrays = run_figures.curve_arrays(metrics)
        with self.figure.batch_update():
            for trace, (x, y) in zip(self.figure.data, arrays):
                trace.x, trace.y = x, y
        self.samples.value = run_figures.samples_html(samples)
        self.redraws += 1

    def _show_status(self, status, state: str, message: str, metrics: list[dict]):
        step, total = status.step, status.max_steps or 0
        self.progress.max = max(int(total), 1)
        self.progress.value = min(step, self.progress.max)
        timed = [m for m in metrics if "steps_per_s" in m and m["steps_per_s"] > 0][-10:]
        label = f"step {step}/{total}" if total else f"step {step}"
        if timed:
            sec_per_step = sum(1 / m["steps_per_s"] for m in timed) / len(timed)
            label += f" · {sec_per_step:.2f} s/step"
            if total and state in ACTIVE_STATES:
                label += f" · ETA {_eta(sec_per_step * (total - step))}"
        self.progress_label.value = label
        self._set_state(state, message)

    def _set_state(self, state: str, message: str = ""):
        colour = STATE_COLOURS.get(state, "#111827")
        self.state_label.value = (f"<b style='color:{colour}'>{html.escape(state)}</b> "
                                  f"<span style='color:#374151'>{html.escape(message or '')}</span>")
        active = state in ACTIVE_STATES
        self.start_button.disabled = active
        self.stop_button.disabled = not active or state == "stopping"
        can_resume = (not active and self.handle is not None and self.handle.run.last_checkpoint() is not None)
        self.resume_button.disabled = not can_resume

    @property
    def state(self) -> str:
        return self.handle.state if self.handle is not None else "idle"

    def wait(self, timeout: float | None = None) -> str:
        """Block until the run ends (scripts and tests; the notebook never needs it)."""
        if self.handle is None:
            return "idle"
        state = self.handle.wait(timeout)
        if self._poller is not None:
            self._poller.join(timeout=10)
        self.refresh(force=True)
        return state

    # ---- static copies ---------------------------------------------------------------------
    def static_figure(self) -> go.Figure:
        with self._lock:
            metrics = list(self._metrics)
        title = self.handle.run.name if self.handle is not None else ""
        return run_figures.run_figure(metrics, title=title)

    def snapshot(self):
        """Display a static copy (figure + metrics table + samples), kept in the saved notebook."""
        from IPython.display import HTML, display

        with self._lock:
            metrics, samples = list(self._metrics), list(self._samples)
        display(self.static_figure())
        display(HTML(run_figures.metrics_table_html(metrics) + run_figures.samples_html(samples)))

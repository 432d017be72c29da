"""RunLauncher: configure, start, stop, resume and watch a run from a notebook.

Wiring only: the knobs (built from the config fields' own metadata) are bound to a ``RunControl``
(the config a Start runs, in ``sftkit.state``); the live part is a ``RunView`` over a ``RunMonitor``.
Every error of a button or of the poller is shown in the message area, and polling goes on.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W

from ..core.runconfig import RunConfig
from ..core.runproto import ACTIVE_STATES
from ..core.runstore import RunFolder
from ..core.template import Template
from ..state.run_monitor import RunControl
from .help import add_tips
from .knobs import knob_value, knob_widget
from .render import error_html
from .run_view import RunView

# the knobs shown (dotted config fields, in order); the rest is in the YAML below them
KNOBS = ("name", "training.max_steps", "training.epochs", "training.batch_size", "training.grad_accum",
         "training.learning_rate", "training.lr_schedule", "training.eval_every", "training.sample_every",
         "training.checkpoint_every", "model.quantization", "training.packing", "training.max_pass_tokens",
         "training.group_by_length",
         "training.gradient_checkpointing")
ATTRIBUTE = {"training.gradient_checkpointing": "grad_ckpt"}  # widget attribute names kept from earlier versions


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
        self.control = RunControl.create(config, template=template, plan=plan, anatomy=anatomy, data=data,
                                         in_kernel=in_kernel)
        self.view = RunView(poll_s=poll_s, min_redraw_s=min_redraw_s, on_state=self._enable_buttons)
        self.monitor = self.view.monitor
        self._build()
        if run is not None:
            self.attach(run)

    # the live part is the RunView's; these names are the launcher's public face
    message = property(lambda self: self.view.message)
    state_label = property(lambda self: self.view.state_label)
    progress = property(lambda self: self.view.progress)
    progress_label = property(lambda self: self.view.progress_label)
    figure = property(lambda self: self.view.figure)
    samples = property(lambda self: self.view.samples)
    redraws = property(lambda self: self.view.redraws)
    errors = property(lambda self: self.view.errors)
    _poller = property(lambda self: self.view._poller)
    handle = property(lambda self: self.monitor.handle)

    def refresh(self, force: bool = False) -> str:
        return self.view.refresh(force)

    def static_figure(self):
        return self.view.static_figure()

    def snapshot(self):
        """Display a static copy (figure + metrics table + samples), kept in the saved notebook."""
        self.view.snapshot()

    # ---- widgets --------------------------------------------------------------------------
    def _build(self):
        style, lay = {"description_width": "175px"}, W.Layout(width="330px")
        cfg = self.control.base_config
        self.knobs: dict[str, W.Widget] = {}
        for dotted in KNOBS:
            section, _, name = dotted.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, name)
            widget = knob_widget(dotted, value, style, lay)
            widget.observe(self._on_knob, "value")
            self.knobs[dotted] = widget
            setattr(self, ATTRIBUTE.get(dotted, name), widget)
        self.policy, self.yaml_view = W.HTML(), W.HTML()
        self.start_button = W.Button(description="Start", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.resume_button = W.Button(description="Resume", icon="repeat", disabled=True)
        self.export_button = W.Button(description="Export YAML", icon="download")
        for button, action in ((self.start_button, self.start), (self.stop_button, self.stop),
                               (self.resume_button, self.resume), (self.export_button, self.export_yaml)):
            button.on_click(lambda _, act=action: self._guard(act))
        add_tips(self)
        toggles = [w for w in self.knobs.values() if isinstance(w, W.Checkbox)]
        fields = [w for w in self.knobs.values() if not isinstance(w, W.Checkbox)]
        config_box = W.VBox([W.HTML("<b>Main knobs</b> (the rest: <code>launcher.config</code>)"), *fields,
                             W.HBox(toggles), self.export_button])
        details = W.Accordion(children=[self.yaml_view])
        details.set_title(0, "the whole config (YAML, what `sftkit train` gets)")
        v = self.view
        self.widget = W.VBox([
            W.HBox([config_box, W.VBox([self.policy, details], layout=W.Layout(width="100%"))]),
            W.HBox([self.start_button, self.stop_button, self.resume_button, v.state_label]),
            W.HBox([v.progress, v.progress_label]), v.message, v.curves])
        self._on_knob()
        v.set_state("idle")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- config ---------------------------------------------------------------------------
    @property
    def base_config(self) -> RunConfig:
        return self.control.base_config

    @property
    def config(self) -> RunConfig:
        """The base config with the knobs applied (raises naming the field if a knob is out of range)."""
        self.control.knobs = {d: knob_value(d, w) for d, w in self.knobs.items()}
        return self.control.config

    def _on_knob(self, change=None):
        try:
            cfg = self.config
        except Exception as exc:  # noqa: BLE001 - an observer's error is shown, never lost
            self.view.show_error(exc, "Setting refused")
            return
        self.message.value = ""
        self.yaml_view.value = f"<pre style='font-size:11px;max-height:300px;overflow:auto'>{html.escape(cfg.to_yaml())}</pre>"
        if change is not None and change.get("owner") is not self.quantization:
            return  # only the quantization knob changes the device policy
        try:
            words = html.escape(self.control.policy_words()).replace("\n", "<br>")
            self.policy.value = f"<b>Device policy</b><br>{words}"
        except Exception as exc:  # noqa: BLE001
            self.policy.value = error_html(exc, "No device policy")

    def export_yaml(self, path: str | Path | None = None) -> Path:
        """Write the config the Start button would run (for ``sftkit train``)."""
        self.config  # noqa: B018 - the knobs' values into the control
        path = self.control.export_yaml(path)
        self.message.value = (f"wrote <code>{html.escape(str(path))}</code>: run it with "
                              f"<code>sftkit train {html.escape(str(path))}</code>")
        return path

    # ---- actions ----------------------------------------------------------------------------
    def _guard(self, action):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - every error of a button goes to the message area
            self.view.show_error(exc, "Failed")
            return None

    def start(self):
        """Start a new run (errors in data, template or settings show here; nothing starts)."""
        try:
            self.config  # noqa: B018
            handle = self.control.start()
        except Exception as exc:  # noqa: BLE001
            self.view.show_error(exc, "Not started")
            return None
        self.view.follow(handle)
        return handle

    def stop(self):
        """Ask the run to stop at the next step boundary (it saves the adapter)."""
        if self.handle is not None:
            self.handle.stop()
            self.view.set_state("stopping")

    def resume(self, max_steps: int | None = None, *, allow_changed_data: bool = False):
        """Continue the current run from its last checkpoint (max_steps: a new total)."""
        if self.handle is None:
            return None
        try:
            handle = self.control.resume(self.handle.run, max_steps, allow_changed_data)
        except Exception as exc:  # noqa: BLE001
            self.view.show_error(exc, "Not resumed")
            return None
        self.view.follow(handle)
        return handle

    def attach(self, run: str | Path | RunFolder):
        """Follow a run folder (started by another kernel or by `sftkit train`)."""
        self.view.follow(self.control.attach(run))
        return self.handle

    def _enable_buttons(self, state: str) -> None:
        active = state in ACTIVE_STATES
        self.start_button.disabled = active
        self.stop_button.disabled = not active or state == "stopping"
        self.resume_button.disabled = active or not self.monitor.can_resume()

    @property
    def state(self) -> str:
        return self.handle.state if self.handle is not None else "idle"

    def wait(self, timeout: float | None = None) -> str:
        """Block until the run ends (scripts and tests; the notebook never needs it)."""
        if self.handle is None:
            return "idle"
        state = self.handle.wait(timeout)
        self.view.wait_poller()
        self.refresh(force=True)
        return state

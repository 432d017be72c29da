"""PromptBuilder: edit a Template and see, as you type, which tokens are trained.

Wiring over ``sftkit.state.PromptDraft``, which holds the template being edited, the preview,
the warnings, the few-shot examples and "try it": the controls write into the draft and the
view redraws when it changes. What stays here is a view's own: the pause after typing, the
streamed answer, and the HTML.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Sequence

import ipywidgets as W

from ..core.template import Template
from ..state.prompt_draft import EXAMPLES, HELP, MODES, PromptDraft, error_text
from . import render
from .help import add_tips


def _from_draft(name: str) -> property:
    """The draft's attribute or method under the same name (the builder's public API of old)."""
    return property(lambda self: getattr(self.draft, name), doc=f"``PromptDraft.{name}``.")


class PromptBuilder:
    """Template editor with a live loss-mask preview and a "Try it" button.

    rows: the data (list of dicts, a .jsonl/.csv path, or a datasets.Dataset).
    tokenizer: renders the preview; model (optional) answers "Try it".
    template: the starting Template; by default the first column is the question and
        the last the answer.
    debounce: seconds to wait after typing before the preview updates (0: at once).
    method: a prompt method (a FreezePlan, PlanEditor, RunConfig or preset name) whose virtual
        tokens the preview shows in front of the prompt; ``set_method`` changes it later. A PlanEditor
        is followed: the preview changes with its plan.
    The state it edits is ``self.draft``, a ``PromptDraft``.

    Any error while previewing, checking or trying (a template that doesn't fit the data,
    a tokenizer's chat template that raises, ...) is shown in the view's message area,
    never raised into the kernel or lost in a background thread; the view keeps working.
    """

    rows = _from_draft("rows")
    columns = _from_draft("columns")
    tokenizer = _from_draft("tokenizer")
    error = _from_draft("error")
    rendered = _from_draft("rendered")
    warnings = _from_draft("warnings")
    notes = _from_draft("notes")
    template = _from_draft("template")  # the one to hand to the layer picker and the run launcher
    build_template = _from_draft("build_template")
    add_example = _from_draft("add_example")
    remove_example = _from_draft("remove_example")
    move_example = _from_draft("move_example")
    refresh = _from_draft("refresh")  # re-render the selected row; errors go to the message area
    set_method = _from_draft("set_method")  # a prompt method's virtual tokens in front of the preview
    check_all = _from_draft("check_all")  # validate every row and show the warnings; the report
    stop = _from_draft("stop_try")
    wait = _from_draft("wait_try")  # block until a running "Try it" finishes (scripts and tests)
    running = _from_draft("trying")

    def __init__(self, rows: Any, tokenizer, model=None, template: Template | None = None, *,
                 debounce: float = 0.3, max_new_tokens: int = 64, method: Any = None):
        self.draft = PromptDraft(rows, tokenizer, template, method=method)
        self.model, self.debounce, self.max_new_tokens = model, debounce, max_new_tokens
        self.answer_text = ""
        self._timer: threading.Timer | None = None
        self._shown = None  # the draft's Preview the preview widget shows
        self._make_controls()
        add_tips(self)
        self._bind()
        self.widget = W.VBox([
            W.HTML("<b>Prompt template</b>"), self.system, self.pattern,
            W.HBox([self.answer_field, self.prefix]), W.HBox([self.train_on, self.max_length]),
            W.HTML("<b>Few-shot examples</b> (earlier turns of the conversation)"), self.examples_box,
            W.HBox([self.add_row_button, self.add_blank_button]),
            W.HTML("<b>Preview</b>"), W.HBox([self.row, self.mode, self.check_button]),
            self.stats, self.messages, self.preview,
            W.HBox([self.try_button, self.stop_button]), self.answer,
        ])
        self.draft.on_change(self._redraw)
        self._redraw(EXAMPLES)

    def _make_controls(self) -> None:
        d, box, wide = self.draft, W.Layout(width="100%", height="60px"), W.Layout(width="auto")
        self.system = W.Textarea(value=d.system, description="System", placeholder="(chat template default)",
                                 layout=box, tooltip=HELP["system"])
        self.pattern = W.Textarea(value=d.user_pattern, description="User", layout=box,
                                  tooltip=HELP["user_pattern"])
        self.answer_field = W.Dropdown(options=d.columns, value=d.answer_field, description="Answer",
                                       tooltip=HELP["answer_field"])
        self.prefix = W.Text(value=d.assistant_prefix, description="Prefix", tooltip=HELP["assistant_prefix"])
        self.train_on = W.ToggleButtons(options=["completion", "all"], value=d.train_on,
                                        description="Train on", tooltips=[HELP["train_on"]] * 2)
        self.max_length = W.BoundedIntText(value=d.max_length, min=8, max=32768, description="Max tokens")
        self.row = W.BoundedIntText(value=0, min=0, max=len(d.rows) - 1, description=f"Row (of {len(d.rows)})",
                                    style={"description_width": "initial"}, layout=W.Layout(width="180px"))
        self.mode = W.ToggleButtons(options=list(MODES), value=d.mode, description="Mode")
        self.add_row_button = W.Button(description="Add this row as example", icon="plus", layout=wide)
        self.add_blank_button = W.Button(description="Add blank example", icon="plus", layout=wide)
        self.check_button = W.Button(description="Check all rows", icon="check", layout=wide)
        self.try_button = W.Button(description="Try it", button_style="primary", icon="play",
                                   disabled=self.model is None,
                                   tooltip="Run the base model on this row" if self.model else "pass model= to try")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.examples_box, self.stats, self.messages = W.VBox(), W.HTML(), W.HTML()
        self.preview, self.answer = W.HTML(), W.HTML()

    def _bind(self) -> None:
        """Each control writes its draft field (typed ones re-render after the pause); buttons act."""
        d = self.draft
        for name, widget, typed in (("system", self.system, True), ("user_pattern", self.pattern, True),
                                    ("assistant_prefix", self.prefix, True), ("max_length", self.max_length, True),
                                    ("answer_field", self.answer_field, False), ("train_on", self.train_on, False),
                                    ("row_index", self.row, False), ("mode", self.mode, False)):
            widget.observe(self._guard(lambda ch, n=name, t=typed: self._change(
                lambda refresh: d.update(refresh=refresh, **{n: ch["new"]}), typed=t)), names="value")
        for button, action in ((self.add_row_button, d.add_row_example), (self.add_blank_button, d.add_example),
                               (self.check_button, d.check_all), (self.try_button, self.try_it),
                               (self.stop_button, self.stop)):
            button.on_click(self._guard(lambda _b, act=action: act()))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- wiring --------------------------------------------------------------------------------
    def _guard(self, fn: Callable) -> Callable:
        """``fn`` as a widget or timer callback: any exception goes to the message area, escaped."""

        def run(*args):
            try:
                fn(*args)
            except Exception as exc:  # shown in the view; the kernel and the view carry on
                try:
                    self.draft.report_error(exc)
                except Exception:  # the redraw failed too: write the message directly
                    with contextlib.suppress(Exception):
                        self.messages.value = render.messages_html([error_text(exc)], "error")

        return run

    def _change(self, apply: Callable[..., None], *, typed: bool) -> None:
        """Apply an edit to the draft: typed ones re-render once typing pauses, choices at once."""
        later = typed and self.debounce > 0
        apply(refresh=not later)
        if later:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self._guard(self.draft.refresh))
            self._timer.daemon = True
            self._timer.start()

    def _redraw(self, event: str) -> None:
        d = self.draft
        if event == EXAMPLES:
            self._rebuild_examples()
        self.mode.value = d.mode  # adding an example turns few-shot on
        p = d.preview
        if p is not None and p is not self._shown:
            self._shown = p
            v = p.virtual
            self.preview.value = render.tokens_html(p.pieces, p.loss_mask, p.roles, truncated_at=p.cut_at,
                                                    full_length=p.full_length, virtual=p.n_virtual,
                                                    virtual_method=v.method if v else "",
                                                    virtual_label=v.label if v else "")
            self.stats.value = render.stats_html(p.n_tokens, p.n_trained, p.max_length, p.prompt_length,
                                                 virtual=p.n_virtual, virtual_method=v.method if v else "")
        self.messages.value = "".join(render.messages_html([t for k, t in d.messages if k == kind], kind)
                                      for kind in ("error", "info", "warning"))

    def _rebuild_examples(self) -> None:
        """One row per example: its fields as text boxes, then move up, move down, remove."""
        d, boxes = self.draft, []
        for i, ex in enumerate(d.examples):
            inputs = []
            for f, value in ex.items():
                t = W.Text(value=value, description=f, layout=W.Layout(width="45%"),
                           tooltip=f"this example's {f}: the model sees it as an earlier, solved turn")
                t.observe(self._guard(lambda ch, i=i, f=f: self._change(
                    lambda refresh: d.edit_example(i, f, ch["new"], refresh=refresh), typed=True)), names="value")
                inputs.append(t)
            tools = []
            for icon, tip, act in (("arrow-up", "move up", lambda i=i: d.move_example(i, -1)),
                                   ("arrow-down", "move down", lambda i=i: d.move_example(i, +1)),
                                   ("trash", "remove", lambda i=i: d.remove_example(i))):
                tools.append(W.Button(icon=icon, layout=W.Layout(width="36px"), tooltip=tip))
                tools[-1].on_click(self._guard(lambda _b, act=act: act()))
            boxes.append(W.HBox([W.Label(f"{i + 1}."), *inputs, *tools]))
        self.examples_box.children = boxes or [W.HTML("<i>none: zero-shot</i>")]

    # ---- Try it --------------------------------------------------------------------------------
    def try_it(self) -> None:
        """Run the model on the selected row in a background thread, streaming the answer."""
        if self.model is None or self.running:
            return
        self.draft.build_template()  # a template that doesn't fit raises here: the button's guard shows it
        expected, self.answer_text = self.draft.expected_answer(), ""

        def show(running: bool, note: str = "", matches: bool | None = None):
            self.answer.value = render.answer_html(self.answer_text, expected, running=running, note=note,
                                                   matches=matches)

        def on_text(piece: str):
            self.answer_text += piece
            show(True)

        def done(result, error):
            self.answer_text = result.text if result is not None else self.answer_text
            self.try_button.disabled, self.stop_button.disabled = False, True
            show(False, result.note if result else f"failed: {type(error).__name__}: {error}",
                 result.matches if result and result.text else None)

        self.try_button.disabled, self.stop_button.disabled = True, False
        show(True)
        self.draft.start_try(self.model, max_new_tokens=self.max_new_tokens, on_text=on_text,
                             on_done=self._guard(done))


__all__: Sequence[str] = ["PromptBuilder"]

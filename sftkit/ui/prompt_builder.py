"""PromptBuilder: edit a Template and see, as you type, which tokens are trained.

A thin view over ``sftkit.core.template.Template`` and ``sftkit.engine.generate``:
it builds controls, turns them into a Template, and renders the result.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Sequence

import ipywidgets as W

from ..core.data import load_rows
from ..core.template import Template, TemplateError, as_text, check_pattern_columns, placeholders
from ..core.tokens import readable_tokens
from . import render

_HELP = {
    "system": "The system prompt: instructions the model sees before every conversation. "
              "Leave empty to use the chat template's own default.",
    "pattern": "The user turn. {column} placeholders are filled from each data row.",
    "answer": "The column holding the answer: these tokens (and the end-of-turn) are what the model is trained on.",
    "prefix": "Text the assistant turn starts with (part of the prompt, never trained), e.g. 'Answer: '.",
    "train_on": "completion: only the answer and its end-of-turn are trained (the usual choice). "
                "all: every token, prompt included.",
}


class PromptBuilder:
    """Template editor with a live loss-mask preview and a "Try it" button.

    rows: the data (list of dicts, a .jsonl/.csv path, or a datasets.Dataset).
    tokenizer: renders the preview; model (optional) answers "Try it".
    template: the starting Template; by default the first column is the question and
        the last the answer.
    debounce: seconds to wait after typing before the preview updates (0: at once).

    Any error while previewing, checking or trying (a template that doesn't fit the data,
    a tokenizer's chat template that raises, ...) is shown in the view's message area,
    never raised into the kernel or lost in a background thread; the view keeps working.
    """

    def __init__(self, rows: Any, tokenizer, model=None, template: Template | None = None, *,
                 debounce: float = 0.3, max_new_tokens: int = 64):
        self.rows = load_rows(rows)
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r))
        self.tokenizer = tokenizer
        self.model = model
        self.debounce = debounce
        self.max_new_tokens = max_new_tokens
        if template is None:
            template = Template(user_pattern="{%s}" % self.columns[0], answer_field=self.columns[-1])
        self._last_good = template
        self.error: str | None = None
        self.rendered = None
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self._lock = threading.RLock()  # the debounce timer and the kernel's thread both refresh
        self.answer_text = ""
        self._timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._examples: list[dict] = [dict(e) for e in template.examples]
        self._building = True

        self.system = W.Textarea(value=template.system or "", description="System",
                                 placeholder="(chat template default)", layout=W.Layout(width="100%", height="60px"),
                                 tooltip=_HELP["system"])
        self.pattern = W.Textarea(value=template.user_pattern, description="User",
                                  layout=W.Layout(width="100%", height="60px"), tooltip=_HELP["pattern"])
        self.answer_field = W.Dropdown(options=self.columns, value=template.answer_field
                                       if template.answer_field in self.columns else self.columns[-1],
                                       description="Answer", tooltip=_HELP["answer"])
        self.prefix = W.Text(value=template.assistant_prefix, description="Prefix", tooltip=_HELP["prefix"])
        self.train_on = W.ToggleButtons(options=["completion", "all"], value=template.train_on,
                                        description="Train on", tooltips=[_HELP["train_on"]] * 2)
        self.max_length = W.BoundedIntText(value=template.max_length, min=8, max=32768, description="Max tokens")
        self.row = W.BoundedIntText(value=0, min=0, max=len(self.rows) - 1, description=f"Row (of {len(self.rows)})",
                                    style={"description_width": "initial"}, layout=W.Layout(width="180px"))
        self.mode = W.ToggleButtons(options=["zero-shot", "few-shot"],
                                    value="few-shot" if self._examples else "zero-shot", description="Mode")
        self.add_row_button = W.Button(description="Add this row as example", icon="plus", layout=W.Layout(width="auto"))
        self.add_blank_button = W.Button(description="Add blank example", icon="plus", layout=W.Layout(width="auto"))
        self.check_button = W.Button(description="Check all rows", icon="check", layout=W.Layout(width="auto"))
        self.try_button = W.Button(description="Try it", button_style="primary", icon="play",
                                   disabled=model is None,
                                   tooltip="Run the base model on this row" if model else "pass model= to try")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.examples_box = W.VBox()
        self.stats = W.HTML()
        self.messages = W.HTML()
        self.preview = W.HTML()
        self.answer = W.HTML()

        for w in (self.system, self.pattern, self.prefix, self.max_length):
            w.observe(self._on_edit, names="value")
        for w in (self.answer_field, self.train_on, self.row, self.mode):
            w.observe(self._on_choice, names="value")
        self.add_row_button.on_click(self._guard(lambda: self.add_example(self.rows[self.row.value])))
        self.add_blank_button.on_click(self._guard(lambda: self.add_example({f: "" for f in self._fields()})))
        self.check_button.on_click(self._guard(self.check_all))
        self.try_button.on_click(self._guard(self.try_it))
        self.stop_button.on_click(self._guard(self.stop))

        self.widget = W.VBox([
            W.HTML("<b>Prompt template</b>"),
            self.system, self.pattern,
            W.HBox([self.answer_field, self.prefix]),
            W.HBox([self.train_on, self.max_length]),
            W.HTML("<b>Few-shot examples</b> (earlier turns of the conversation)"),
            self.examples_box,
            W.HBox([self.add_row_button, self.add_blank_button]),
            W.HTML("<b>Preview</b>"),
            W.HBox([self.row, self.mode, self.check_button]),
            self.stats, self.messages, self.preview,
            W.HBox([self.try_button, self.stop_button]),
            self.answer,
        ])
        self._building = False
        self._rebuild_examples()
        self.refresh()

    # ---- display ---------------------------------------------------------------------
    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- the template the controls describe ------------------------------------------
    def _fields(self) -> list[str]:
        try:
            names = placeholders(self.pattern.value)
        except TemplateError:
            names = []
        return names + ([self.answer_field.value] if self.answer_field.value not in names else [])

    def build_template(self) -> Template:
        """The Template the controls describe; raises TemplateError when they don't make one."""
        check_pattern_columns(self.pattern.value, self.columns)  # before the examples' own check
        return Template(
            user_pattern=self.pattern.value,
            answer_field=self.answer_field.value,
            system=self.system.value if self.system.value.strip() else None,
            examples=[dict(e) for e in self._examples],
            assistant_prefix=self.prefix.value,
            train_on=self.train_on.value,
            max_length=int(self.max_length.value),
        )

    @property
    def template(self) -> Template:
        """The current template: the one to hand to the layer picker and the run launcher."""
        return self.build_template()

    # ---- examples ---------------------------------------------------------------------
    def add_example(self, row: dict) -> None:
        fields = self._fields()
        self._examples.append({f: as_text(row.get(f)) for f in fields})
        if self.mode.value != "few-shot":
            self.mode.value = "few-shot"  # triggers a refresh
        self._rebuild_examples()
        self.refresh()

    def remove_example(self, index: int) -> None:
        del self._examples[index]
        self._rebuild_examples()
        self.refresh()

    def move_example(self, index: int, step: int) -> None:
        j = index + step
        if 0 <= j < len(self._examples):
            self._examples[index], self._examples[j] = self._examples[j], self._examples[index]
            self._rebuild_examples()
            self.refresh()

    def _rebuild_examples(self) -> None:
        boxes = []
        for i, ex in enumerate(self._examples):
            inputs = []
            for f in list(ex):
                t = W.Text(value=as_text(ex[f]), description=f, layout=W.Layout(width="45%"))
                t.observe(lambda ch, i=i, f=f: self._edit_example(i, f, ch["new"]), names="value")
                inputs.append(t)
            up = W.Button(icon="arrow-up", layout=W.Layout(width="36px"), tooltip="move up")
            down = W.Button(icon="arrow-down", layout=W.Layout(width="36px"), tooltip="move down")
            rm = W.Button(icon="trash", layout=W.Layout(width="36px"), tooltip="remove")
            up.on_click(self._guard(lambda i=i: self.move_example(i, -1)))
            down.on_click(self._guard(lambda i=i: self.move_example(i, +1)))
            rm.on_click(self._guard(lambda i=i: self.remove_example(i)))
            boxes.append(W.HBox([W.Label(f"{i + 1}."), *inputs, up, down, rm]))
        self.examples_box.children = boxes or [W.HTML("<i>none: zero-shot</i>")]

    def _edit_example(self, index: int, field: str, value: str) -> None:
        self._examples[index][field] = value
        self._on_edit(None)

    # ---- errors ----------------------------------------------------------------------
    def _show_error(self, exc: BaseException) -> None:
        """Put an error into the message area (messages_html escapes it)."""
        if isinstance(exc, TemplateError):
            text = str(exc)
        else:
            text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        self.error = text
        self.messages.value = render.messages_html([text], "error")

    def _guard(self, fn):
        """``fn`` as a widget callback (button click, timer): any exception goes to the message area."""

        def run(*_args):
            try:
                fn()
            except Exception as exc:  # shown in the view; the kernel and the view carry on
                try:
                    self._show_error(exc)
                except Exception:
                    pass

        return run

    # ---- preview ---------------------------------------------------------------------
    def _on_edit(self, _change) -> None:
        if self._building:
            return
        if self.debounce <= 0:
            self.refresh()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.debounce, self._guard(self.refresh))
        self._timer.daemon = True
        self._timer.start()

    def _on_choice(self, _change) -> None:
        if not self._building:
            self.refresh()

    def refresh(self) -> None:
        """Re-render the preview of the selected row (runs after typing stops).

        Errors (of the template, the data or the tokenizer) go to the message area; the
        preview keeps the last good rendering.
        """
        with self._lock:
            try:
                self._refresh()
            except Exception as exc:
                self._show_error(exc)

    def _json_notes(self, tpl: Template) -> list[str]:
        return [f"field {name!r} holds lists/dicts in rows {_rows_text(rows)} (0-based): shown as JSON"
                for name, rows in tpl.structured_fields(self.rows).items()]

    def _refresh(self) -> None:
        row = self.rows[self.row.value]
        few = self.mode.value == "few-shot"
        tpl = self.build_template()
        tpl.check_rows(self.rows)
        r = tpl.render(row, self.tokenizer, with_examples=few)
        self.error = None
        self._last_good = tpl
        self.rendered = r
        warnings = []
        if r.truncated:
            warnings.append(f"This row has {r.full_length} tokens; max_length={tpl.max_length} cuts "
                            f"{r.full_length - tpl.max_length}.")
        if r.n_trained == 0:
            warnings.append("Nothing in this row is trained after truncation: the model learns nothing "
                            "from it and never sees how the answer ends.")
        elif tpl.train_on == "completion" and not r.end_trained:
            warnings.append("The end-of-turn token of this row is not trained: the model would never "
                            "learn to stop.")
        self.warnings = warnings
        roles = ["prompt"] * r.n_tokens
        for s in r.segments:
            for i in range(s.start, min(s.end, r.n_tokens)):
                roles[i] = s.role
        pieces = readable_tokens(self.tokenizer, r.input_ids)
        self.preview.value = render.tokens_html(pieces, r.loss_mask, roles,
                                                truncated_at=tpl.max_length if r.truncated else None,
                                                full_length=r.full_length)
        self.stats.value = render.stats_html(r.n_tokens, r.n_trained, tpl.max_length, r.prompt_length)
        self.notes = self._json_notes(tpl)
        self.messages.value = render.messages_html(self.notes, "info") + render.messages_html(warnings, "warning")

    def check_all(self):
        """Validate every row (lengths, truncation, trained end-of-turn) and show the warnings."""
        try:
            tpl = self.build_template()
            report = tpl.validate(self.rows, self.tokenizer, with_examples=self.mode.value == "few-shot")
        except Exception as exc:
            self._show_error(exc)
            return None
        self.error = None
        lengths = sorted(report.lengths)
        info = [f"{report.n_rows} rows checked: median {lengths[len(lengths) // 2]} tokens, "
                f"longest {lengths[-1]}; {report.n_too_long} longer than max_length."]
        self.notes = self._json_notes(tpl)
        info += self.notes
        self.warnings = list(report.warnings)
        self.messages.value = render.messages_html(info, "info") + render.messages_html(self.warnings, "warning")
        return report

    # ---- Try it -------------------------------------------------------------------------
    def try_it(self) -> None:
        """Run the model on the selected row in a background thread, streaming the answer."""
        if self.model is None or (self._thread is not None and self._thread.is_alive()):
            return
        from ..engine.generate import answer_row

        try:
            tpl = self.build_template()
        except Exception as exc:
            self._show_error(exc)
            return
        row = self.rows[self.row.value]
        few = self.mode.value == "few-shot"
        expected = as_text(row.get(tpl.answer_field))
        self._stop.clear()
        self.answer_text = ""
        self.try_button.disabled, self.stop_button.disabled = True, False
        self._show_answer(expected, running=True)

        def on_text(piece: str):
            self.answer_text += piece
            self._show_answer(expected, running=True)

        def work():
            note = ""
            try:
                result = answer_row(self.model, self.tokenizer, tpl, row, few_shot=few,
                                    max_new_tokens=self.max_new_tokens, on_text=on_text,
                                    stop_event=self._stop)
                self.answer_text = result.text
                note = (f"stopped after {result.new_tokens} tokens" if result.stopped else
                        f"{result.new_tokens} tokens in {result.seconds:.1f} s")
            except Exception as exc:  # shown in the view; the kernel carries on
                note = f"failed: {type(exc).__name__}: {exc}"
            finally:
                self.try_button.disabled, self.stop_button.disabled = False, True
                self._show_answer(expected, running=False, note=note)

        self._thread = threading.Thread(target=work, name="sftkit-try-it", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a running "Try it" finishes (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _show_answer(self, expected: str, *, running: bool, note: str = "") -> None:
        state = "&#8987; generating..." if running else html.escape(note)
        match = ""
        if not running and self.answer_text:
            same = self.answer_text.strip() == expected.strip()
            match = (' <span style="color:#15803d">matches the dataset answer</span>' if same else
                     ' <span style="color:#b45309">differs from the dataset answer</span>')
        self.answer.value = (
            f'<div style="font-family:monospace;white-space:pre-wrap;border-left:3px solid #1d4ed8;'
            f'padding-left:6px"><b>Model:</b> {html.escape(self.answer_text)}</div>'
            f'<div style="font-family:monospace;color:#6b7280"><b>Dataset:</b> {html.escape(expected)}</div>'
            f'<div style="color:#6b7280">{state}{match}</div>'
        )


def _rows_text(rows: list[int], n: int = 5) -> str:
    shown = ", ".join(map(str, rows[:n]))
    return shown + (f" and {len(rows) - n} more" if len(rows) > n else "")


__all__: Sequence[str] = ["PromptBuilder"]

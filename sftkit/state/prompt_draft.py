"""PromptDraft: a template being edited, its preview row and everything derived from them.

What the prompt builder shows, without any widget: the template's parts (user pattern,
answer field, system prompt, assistant prefix, train_on, max_length), the few-shot examples,
the selected row rendered to tokens with its loss mask and roles, the warnings and notes,
and "try it" (the model answers the selected row: ``try_it`` blocking, ``start_try`` in a
background thread). With a prompt method (``set_method``: a plan, a run config or a preset name),
the preview also has that method's virtual tokens in front of the prompt (``VirtualTokens``).

Every warning comes from ``sftkit.core.template`` (``Template.check_rows`` errors,
``Template.validate`` warnings, ``Template.structured_fields``), so the preview and a run's
validation say the same thing in the same words.

There is no timer here: ``update(..., refresh=False)`` stores an edit at once (``template``
sees it) and ``refresh()`` renders when the caller wants, so a view debounces typing itself.
Listeners registered with ``on_change`` hear ``"examples"`` (the example list changed
shape), ``"preview"`` (a refresh ran: preview, warnings or error changed) and ``"messages"``
(a check of all rows or a reported error). Edits may come from two threads (a view's timer and
the kernel's); they are serialised by a lock, and listeners run under it.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..core.data import load_rows
from ..core.fields import ALLOWED
from ..core.plan import PRESETS, PROMPT_FAMILIES
from ..core.runconfig import AdapterConfig
from ..core.template import (
    RenderedExample,
    Template,
    TemplateError,
    ValidationReport,
    _first,
    as_text,
    check_pattern_columns,
    placeholders,
)
from ..core.tokens import TokenPiece, readable_tokens
from .observable import Observable

EXAMPLES, PREVIEW, MESSAGES = "examples", "preview", "messages"
MODES = ("zero-shot", "few-shot")
EDITABLE = ("user_pattern", "answer_field", "system", "assistant_prefix", "train_on", "max_length",
            "row_index", "mode")
HELP = {  # what each editable part means, for a view's tooltips
    "system": "The system prompt: instructions the model sees before every conversation. "
              "Leave empty to use the chat template's own default.",
    "user_pattern": "The user turn. {column} placeholders are filled from each data row.",
    "answer_field": "The column holding the answer: these tokens (and the end-of-turn) are what the model "
                    "is trained on.",
    "assistant_prefix": "Text the assistant turn starts with (part of the prompt, never trained), e.g. 'Answer: '.",
    "train_on": "completion: only the answer and its end-of-turn are trained (the usual choice). "
                "all: every token, prompt included.",
}


def error_text(exc: BaseException) -> str:
    """An exception as one line for the user: a TemplateError's own message, else its type too."""
    if isinstance(exc, TemplateError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


@dataclass(frozen=True)
class VirtualTokens:
    """A prompt method's trained positions, as the preview shows them in front of the prompt.

    n: how many (``adapter.virtual_tokens``); method: one of ``PROMPT_FAMILIES`` (prompt_tuning,
    p_tuning, prefix_tuning, adaption_prompt); top_blocks: the blocks LLaMA-Adapter adapts (None:
    all). They are trained embeddings, never labels: the loss mask does not cover them.
    """

    n: int
    method: str
    top_blocks: int | None = None

    def __post_init__(self):
        if self.method not in PROMPT_FAMILIES:
            raise ValueError(f"method={self.method!r} has no virtual tokens; allowed: {', '.join(PROMPT_FAMILIES)}")
        allowed = _VIRTUAL_TOKENS_ALLOWED  # the run config's adapter.virtual_tokens: the one range
        if not allowed.check(self.n):
            raise ValueError(f"adapter.virtual_tokens={self.n!r} is not allowed; allowed: {allowed.describe()}")

    @property
    def input_positions(self) -> bool:
        """Prompt tuning and p-tuning put input positions in front (every row gets n longer); prefix
        tuning and LLaMA-Adapter put theirs inside the attention of the blocks."""
        return self.method in ("prompt_tuning", "p_tuning")

    @property
    def label(self) -> str:
        """What the positions are, in one line (plain text)."""
        n, s = self.n, "s" if self.n != 1 else ""
        if self.method == "prompt_tuning":
            return (f"soft prompt: {n} virtual token{s} (trained embeddings, not text) in front of every prompt; "
                    f"every row is {n} positions longer, and they are never trained as labels")
        if self.method == "p_tuning":
            return (f"soft prompt: {n} virtual token{s} made by a prompt encoder (a small trained MLP), not text: "
                    f"input positions in front of every prompt; every row is {n} positions longer, never labels")
        if self.method == "prefix_tuning":
            return (f"prefix: {n} virtual token{s} as trained keys and values in front of the attention of every "
                    "layer, not input positions (the row is not longer; the tokens attend to them in each layer)")
        where = f"the last {self.top_blocks} blocks" if self.top_blocks else "every block"
        return (f"LLaMA-Adapter: {n} trained prompt vector{s} in the attention of {where}, behind a gate that "
                "starts at 0; not input positions (the row is not longer)")

    @classmethod
    def of(cls, source: Any, virtual_tokens: int | None = None) -> "VirtualTokens | None":
        """The virtual tokens of ``source``: a FreezePlan or PlanEditor (its plan), a RunConfig or its
        ``adapter`` section, a ``VirtualTokens``, or a preset name (``virtual_tokens`` then gives n,
        default 20). None for a method without them (LoRA, IA3, BitFit, ...) and for None; giving
        ``virtual_tokens`` for such a method is refused (it would be ignored).

        A PlanEditor is read once here; ``PromptDraft.set_method`` follows its later edits."""
        if source is None or isinstance(source, VirtualTokens):
            return source
        if isinstance(source, str):
            if source not in PRESETS:
                raise ValueError(f"method {source!r} is not a preset; allowed: {', '.join(PRESETS)}")
            if source not in PROMPT_FAMILIES:
                return _no_virtual(source, virtual_tokens)
            return cls(AdapterConfig.virtual_tokens if virtual_tokens is None else virtual_tokens, source)
        source = getattr(source, "plan", source)  # a PlanEditor
        source = getattr(source, "adapter", source)  # a RunConfig
        if hasattr(source, "family"):  # a FreezePlan
            method, n, top = source.family, source.virtual_tokens, source.top_blocks
        elif hasattr(source, "preset"):  # a RunConfig's adapter section
            method, n, top = source.preset, source.virtual_tokens, source.top_n
        else:
            raise TypeError(f"can't tell a method from {type(source).__name__}: pass a FreezePlan, a PlanEditor, "
                            "a RunConfig (or its adapter section) or a preset name")
        if method not in PROMPT_FAMILIES:
            return _no_virtual(method, virtual_tokens)
        return cls(n if virtual_tokens is None else virtual_tokens, method, top)


_VIRTUAL_TOKENS_ALLOWED = next(f.metadata[ALLOWED] for f in dataclasses.fields(AdapterConfig)
                               if f.name == "virtual_tokens")


def _no_virtual(method: str, virtual_tokens: int | None) -> None:
    """A method without virtual tokens: None, unless a count was given for it (refused, not ignored)."""
    if virtual_tokens is not None:
        raise ValueError(f"virtual_tokens={virtual_tokens!r} was given, but {method} has no virtual tokens; "
                         f"methods with them: {', '.join(PROMPT_FAMILIES)}")
    return None


def _is_editor(source: Any) -> bool:
    """A PlanEditor (or anything that holds a plan and tells its changes): what set_method follows."""
    return hasattr(source, "on_change") and hasattr(source, "plan")


@dataclass(frozen=True)
class Preview:
    """One row rendered: its tokens as readable pieces, the loss mask, each token's role, and the
    prompt method's virtual tokens that go in front (None without one)."""

    row_index: int
    rendered: RenderedExample
    pieces: tuple[TokenPiece, ...]
    roles: tuple[str, ...]  # system / example / user / prompt / answer / end / other, per token
    max_length: int
    virtual: VirtualTokens | None = None

    @property
    def n_virtual(self) -> int:
        return self.virtual.n if self.virtual else 0

    @property
    def loss_mask(self) -> list[int]:
        return self.rendered.loss_mask

    @property
    def n_tokens(self) -> int:
        return self.rendered.n_tokens

    @property
    def n_trained(self) -> int:
        return self.rendered.n_trained

    @property
    def prompt_length(self) -> int:
        return self.rendered.prompt_length

    @property
    def full_length(self) -> int:
        return self.rendered.full_length

    @property
    def cut_at(self) -> int | None:
        """Where truncation cut the row (max_length), None when it fits."""
        return self.max_length if self.rendered.truncated else None


@dataclass(frozen=True)
class TryResult:
    """The model's answer to one row beside the dataset's answer."""

    row_index: int
    text: str
    expected: str
    new_tokens: int
    seconds: float
    stopped: bool

    @property
    def matches(self) -> bool:
        return self.text.strip() == self.expected.strip()

    @property
    def note(self) -> str:
        if self.stopped:
            return f"stopped after {self.new_tokens} tokens"
        return f"{self.new_tokens} tokens in {self.seconds:.1f} s"


class PromptDraft(Observable):
    """A Template under edit, with the preview of one data row and the actions on it.

    rows: the data (list of dicts, a .jsonl/.csv path, or a datasets.Dataset).
    tokenizer: renders the preview and the checks.
    template: the starting Template; by default the first column is the question and the
        last the answer.

    Errors of the template, the data or the tokenizer never raise out of ``refresh`` or
    ``check_all``: they land in ``error`` and the last good preview stays.
    """

    def __init__(self, rows: Any, tokenizer, template: Template | None = None, *, method: Any = None):
        self.rows: list[dict] = load_rows(rows)
        self.columns: list[str] = list(dict.fromkeys(k for r in self.rows for k in r))
        self.tokenizer = tokenizer
        if template is None:
            template = Template(user_pattern="{%s}" % self.columns[0], answer_field=self.columns[-1])
        self.user_pattern: str = template.user_pattern
        self.answer_field: str = (template.answer_field if template.answer_field in self.columns
                                  else self.columns[-1])
        self.system: str = template.system or ""  # blank: the chat template's own default
        self.assistant_prefix: str = template.assistant_prefix
        self.train_on: str = template.train_on
        self.max_length: int = template.max_length
        self._examples: list[dict] = [dict(e) for e in template.examples]
        self.row_index = 0
        self.mode = MODES[1] if self._examples else MODES[0]  # few-shot when the template brings examples
        self.virtual: VirtualTokens | None = VirtualTokens.of(method)  # a prompt method's, shown in front
        self._unfollow: Callable[[], None] | None = None  # stops following a PlanEditor's plan
        self.preview: Preview | None = None  # the last good rendering
        self.error: str | None = None
        self.warnings: list[str] = []
        self.notes: list[str] = []  # fields shown as JSON
        self.summary: str | None = None  # what the last check of all rows found; None after an edit
        self.report: ValidationReport | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.RLock()
        self._try_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._follow(method, None)
        self.refresh()

    # ---- listeners ------------------------------------------------------------------------

    # ---- the template ---------------------------------------------------------------------
    def fields(self) -> list[str]:
        """The pattern's placeholders (none while it doesn't parse) and the answer field."""
        try:
            names = placeholders(self.user_pattern)
        except TemplateError:
            names = []
        return names + ([self.answer_field] if self.answer_field not in names else [])

    def build_template(self) -> Template:
        """The Template the draft describes; raises TemplateError when it doesn't make one."""
        with self._lock:
            check_pattern_columns(self.user_pattern, self.columns)  # before the examples' own check
            return Template(
                user_pattern=self.user_pattern,
                answer_field=self.answer_field,
                system=self.system if self.system and self.system.strip() else None,
                examples=[dict(e) for e in self._examples],
                assistant_prefix=self.assistant_prefix,
                train_on=self.train_on,
                max_length=int(self.max_length),
            )

    @property
    def template(self) -> Template:
        return self.build_template()

    @property
    def few_shot(self) -> bool:
        return self.mode == "few-shot"

    @property
    def row(self) -> dict:
        return self.rows[self.row_index]

    @property
    def rendered(self) -> RenderedExample | None:
        return self.preview.rendered if self.preview else None

    @property
    def messages(self) -> list[tuple[str, str]]:
        """What to tell the user, as (kind, text) with kind error, info or warning."""
        if self.error is not None:
            return [("error", self.error)]
        info = ([self.summary] if self.summary else []) + self.notes
        return [("info", t) for t in info] + [("warning", t) for t in self.warnings]

    def update(self, *, refresh: bool = True, **changes: Any) -> None:
        """Set template parts, ``row_index`` or ``mode``; re-render if something changed
        (``refresh=False``: store only, the caller refreshes later). Bad values of template parts
        show as ``error`` on refresh, as they would while typing."""
        unknown = sorted(set(changes) - set(EDITABLE))
        if unknown:
            raise TypeError(f"PromptDraft.update got {', '.join(unknown)}; allowed: {', '.join(EDITABLE)}")
        if "row_index" in changes and not 0 <= changes["row_index"] < len(self.rows):
            raise ValueError(f"row_index={changes['row_index']!r} is not allowed; allowed: 0 to {len(self.rows) - 1}")
        if "mode" in changes and changes["mode"] not in MODES:
            raise ValueError(f"mode={changes['mode']!r} is not allowed; allowed: {', '.join(MODES)}")
        with self._lock:
            changed = [k for k, v in changes.items() if getattr(self, k) != v]
            for k in changed:
                setattr(self, k, changes[k])
            if changed and refresh:
                self.refresh()

    def set_method(self, method: Any, virtual_tokens: int | None = None, *, refresh: bool = True) -> None:
        """Show ``method``'s virtual tokens in front of the preview (``VirtualTokens.of``: a plan, a plan
        editor, a run config, a preset name with ``virtual_tokens``); a method without them, or None,
        takes them away. A bad value raises here and changes nothing.

        A PlanEditor is followed: each change of its plan updates the preview, until ``set_method`` is
        given another source. While the template has an error, the kept preview shows the new method."""
        virtual = VirtualTokens.of(method, virtual_tokens)
        with self._lock:
            self._follow(method, virtual_tokens)
            self._show_virtual(virtual, refresh)

    def _show_virtual(self, virtual: VirtualTokens | None, refresh: bool) -> None:
        with self._lock:
            changed = virtual != self.virtual
            self.virtual = virtual
            if changed and self.preview is not None:  # kept as it is when the next render fails
                self.preview = dataclasses.replace(self.preview, virtual=virtual)
            if changed and refresh:
                self.refresh()

    def _follow(self, method: Any, virtual_tokens: int | None) -> None:
        """Follow ``method``'s plan when it is a PlanEditor (its "plan" events); stop following the last one."""
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        if not _is_editor(method):
            return

        def on_plan(event: str) -> None:
            if event != "plan":  # the editor's PLAN: the plan itself changed
                return
            try:
                self._show_virtual(VirtualTokens.of(method, virtual_tokens), True)
            except Exception as exc:  # the editor's edit stands; the draft says why it can't show it
                self.report_error(exc)

        self._unfollow = method.on_change(on_plan)

    # ---- few-shot examples -------------------------------------------------------------------
    @property
    def examples(self) -> list[dict]:
        """A copy of the examples; change them with the methods below."""
        return [dict(e) for e in self._examples]

    def add_example(self, row: dict | None = None, *, refresh: bool = True) -> None:
        """Append ``row``'s template fields as an example (None: a blank one); switches to few-shot."""
        with self._lock:
            self._examples.append({f: as_text((row or {}).get(f)) for f in self.fields()})
            self.mode = "few-shot"
            self._changed_examples(refresh)

    def add_row_example(self, *, refresh: bool = True) -> None:
        """The selected row as a new example."""
        self.add_example(self.row, refresh=refresh)

    def remove_example(self, index: int, *, refresh: bool = True) -> None:
        with self._lock:
            del self._examples[index]
            self._changed_examples(refresh)

    def move_example(self, index: int, step: int, *, refresh: bool = True) -> None:
        """Move example ``index`` by ``step`` places; a move past either end does nothing."""
        with self._lock:
            j = index + step
            if 0 <= j < len(self._examples) and 0 <= index < len(self._examples):
                self._examples[index], self._examples[j] = self._examples[j], self._examples[index]
                self._changed_examples(refresh)

    def edit_example(self, index: int, field: str, value: str, *, refresh: bool = True) -> None:
        """Change one field of one example (no "examples" event: its editor stays as it is)."""
        with self._lock:
            self._examples[index][field] = value
            if refresh:
                self.refresh()

    def _changed_examples(self, refresh: bool) -> None:
        self._notify(EXAMPLES)
        if refresh:
            self.refresh()

    # ---- preview and checks -------------------------------------------------------------------
    def refresh(self) -> Preview | None:
        """Render the selected row and its warnings; on an error keep the last good preview.

        Errors: ``Template.check_rows`` over all the data. Warnings: ``Template.validate``
        on this row alone, its row number put back ("row 5" where validate says "rows 0").
        """
        with self._lock:
            index, few = self.row_index, self.few_shot
            try:
                tpl = self.build_template()
                tpl.check_rows(self.rows)
                rendered = tpl.render(self.rows[index], self.tokenizer, with_examples=few)
                report = tpl.validate([self.rows[index]], self.tokenizer, with_examples=few)
                pieces = readable_tokens(self.tokenizer, rendered.input_ids)
            except Exception as exc:  # any tokenizer/chat-template failure: shown, never raised
                self.error = error_text(exc)
            else:
                self.error, self.summary = None, None
                self.preview = Preview(index, rendered, tuple(pieces), _roles(rendered), tpl.max_length,
                                       self.virtual)
                self.warnings = [w.replace("(rows 0", f"(row {index}") for w in report.warnings]
                self.notes = _json_notes(tpl, self.rows)
            self._notify(PREVIEW)
            return self.preview if self.error is None else None

    def check_all(self) -> ValidationReport | None:
        """``Template.validate`` over every row: lengths, truncation, a trained end-of-turn."""
        with self._lock:
            try:
                tpl = self.build_template()
                report = tpl.validate(self.rows, self.tokenizer, with_examples=self.few_shot)
            except Exception as exc:  # as in refresh: the user sees it, the caller carries on
                self.error, report = error_text(exc), None
            else:
                lengths = sorted(report.lengths)
                self.error, self.report = None, report
                self.summary = (f"{report.n_rows} rows checked: median {lengths[len(lengths) // 2]} tokens, "
                                f"longest {lengths[-1]}; {report.n_too_long} longer than max_length.")
                self.warnings = list(report.warnings)
                self.notes = _json_notes(tpl, self.rows)
            self._notify(MESSAGES)
            return report

    def report_error(self, exc: BaseException) -> None:
        """Record an error raised outside the draft (a view's callback) so ``messages`` shows it."""
        with self._lock:
            self.error = error_text(exc)
            self._notify(MESSAGES)

    # ---- try it ----------------------------------------------------------------------------------
    def expected_answer(self) -> str:
        """The dataset's answer of the selected row."""
        return as_text(self.row.get(self.answer_field))

    def try_it(self, model, *, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
               stop_event: threading.Event | None = None) -> TryResult:
        """The model's answer to the selected row under the current template (blocking; raises
        on errors). Edits made meanwhile don't affect it; ``stop_event`` ends it early."""
        return self._answer(model, self._try_snapshot(), max_new_tokens, on_text, stop_event)

    def start_try(self, model, *, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
                  on_done: Callable[[TryResult | None, BaseException | None], None] | None = None) -> None:
        """``try_it`` in a background thread, so the caller stays free: ``on_done(result, error)``
        when it ends (one of them None), ``stop_try()`` ends it early. The template is taken now,
        so one that doesn't fit the data raises here, before any thread starts."""
        if self.trying:
            raise RuntimeError("a try is already running: stop_try() or wait_try() first")
        snapshot = self._try_snapshot()
        self._stop.clear()

        def work():
            result = error = None
            try:
                result = self._answer(model, snapshot, max_new_tokens, on_text, self._stop)
            except Exception as exc:  # handed to on_done: the caller shows it
                error = exc
            if on_done is not None:
                on_done(result, error)

        self._try_thread = threading.Thread(target=work, name="sftkit-try-it", daemon=True)
        self._try_thread.start()

    def stop_try(self) -> None:
        self._stop.set()

    def wait_try(self, timeout: float | None = None) -> None:
        """Block until a try started by ``start_try`` finishes (for scripts and tests)."""
        if self._try_thread is not None:
            self._try_thread.join(timeout)

    @property
    def trying(self) -> bool:
        return self._try_thread is not None and self._try_thread.is_alive()

    def _try_snapshot(self) -> tuple[Template, int, bool, str]:
        with self._lock:
            return self.build_template(), self.row_index, self.few_shot, self.expected_answer()

    def _answer(self, model, snapshot, max_new_tokens, on_text, stop_event) -> TryResult:
        from ..engine.generate import answer_row  # torch/transformers: only when a model answers

        tpl, index, few, expected = snapshot
        answer = answer_row(model, self.tokenizer, tpl, self.rows[index], few_shot=few,
                            max_new_tokens=max_new_tokens, on_text=on_text, stop_event=stop_event)
        return TryResult(index, answer.text, expected, answer.new_tokens, answer.seconds, answer.stopped)


def _roles(r: RenderedExample) -> tuple[str, ...]:
    roles = ["prompt"] * r.n_tokens
    for s in r.segments:
        for i in range(s.start, min(s.end, r.n_tokens)):
            roles[i] = s.role
    return tuple(roles)


def _json_notes(tpl: Template, rows: Sequence[dict]) -> list[str]:
    return [f"field {name!r} holds lists/dicts in rows {_first(hits)} (0-based): shown as JSON"
            for name, hits in tpl.structured_fields(rows).items()]


__all__ = ["PromptDraft", "Preview", "TryResult", "VirtualTokens", "error_text"]

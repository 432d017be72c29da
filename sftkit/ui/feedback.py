"""FeedbackCollector: rate a model's answers in the notebook, every rating saved as it is made.

Wiring over a ``FeedbackSession`` (``sftkit.state.feedback``): for each prompt the model's K candidates
(sampled in the background, Stop works) are shown side by side; the person says which is better (A/B
buttons, or for 3-4 candidates a ranking by clicking them in order), tie, both bad, thumbs up/down per
answer, writes a better answer (it becomes the chosen one), skips, or undoes. Keys (click the key box
first): 1-4 or a-d pick the better answer (or the next in the ranking), t tie, x both bad, s skip,
u undo, n next (samples again after Stop). A scorer (the teaching tasks have one) labels many prompts at
once. The counter says how many
pairs there are, and who made them. Every text from the model or a file is escaped before display.
"""

from __future__ import annotations

import html
import threading
from typing import Callable, Sequence

import anywidget
import ipywidgets as W
import traitlets

from ..state.feedback import FAILED, PROGRESS, SAMPLING, STOPPED, FeedbackSession
from .help import add_tips
from .render import error_html

LETTERS = "ABCD"


class KeyCatcher(anywidget.AnyWidget):
    """A focusable box that sends each key pressed in it to the kernel (``on_key(callback)``)."""

    _esm = """
    function render({ model, el }) {
      const box = document.createElement("div");
      box.tabIndex = 0;
      box.className = "sftkit-keys";
      box.textContent = model.get("hint");
      box.style.cssText = "border:1px dashed #9ca3af;padding:4px 8px;border-radius:4px;color:#374151;" +
                          "font-size:12px;cursor:pointer;outline:none;display:inline-block";
      box.addEventListener("focus", () => { box.style.borderColor = "#2563eb"; });
      box.addEventListener("blur", () => { box.style.borderColor = "#9ca3af"; });
      box.addEventListener("keydown", (e) => {
        if (e.ctrlKey || e.metaKey || e.altKey) return;
        model.send({ key: e.key });
        e.preventDefault();
        e.stopPropagation();
      });
      model.on("change:hint", () => { box.textContent = model.get("hint"); });
      el.appendChild(box);
    }
    export default { render };
    """
    hint = traitlets.Unicode("click here, then: 1/2 (a/b) pick the better, t tie, x both bad, s skip, u undo, n next").tag(
        sync=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._callbacks: list[Callable[[str], None]] = []
        self.on_msg(self._on_message)

    def on_key(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def _on_message(self, widget, content, buffers) -> None:
        key = content.get("key") if isinstance(content, dict) else None
        if isinstance(key, str):
            for callback in self._callbacks:
                callback(key)


class FeedbackCollector:
    """model, tokenizer: the model that answers (the base model, or a run's: ``sftkit.load_trained(run)``);
    template: how a row becomes the prompt (the run's own); rows: prompts (dicts with the template's input
    fields; the answer field too when a scorer labels them); store: a folder (or a store's ``feedback/NAME``
    via ``store=..., name=...``). The rest goes to ``FeedbackSession`` (k, temperature, top_p,
    max_new_tokens, model_label, scorer, seed)."""

    def __init__(self, model, tokenizer, template, rows: Sequence[dict], *, store, name: str | None = None,
                 start: bool = True, **session_kwargs):
        from ..core.preferences import PreferenceStore

        if name is not None:
            store = PreferenceStore.in_store(store, name, template)
        self.session = FeedbackSession(model, tokenizer, template, rows, store=store, **session_kwargs)
        self._lock = threading.RLock()
        self._order: list[int] = []  # a ranking being made, of the item in _order_item
        self._order_item = None
        s = self.session
        self.prompt = W.HTML()
        self.candidates = W.VBox()
        self.status = W.HTML()
        self.counter = W.HTML()
        self.message = W.HTML()
        self.a_button = W.Button(description="A better", button_style="success")
        self.b_button = W.Button(description="B better", button_style="success")
        self.tie_button = W.Button(description="Tie")
        self.bad_button = W.Button(description="Both bad", button_style="danger")
        self.skip_button = W.Button(description="Skip")
        self.undo_button = W.Button(description="Undo", icon="undo")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="warning")
        self.next_button = W.Button(description="Next", icon="play", tooltip="sample the next prompt's answers "
                                    "(after Stop)")
        self.edit_box = W.Textarea(placeholder="write a better answer here (it becomes the chosen one)",
                                   layout=W.Layout(width="520px", height="56px"))
        self.edit_button = W.Button(description="Use my answer", button_style="info")
        self.k = W.BoundedIntText(value=s.k, min=2, max=4, description="candidates", layout=W.Layout(width="160px"))
        self.temperature = W.BoundedFloatText(value=s.temperature, min=0.05, max=2.0, step=0.05,
                                              description="temperature", layout=W.Layout(width="180px"))
        self.top_p = W.BoundedFloatText(value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p",
                                        layout=W.Layout(width="160px"))
        self.auto_n = W.BoundedIntText(value=min(200, max(len(s.rows), 1)), min=1, max=max(len(s.rows), 1),
                                       description="prompts", layout=W.Layout(width="170px"))
        self.auto_button = W.Button(description="Label with the scorer", icon="magic",
                                    disabled=s.scorer is None,
                                    tooltip="the task's scorer: each correct answer beats each incorrect one")
        self.auto_progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="200px"))
        self.keys = KeyCatcher()
        self.keys.on_key(lambda key: self._guard(lambda: self.press(key)))
        actions = ((self.a_button, lambda: self._pick(0)), (self.b_button, lambda: self._pick(1)),
                   (self.tie_button, s.tie), (self.bad_button, s.both_bad), (self.skip_button, s.skip),
                   (self.undo_button, self.undo), (self.stop_button, s.stop), (self.next_button, s.start),
                   (self.edit_button, self._use_edit),
                   (self.auto_button, self._autolabel))
        for button, action in actions:
            button.on_click(lambda _, act=action: self._guard(act))
        for control in (self.k, self.temperature, self.top_p):
            control.observe(lambda _: self._guard(self._settings), "value")
        add_tips(self)
        s.on_change(self._on_event)
        self.widget = W.VBox([
            W.HBox([self.k, self.temperature, self.top_p, self.stop_button, self.next_button]),
            W.HBox([self.auto_button, self.auto_n, self.auto_progress]),
            self.counter, self.status, self.prompt, self.candidates,
            W.HBox([self.a_button, self.b_button, self.tie_button, self.bad_button, self.skip_button,
                    self.undo_button]),
            W.HBox([self.edit_box, self.edit_button]), self.keys, self.message])
        self.draw()
        if start:
            self._guard(s.start)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- wiring -----------------------------------------------------------------------------------------
    def _guard(self, action):
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - every error of a control goes to the message area
            self.message.value = error_html(exc, "Failed")
            return None
        self.message.value = ""
        return result

    def _on_event(self, event: str) -> None:  # from the session's thread, or a button
        try:
            if event == FAILED:
                self.message.value = error_html(self.session.error, "The model failed")
            if event == PROGRESS:
                done, total = self.session.autolabel_progress
                self.auto_progress.max, self.auto_progress.value = max(total, 1), done
            self.draw(sampling=event == SAMPLING, stopped=event == STOPPED)
        except Exception as exc:  # noqa: BLE001 - shown, never lost in a thread
            self.message.value = error_html(exc, "Drawing failed")

    def _settings(self) -> None:
        self.session.set_sampling(k=int(self.k.value), temperature=float(self.temperature.value),
                                  top_p=float(self.top_p.value))

    def _ranking(self, item) -> list[int]:
        """The ranking being made of ``item``: a new one whenever the prompt shown changes (rated, skipped,
        undone, sampled after Stop), so a half-made ranking never carries over to another prompt."""
        if item is not self._order_item:
            self._order, self._order_item = [], item
        return self._order

    def _pick(self, i: int) -> None:
        """A click (or key) on candidate i: with 2 candidates, i is better; with more, the next in the ranking."""
        item = self.session.current
        self._ranking(item)
        if item is None:
            raise RuntimeError("no answers to rate yet: they are being sampled")
        if i >= len(item.candidates):
            raise ValueError(f"there is no candidate {LETTERS[i]} (this prompt has {len(item.candidates)})")
        if len(item.candidates) == 2:
            self.session.better(i)
            return
        if i in self._order:
            return
        self._order.append(i)
        if len(self._order) == len(item.candidates) - 1:
            rest = [x for x in range(len(item.candidates)) if x not in self._order]
            order, self._order = self._order + rest, []
            self.session.rank(order)
        else:
            self.draw()

    def _thumb(self, i: int, up: bool) -> None:
        self.session.thumbs(i, up)

    def _use_edit(self) -> None:
        self.session.edit(self.edit_box.value)
        self.edit_box.value = ""

    def _autolabel(self) -> None:
        self.session.autolabel(int(self.auto_n.value))

    def undo(self) -> None:
        self._order = []
        if not self.session.undo():
            raise RuntimeError("nothing to undo")

    KEYS = {"1": 0, "2": 1, "3": 2, "4": 3, "a": 0, "b": 1, "c": 2, "d": 3}

    def press(self, key: str) -> None:
        """A key from the key box (also what a test calls)."""
        key = key.lower()
        if key in self.KEYS:
            self._pick(self.KEYS[key])
        elif key == "t":
            self.session.tie()
        elif key == "x":
            self.session.both_bad()
        elif key == "s":
            self.session.skip()
        elif key == "u":
            self.undo()
        elif key == "n":
            self.session.start()

    # ---- drawing ------------------------------------------------------------------------------------------
    def draw(self, sampling: bool = False, stopped: bool = False) -> None:
        with self._lock:
            s = self.session
            c = s.counts()
            warn = "".join(f"<div style='color:#92400e'>&#9888; {html.escape(w)}</div>" for w in s.warnings())
            self.counter.value = (f"<span class='sftkit-feedback-count'><b>{c['pairs']}</b> pairs "
                                  f"({c['by_person']} by you, {c['by_scorer']} by the scorer) &middot; {c['singles']} "
                                  f"thumbs &middot; {c['skipped']} skipped &middot; {s.remaining} prompts left</span>"
                                  f"{warn}")
            item = s.current
            self._ranking(item)
            busy = s.busy
            for b in (self.a_button, self.b_button, self.tie_button, self.bad_button, self.skip_button,
                      self.edit_button):
                b.disabled = item is None
            self.stop_button.disabled = not busy
            self.next_button.disabled = busy or item is not None or not s.remaining
            self.auto_button.disabled = s.scorer is None or busy
            if item is None:
                self.prompt.value = ""
                self.candidates.children = ()
                self.status.value = ("<i>sampling answers&hellip;</i>" if (busy or sampling) else
                                     "<b>every prompt is rated</b>" if not s.remaining else
                                     "<i>stopped: press Next (or n) to sample the next prompt</i>"
                                     if (stopped or s.stopped) else "<i>idle: press Next (or n) to sample</i>")
                return
            many = len(item.candidates) > 2
            self.a_button.layout.display = self.b_button.layout.display = "none" if many else None
            self.status.value = (f"<i>click the answers best first ({len(self._order)} of {len(item.candidates) - 1} "
                                 "picked)</i>" if many else "")
            self.prompt.value = (f"<div class='sftkit-feedback-prompt' style='font-family:monospace;"
                                 f"border-left:3px solid #1d4ed8;padding-left:6px'><b>Prompt:</b> "
                                 f"{html.escape(item.prompt)}</div>")
            rows = []
            for i, text in enumerate(item.candidates):
                label = LETTERS[i]
                rank = f" #{self._order.index(i) + 1}" if i in self._order else ""
                thumb = {True: " &#128077;", False: " &#128078;"}.get(item.thumbs.get(i), "")
                body = W.HTML(f"<div class='sftkit-feedback-candidate' data-index='{i}' style='font-family:monospace;"
                              f"white-space:pre-wrap;min-width:320px'><b>{label}{rank}{thumb}:</b> "
                              f"{html.escape(text) or '<i>(empty)</i>'}</div>")
                pick = W.Button(description=f"{label} first" if many else f"{label} better",
                                layout=W.Layout(width="90px"),
                                tooltip=f"{label} next in your ranking" if many else f"{label} is the better answer")
                pick.on_click(lambda _, i=i: self._guard(lambda: self._pick(i)))
                up = W.Button(icon="thumbs-up", tooltip=f"{label} is good", layout=W.Layout(width="40px"))
                down = W.Button(icon="thumbs-down", tooltip=f"{label} is bad", layout=W.Layout(width="40px"))
                up.on_click(lambda _, i=i: self._guard(lambda: self._thumb(i, True)))
                down.on_click(lambda _, i=i: self._guard(lambda: self._thumb(i, False)))
                rows.append(W.HBox([pick, up, down, body]))
            self.candidates.children = tuple(rows)

    def wait_ready(self, timeout: float = 600.0):
        """Until the next prompt's answers are shown (scripts and tests)."""
        item = self.session.wait_ready(timeout)
        self.draw()
        return item

    def wait(self, timeout: float | None = None) -> bool:
        """Until the background work (sampling, labelling) ends."""
        done = self.session.wait(timeout)
        self.draw()
        return done


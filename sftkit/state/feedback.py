"""The state behind the FeedbackCollector: prompts to rate, candidates sampled in the background, the
ratings a person makes (ranking, A/B, thumbs, a written answer, skip, undo) and the ones a scorer makes.

Every rating goes to a ``PreferenceStore`` (``sftkit.core.preferences``) the moment it is made, fsync'd,
so a kernel that dies loses nothing; a session opened again on the same store continues with the
prompts nobody rated or skipped yet. Plain Python, no widget library: the view binds to this.

    session = FeedbackSession(model, tokenizer, template, rows, store=store, k=2)
    session.start()            # samples the first prompt's candidates in a thread
    session.wait_ready()
    session.better(0)          # A is better than B: one pair, the next prompt is sampled
    session.undo()             # that pair taken back, the prompt shown again
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..core.preferences import PreferenceStore, preference_warnings, prompt_key, scorer_pairs
from ..core.template import Template
from .observable import Observable

READY, SAMPLING, PROGRESS, RATED, FAILED, DONE = "ready", "sampling", "progress", "rated", "failed", "done"
STOPPED = "stopped"  # Stop ended the background work: nothing is shown until start() (the view's Next) samples again
K_RANGE = (2, 4)


@dataclass
class Item:
    """One prompt being rated: its row, the user text, the sampled candidates, which got a thumb."""

    row: dict
    prompt: str
    candidates: list[str]
    thumbs: dict[int, bool] = field(default_factory=dict)
    thumb_ids: dict[int, str] = field(default_factory=dict)  # candidate -> the stored rating of its thumb
    sampling: dict | None = None  # the settings (and seed) these candidates were drawn with

    def forget(self, rating_ids: set[str]) -> None:
        """The thumbs whose ratings were taken back are gone; the others stay (they are still stored)."""
        for i, rid in list(self.thumb_ids.items()):
            if rid in rating_ids:
                del self.thumb_ids[i]
                self.thumbs.pop(i, None)


def _check_sampling(k: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not isinstance(k, int) or not K_RANGE[0] <= k <= K_RANGE[1]:
        raise ValueError(f"k={k!r} is not allowed; allowed: {K_RANGE[0]} to {K_RANGE[1]} candidates per prompt")
    if not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise ValueError(f"temperature={temperature!r} is not allowed; allowed: a number > 0 and <= 2")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed; allowed: a number > 0 and <= 1")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 1024:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed; allowed: an integer from 1 to 1024")


class FeedbackSession(Observable):
    """Rate a model's answers to ``rows`` (dicts with the template's input fields; their answer field, when
    present, is the reference the scorer uses). ``store``: a PreferenceStore or a folder for one.
    ``model_label``: which model answers (kept with every rating), e.g. "base" or a run's name."""

    def __init__(self, model, tokenizer, template: Template, rows: Sequence[dict], *,
                 store: PreferenceStore | str, k: int = 2, temperature: float = 0.8, top_p: float = 0.95,
                 max_new_tokens: int = 32, model_label: str = "base",
                 scorer: Callable[[str, dict], float] | None = None, seed: int = 0):
        _check_sampling(k, temperature, top_p, max_new_tokens)
        template.check_columns(sorted({c for r in rows for c in r} | {template.answer_field}))
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.store = store if isinstance(store, PreferenceStore) else PreferenceStore(store, template)
        if self.store.template is None:
            self.store.template = template
        self.rows = [dict(r) for r in rows]
        self.k, self.temperature, self.top_p, self.max_new_tokens = k, float(temperature), float(top_p), max_new_tokens
        self.model_label, self.scorer, self.seed = str(model_label), scorer, seed
        self.current: Item | None = None
        self.history: list[Item] = []  # rated items, for undo
        self.error: BaseException | None = None
        self.autolabel_progress = (0, 0)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = False  # background work running (cleared before its last notification)
        self._job = ""
        self._draws = 0
        self._listeners = []
        done = self.store.done_keys()
        self._queue = [r for r in self.rows if prompt_key(template, r) not in done]

    # ---- sampling --------------------------------------------------------------------------------------
    @property
    def sampling(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}

    def set_sampling(self, *, k: int | None = None, temperature: float | None = None, top_p: float | None = None,
                     max_new_tokens: int | None = None) -> None:
        """New settings for the next prompts (the candidates shown stay)."""
        k = self.k if k is None else k
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_sampling(k, temperature, top_p, max_new_tokens)
        self.k, self.temperature, self.top_p, self.max_new_tokens = k, float(temperature), float(top_p), max_new_tokens

    @property
    def busy(self) -> bool:
        """Sampling or labelling in the background (already False when its final event is sent)."""
        return self._active

    @property
    def stopped(self) -> bool:
        """The last background work was ended by Stop (nothing samples until start())."""
        return self._stop.is_set() and not self._active

    @property
    def remaining(self) -> int:
        return len(self._queue) + (1 if self.current is not None else 0)

    def _sample(self, rows: list[dict]) -> tuple[list[list[str]], dict]:
        """The candidates of ``rows`` and the settings they were drawn with (read once: a change of the
        settings while sampling applies to the next draw, and every rating records what was used)."""
        from ..engine.preference import sample_candidates

        self._draws += 1
        used = {**self.sampling, "seed": self.seed * 100003 + self._draws}
        cands = sample_candidates(self.model, self.tokenizer, self.template, rows, k=used["k"],
                                  temperature=used["temperature"], top_p=used["top_p"],
                                  max_new_tokens=used["max_new_tokens"], seed=used["seed"], stop=self._stop)
        return cands, used

    def _run(self, work: Callable[[], str | None], name: str, then: Callable[[], None] | None = None) -> None:
        """``work`` in a thread; the event it returns is sent once ``busy`` is False (so a view drawing on
        it enables the controls), then ``then`` runs (unless the work failed)."""
        with self._lock:
            if self.busy:
                raise RuntimeError("the model is busy (sampling or labelling); wait for it or press Stop")
            self._stop = threading.Event()
            self.error = None
            self._active, self._job = True, name

        def target():
            event = None
            try:
                event = work()
            except BaseException as exc:  # noqa: BLE001 - kept and shown by the view
                self.error = exc
                event = FAILED
            finally:
                with self._lock:
                    self._active = False
            if event is not None:
                self._notify(event)
            if then is not None and event != FAILED:
                then()

        self._thread = threading.Thread(target=target, name=f"sftkit-feedback-{name}", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Sample candidates for the next prompt in the background (notifies READY, or DONE at the end;
        STOPPED when Stop ends it: the same prompt is sampled by the next start()). While the scorer labels,
        nothing starts: the scorer's job samples the next prompt when it ends."""
        with self._lock:
            if self.busy:
                return  # already sampling (or labelling): it notifies when done
            if self.current is not None:
                self._notify(READY)
                return
            if not self._queue:
                self._notify(DONE)
                return
            row = self._queue[0]

            def work():
                self._notify(SAMPLING)
                cands, used = self._sample([row])
                candidates = cands[0]
                if self._stop.is_set():
                    return STOPPED
                with self._lock:
                    if self._queue and self._queue[0] is row:
                        self._queue.pop(0)
                    self.current = Item(row, self.template.user_text(row), candidates, sampling=used)
                return READY

            self._run(work, "sample")

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the background work ends; True if it has. Raises what the work raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None:
            thread = self._thread
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread is self._thread or thread.is_alive():  # no follow-up job started (or out of time)
                break
        if self.error is not None:
            raise self.error
        return not self.busy

    def wait_ready(self, timeout: float = 600.0) -> Item | None:
        """Until the current prompt's candidates are there (scripts and tests)."""
        deadline = time.monotonic() + timeout
        while self.current is None and time.monotonic() < deadline:
            if not self.busy:
                if self.error is not None:
                    raise self.error
                if not self._queue:
                    return None
                self.start()
            time.sleep(0.02)
        return self.current

    # ---- rating --------------------------------------------------------------------------------------------
    def _need_item(self) -> Item:
        if self.current is None:
            raise RuntimeError("no answers to rate yet: they are being sampled" if self.busy else
                               "no prompt to rate: start() samples the next one")
        return self.current

    def _common(self, item: Item) -> dict:
        return {"model": self.model_label, "sampling": item.sampling or self.sampling, "candidates": tuple(item.candidates)}

    def _advance(self, item: Item) -> None:
        with self._lock:
            self.history.append(item)
            self.current = None
        self._notify(RATED)
        self.start()

    def _check_index(self, item: Item, i: int, what: str) -> None:
        if not isinstance(i, int) or not 0 <= i < len(item.candidates):
            raise ValueError(f"{what}={i!r} is not allowed; allowed: 0 to {len(item.candidates) - 1} "
                             f"(the {len(item.candidates)} candidates)")

    def rank(self, order: Sequence[int]) -> int:
        """Candidates best first (every candidate once): each beats every later one. Returns the pairs made."""
        item = self._need_item()
        order = list(order)
        if sorted(order) != list(range(len(item.candidates))):
            raise ValueError(f"order={order!r} is not allowed; allowed: each of 0..{len(item.candidates) - 1} once, "
                             "best first")
        group, n = uuid.uuid4().hex[:12], 0
        seen: set[tuple[str, str]] = set()
        for a_pos, a in enumerate(order):
            for b in order[a_pos + 1:]:
                ca, cb = item.candidates[a], item.candidates[b]
                if ca.strip() != cb.strip() and (ca, cb) not in seen:
                    seen.add((ca, cb))
                    self.store.add("pair", item.row, item.prompt, chosen=ca, rejected=cb, group=group,
                                   **self._common(item))
                    n += 1
        if n == 0:  # every candidate the same: nothing to prefer
            self.store.add("tie", item.row, item.prompt, group=group, **self._common(item))
        self._advance(item)
        return n

    def better(self, i: int, j: int | None = None) -> None:
        """Candidate ``i`` is better than ``j`` (default: than every other one)."""
        item = self._need_item()
        self._check_index(item, i, "better")
        others = [j] if j is not None else [x for x in range(len(item.candidates)) if x != i]
        for x in others:
            self._check_index(item, x, "than")
        group = uuid.uuid4().hex[:12]
        made = 0
        for x in others:
            if x != i and item.candidates[x].strip() != item.candidates[i].strip():
                self.store.add("pair", item.row, item.prompt, chosen=item.candidates[i], rejected=item.candidates[x],
                               group=group, **self._common(item))
                made += 1
        if not made:
            self.store.add("tie", item.row, item.prompt, group=group, **self._common(item))
        self._advance(item)

    def tie(self) -> None:
        """No preference: counted as rated, trains nothing."""
        item = self._need_item()
        self.store.add("tie", item.row, item.prompt, **self._common(item))
        self._advance(item)

    def both_bad(self) -> None:
        """Every candidate is bad: no pair (kto: each one a bad answer). Writing a better one is ``edit``."""
        item = self._need_item()
        self.store.add("both_bad", item.row, item.prompt, **self._common(item))
        self._advance(item)

    def thumbs(self, i: int, up: bool) -> None:
        """One candidate good or bad (kto rows). The prompt moves on once every candidate has a thumb."""
        item = self._need_item()
        self._check_index(item, i, "candidate")
        rating = self.store.add("single", item.row, item.prompt, completion=item.candidates[i], label=bool(up),
                                **self._common(item))
        item.thumbs[i], item.thumb_ids[i] = bool(up), rating.id
        if len(item.thumbs) == len(item.candidates):
            self._advance(item)
        else:
            self._notify(RATED)

    def edit(self, text: str) -> int:
        """A better answer written by hand: it is the chosen one against every candidate. Returns the pairs."""
        item = self._need_item()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the written answer is empty; write the answer the model should have given")
        group, n = uuid.uuid4().hex[:12], 0
        for c in dict.fromkeys(item.candidates):
            if c.strip() != text.strip():
                self.store.add("pair", item.row, item.prompt, chosen=text, rejected=c, group=group,
                               **{**self._common(item), "model": f"{self.model_label} + written by hand"})
                n += 1
        if n == 0:
            self.store.add("tie", item.row, item.prompt, group=group, **self._common(item))
        self._advance(item)
        return n

    def skip(self) -> None:
        item = self._need_item()
        self.store.add("skip", item.row, item.prompt, **self._common(item))
        self._advance(item)

    def undo(self) -> bool:
        """Take back the person's last rating action (never the scorer's); its prompt (with the same
        candidates) is shown again. Sampling of the next prompt is stopped; the scorer goes on."""
        if self.busy and self._job == "sample":
            self.stop()
            self.wait()
        gone = self.store.undo(source="person")
        if not gone:
            return False
        key, ids = gone[0].key, {g.id for g in gone}
        with self._lock:
            if self.current is not None and prompt_key(self.template, self.current.row) == key:
                self.current.forget(ids)
            else:
                if self.current is not None:  # back in the queue, first
                    self._queue.insert(0, self.current.row)
                item = next((h for h in reversed(self.history) if prompt_key(self.template, h.row) == key), None)
                if item is not None:
                    self.history.remove(item)
                    item.forget(ids)
                else:  # rated in an earlier session: its stored candidates, and the thumbs still stored
                    g = gone[0]
                    item = Item(dict(g.row), g.prompt, list(g.candidates) or [c for c in (g.chosen, g.rejected) if c],
                                sampling=g.sampling)
                    for r in self.store.ratings():
                        if r.kind == "single" and r.key == key and r.source == "person":
                            i = next((j for j, c in enumerate(item.candidates) if c == r.completion
                                      and j not in item.thumbs), None)
                            if i is not None:
                                item.thumbs[i], item.thumb_ids[i] = bool(r.label), r.id
                self.current = item
        self._notify(RATED)
        return True

    # ---- labels from a scorer ---------------------------------------------------------------------------------
    def autolabel(self, n: int | None = None, *, batch_size: int = 8) -> None:
        """In the background: sample candidates for the next ``n`` prompts (default all left) and label them
        with the scorer (each correct candidate beats each incorrect one; source "scorer"). Progress is
        ``autolabel_progress`` (done, total); Stop keeps what is done."""
        if self.scorer is None:
            raise ValueError("no scorer: pass scorer= (e.g. teaching_task('dates').score) to label automatically")
        missing = [i for i, r in enumerate(self._queue) if r.get(self.template.answer_field) is None]
        if missing:
            raise ValueError(f"the scorer needs each row's reference answer ({self.template.answer_field!r}); "
                             f"{len(missing)} prompt(s) lack it")
        with self._lock:
            todo = self._queue[: (len(self._queue) if n is None else n)]
        self.autolabel_progress = (0, len(todo))

        def work():
            done = 0
            for start in range(0, len(todo), batch_size):
                if self._stop.is_set():
                    break
                batch = todo[start:start + batch_size]
                cands, used = self._sample(batch)
                if self._stop.is_set():
                    break
                for row, candidates in zip(batch, cands):
                    scores = [float(self.scorer(c, row)) for c in candidates]
                    prompt = self.template.user_text(row)
                    common = {"model": self.model_label, "sampling": used, "candidates": tuple(candidates),
                              "source": "scorer"}
                    pairs = scorer_pairs(candidates, scores)
                    group = uuid.uuid4().hex[:12]
                    for chosen, rejected in pairs:
                        self.store.add("pair", row, prompt, chosen=chosen, rejected=rejected, group=group, **common)
                    if not pairs:
                        self.store.add("tie" if any(scores) else "both_bad", row, prompt, group=group, **common)
                    with self._lock:
                        if row in self._queue:
                            self._queue.remove(row)
                    done += 1
                self.autolabel_progress = (done, len(todo))
                self._notify(PROGRESS)
            if not self._queue and self.current is None:
                return DONE
            return STOPPED if self._stop.is_set() and self.current is None else RATED

        # the person may have rated the prompt shown meanwhile (start() waits while the scorer works): go on
        self._run(work, "autolabel", then=lambda: None if self._stop.is_set() else self.start())

    # ---- what the view shows ------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def warnings(self) -> list[str]:
        return preference_warnings(self.counts()["pairs"], [])

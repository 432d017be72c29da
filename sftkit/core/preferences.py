"""Preferences: ratings of a model's answers, kept as they are made, and the rows a preference run trains on.

A rating is one JSON line appended to ``ratings.jsonl`` (in the run store's ``feedback/<name>/`` folder)
and fsync'd before the call returns, so a kernel that dies between two ratings loses none of them. The
file is only ever appended to: undo appends an ``undo`` record naming the rating it takes back, and a
torn last line (a kill in the middle of a write) is skipped by the reader. Reopening the store continues
where it stopped: the prompts already rated or skipped are known.

Each record keeps what it needs to be trained on and audited: the prompt's input fields (``row``), the
user text, ``chosen`` / ``rejected`` (a pair) or ``completion`` + ``label`` (a thumbs up/down), who
labelled it (``source``: person or scorer), which model and sampling settings produced the answers, and
the time.

Two outputs: ``rows(objective)`` are sftkit data rows (the template's input fields plus ``chosen`` and
``rejected``, or ``completion`` and ``label``), what a ``RunConfig`` with ``objective: dpo|kto`` trains on;
``export_trl`` writes TRL's standard conversational format (prompt/chosen/rejected or
prompt/completion/label), loadable by ``datasets``.

The checks a preference run's rows get before anything starts (``check_preference_rows``) and the split
by prompt (no prompt in both the training and the held-out pairs: ``split_by_prompt``) are here too.
Pure Python.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from .data import DataError
from .template import Template, as_text

RATINGS_FILE = "ratings.jsonl"
COLUMNS = {"dpo": ("chosen", "rejected"), "kto": ("completion", "label")}
KINDS = ("pair", "single", "tie", "both_bad", "skip", "undo")
SOURCES = ("person", "scorer")
FEW_PAIRS = 50  # fewer held-out + training pairs than this: results are noise, and the views say so
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "good", "up"), ("false", "0", "no", "bad", "down")


# ---- the rows of a preference run -----------------------------------------------------------------------
def prompt_key(template: Template, row: dict) -> str:
    """What identifies a prompt: its input fields' text (two rows with the same key are the same prompt)."""
    return json.dumps([as_text(row.get(f)) for f in template.input_fields], ensure_ascii=False)


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise DataError(f"{where}: label={value!r} is not allowed; allowed: true or false (also 1/0, yes/no)")


def _first(ix: list[int], n: int = 5) -> str:
    return ", ".join(str(i) for i in ix[:n]) + (f", ... ({len(ix)} in all)" if len(ix) > n else "")


def check_preference_rows(template: Template, rows: Sequence[dict], objective: str,
                          source: str = "data") -> list[dict]:
    """The rows of a dpo / kto run, checked and normalized (labels as booleans). Errors name the missing
    column (and which columns the data has) or the rows with an empty value."""
    if objective not in COLUMNS:
        raise DataError(f"objective={objective!r} has no preference columns; allowed: {', '.join(COLUMNS)}")
    if not rows:
        raise DataError(f"{source} has no rows")
    present = sorted({k for r in rows for k in r})
    needed = list(template.input_fields) + list(COLUMNS[objective])
    missing = [c for c in needed if c not in present]
    if missing:
        what = "the template's input field" if missing[0] in template.input_fields else f"a {objective} column"
        raise DataError(f"{source}: column {missing[0]!r} is missing ({what}); objective {objective} needs "
                        f"{', '.join(needed)}; the data has {', '.join(present) or 'no columns'}")
    out: list[dict] = []
    empty: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        row = dict(row)
        for c in needed:
            if c == "label":
                continue
            if row.get(c) is None or (c in COLUMNS[objective] and not as_text(row.get(c)).strip()):
                empty.setdefault(c, []).append(i)
        if objective == "kto":
            if row.get("label") is None:
                empty.setdefault("label", []).append(i)
            else:
                row["label"] = _label(row["label"], f"{source} row {i}")
        out.append(row)
    if empty:
        problems = "; ".join(f"{len(ix)} row(s) have no {c!r} (rows {_first(ix)}, 0-based)" for c, ix in empty.items())
        raise DataError(f"{source}: {problems}; fill or drop them")
    if objective == "dpo":
        same = [i for i, r in enumerate(out) if as_text(r["chosen"]).strip() == as_text(r["rejected"]).strip()]
        if same:
            raise DataError(f"{source}: {len(same)} row(s) have the same chosen and rejected answer (rows "
                            f"{_first(same)}, 0-based): a pair must differ")
    return out


def split_by_prompt(template: Template, rows: Sequence[dict], eval_fraction: float,
                    seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A train/eval split where every prompt's pairs are on one side only (several pairs of one prompt in
    both splits would make the held-out accuracy a memory test). The same for the same rows and seed."""
    keys: list[str] = []
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        k = prompt_key(template, row)
        if k not in groups:
            keys.append(k)
        groups.setdefault(k, []).append(i)
    n_eval = int(round(len(keys) * eval_fraction))
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    eval_keys = {keys[j] for j in order[:n_eval]}
    train = [dict(r) for r in rows if prompt_key(template, r) not in eval_keys]
    evals = [dict(r) for r in rows if prompt_key(template, r) in eval_keys]
    return train, evals


def answer_view(template: Template, row: dict) -> dict:
    """A preference row as an answer row (the chosen answer, or the completion, in the template's answer
    field), for rendering and samples; other rows unchanged."""
    if template.answer_field in row and row.get(template.answer_field) is not None:
        return row
    for column in ("chosen", "completion"):
        if column in row:
            return {**row, template.answer_field: row[column]}
    return row


# ---- ratings -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rating:
    """One rating as stored (see the module docstring for the fields)."""

    id: str
    kind: str
    key: str
    row: dict
    prompt: str
    source: str = "person"
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    candidates: tuple[str, ...] = ()
    model: str = ""
    sampling: dict | None = None
    time: str = ""
    undoes: str | None = None
    group: str | None = None  # ratings made by one action (a ranking of 3 gives 3 pairs): undone together

    def to_dict(self) -> dict:
        d = {"id": self.id, "kind": self.kind, "key": self.key, "row": self.row, "prompt": self.prompt,
             "source": self.source, "model": self.model, "sampling": self.sampling, "time": self.time}
        for name in ("chosen", "rejected", "completion", "label", "undoes", "group"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.candidates:
            d["candidates"] = list(self.candidates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rating":
        return cls(id=str(d["id"]), kind=str(d["kind"]), key=str(d.get("key", "")), row=dict(d.get("row") or {}),
                   prompt=str(d.get("prompt", "")), source=str(d.get("source", "person")), chosen=d.get("chosen"),
                   rejected=d.get("rejected"), completion=d.get("completion"), label=d.get("label"),
                   candidates=tuple(d.get("candidates") or ()), model=str(d.get("model", "")),
                   sampling=d.get("sampling"), time=str(d.get("time", "")), undoes=d.get("undoes"),
                   group=d.get("group"))


def append_durable(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it: on disk before this returns. A failed write is cut back."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line (a kill mid-write): keep it apart
            line = b"\n" + line
        done = 0
        try:
            while done < len(line):
                n = os.write(fd, line[done:])
                if n <= 0:
                    raise OSError(f"no progress writing {path}")
                done += n
            os.fsync(fd)
        except BaseException:
            if done:
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[dict]:
    """Whole JSON lines; a torn or unreadable line (a kill mid-write) is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and "id" in obj and "kind" in obj:
            out.append(obj)
    return out


class PreferenceStore:
    """The ratings of one feedback session: ``PreferenceStore(folder)`` (made if missing), or
    ``PreferenceStore.in_store(store, name)`` for ``<store>/feedback/<name>/``."""

    def __init__(self, folder: str | Path, template: Template | None = None):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / RATINGS_FILE
        self.template = template
        if template is not None:
            tpl_path = self.folder / "template.json"
            if not tpl_path.exists():
                from .atomic import write_text_atomic

                write_text_atomic(tpl_path, json.dumps(template.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def in_store(cls, store: str | Path, name: str, template: Template | None = None) -> "PreferenceStore":
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"feedback name={name!r} is not allowed; allowed: a short name without '/'")
        return cls(Path(store).expanduser() / "feedback" / name, template)

    # ---- writing ----------------------------------------------------------------------------------
    def add(self, kind: str, row: dict, prompt: str, *, template: Template | None = None, group: str | None = None,
            **fields) -> Rating:
        if kind not in KINDS or kind == "undo":
            raise ValueError(f"kind={kind!r} is not allowed; allowed: {', '.join(k for k in KINDS if k != 'undo')}")
        source = fields.pop("source", "person")
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not allowed; allowed: {', '.join(SOURCES)}")
        tpl = template or self.template
        key = prompt_key(tpl, row) if tpl is not None else json.dumps(prompt, ensure_ascii=False)
        inputs = {f: row.get(f) for f in tpl.input_fields} if tpl is not None else dict(row)
        if tpl is not None and tpl.answer_field in row:
            inputs[tpl.answer_field] = row[tpl.answer_field]  # the reference, when there is one (the scorer's)
        rating = Rating(id=uuid.uuid4().hex[:16], kind=kind, key=key, row=inputs, prompt=prompt, source=source,
                        time=datetime.now().isoformat(timespec="seconds"), group=group, **fields)
        append_durable(self.path, rating.to_dict())
        return rating

    def undo(self, *, source: str | None = None) -> list[Rating]:
        """Take back the last action that is not taken back yet (all ratings of its group); [] if none.
        ``source``: the last action of that source only ("person": a scorer labelling meanwhile is not undone)."""
        live = self.ratings(include_skips=True)
        if source is not None:
            live = [r for r in live if r.source == source]
        if not live:
            return []
        last = live[-1]
        gone = [r for r in live if (last.group is not None and r.group == last.group) or r.id == last.id]
        for r in gone:
            append_durable(self.path, {"id": uuid.uuid4().hex[:16], "kind": "undo", "undoes": r.id,
                                       "time": datetime.now().isoformat(timespec="seconds")})
        return gone

    # ---- reading --------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        return _read_lines(self.path)

    def ratings(self, *, include_skips: bool = False) -> list[Rating]:
        """The ratings in the order made, without the ones taken back (and skips unless asked)."""
        recs = self.records()
        undone = {r.get("undoes") for r in recs if r["kind"] == "undo"}
        out = [Rating.from_dict(r) for r in recs if r["kind"] != "undo" and r["id"] not in undone]
        return out if include_skips else [r for r in out if r.kind != "skip"]

    def done_keys(self) -> set[str]:
        """Prompts already rated or skipped: a reopened session goes on with the others."""
        return {r.key for r in self.ratings(include_skips=True)}

    def counts(self) -> dict[str, int]:
        live = self.ratings(include_skips=True)
        pairs = [r for r in live if r.kind == "pair"]
        return {"pairs": len(pairs), "by_person": sum(r.source == "person" for r in pairs),
                "by_scorer": sum(r.source == "scorer" for r in pairs),
                "singles": sum(r.kind == "single" for r in live), "skipped": sum(r.kind == "skip" for r in live),
                "prompts": len({r.key for r in live if r.kind != "skip"})}

    # ---- what a run trains on ---------------------------------------------------------------------------
    def rows(self, objective: str = "dpo", *, sources: Iterable[str] = SOURCES) -> list[dict]:
        """sftkit data rows: the input fields plus chosen/rejected (dpo), or completion/label (kto: every
        pair gives a good and a bad answer, thumbs give one, 'both bad' gives two bad ones; an answer labelled
        again keeps its place and takes the latest label)."""
        if objective not in COLUMNS:
            raise ValueError(f"objective={objective!r} is not allowed; allowed: {', '.join(COLUMNS)}")
        sources = set(sources)
        out: list[dict] = []
        seen: set[tuple] = set()
        where: dict[tuple, int] = {}  # kto: (prompt, answer) -> its row in out
        for r in self.ratings():
            if r.source not in sources:
                continue
            base = {k: v for k, v in r.row.items()}
            if objective == "dpo":
                if r.kind == "pair" and (r.key, r.chosen, r.rejected) not in seen:
                    seen.add((r.key, r.chosen, r.rejected))
                    out.append({**base, "chosen": r.chosen, "rejected": r.rejected, "source": r.source})
                continue
            items: list[tuple[str, bool]] = []
            if r.kind == "pair":
                items = [(r.chosen, True), (r.rejected, False)]
            elif r.kind == "single":
                items = [(r.completion, bool(r.label))]
            elif r.kind == "both_bad":
                items = [(c, False) for c in r.candidates]
            for text, good in items:
                if text is None:
                    continue
                row = {**base, "completion": text, "label": good, "source": r.source}
                if (r.key, text) in where:  # labelled again (a thumb changed after an undo): the latest wins
                    out[where[(r.key, text)]] = row
                else:
                    where[(r.key, text)] = len(out)
                    out.append(row)
        return out

    def save_rows(self, path: str | Path, objective: str = "dpo", **kwargs) -> Path:
        """The rows as a JSONL file a preference run's ``data.source`` can name."""
        from .atomic import write_text_atomic

        rows = self.rows(objective, **kwargs)
        if not rows:
            raise DataError(f"no {objective} rows to save yet: rate some answers first")
        return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def export_trl(self, path: str | Path, objective: str = "dpo", *, template: Template | None = None,
                   **kwargs) -> Path:
        """TRL's standard conversational format: ``prompt`` (the system and user messages), ``chosen`` /
        ``rejected`` (one assistant message each) for dpo, ``completion`` + ``label`` for kto.

        ``.parquet``: exact types, ``datasets.load_dataset("parquet", data_files=path)`` gives back the same
        strings. ``.jsonl``: one object a line; load it with
        ``features=sftkit.engine.preference.trl_features(objective)`` (pyarrow's JSON reader turns
        date-like answers such as ``2021-03-05`` into timestamps otherwise)."""
        from .atomic import write_text_atomic

        tpl = template or self.template
        if tpl is None:
            raise ValueError("export_trl needs the template that renders the prompts (template=...)")
        records = [to_trl(tpl, row, objective) for row in self.rows(objective, **kwargs)]
        if not records:
            raise DataError(f"no {objective} rows to export yet: rate some answers first")
        path = Path(path)
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(pa.Table.from_pylist(records), str(tmp))
            os.replace(tmp, path)
            return path
        return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def to_trl(template: Template, row: dict, objective: str = "dpo") -> dict:
    """One preference row in TRL's conversational format (the template's system prompt and user turn;
    without its few-shot examples, as preference runs train and candidates are sampled)."""
    prompt = template.messages(row, with_examples=False, with_answer=False)

    def answer(text) -> list[dict]:
        return [{"role": "assistant", "content": template.assistant_prefix + as_text(text)}]

    if objective == "dpo":
        return {"prompt": prompt, "chosen": answer(row["chosen"]), "rejected": answer(row["rejected"])}
    return {"prompt": prompt, "completion": answer(row["completion"]), "label": bool(row["label"])}


def scorer_pairs(candidates: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Pairs (chosen, rejected) from scored candidates: every distinct correct one beats every distinct
    incorrect one (scores > 0 count as correct)."""
    good = list(dict.fromkeys(c for c, s in zip(candidates, scores) if s > 0))
    bad = list(dict.fromkeys(c for c, s in zip(candidates, scores) if s <= 0 and c not in good))
    return [(g, b) for g in good for b in bad]



def preference_warnings(n_pairs: int | None, metrics: Sequence[dict]) -> list[str]:
    """What a preference run (or its data) should be told: too few pairs to learn or to measure anything,
    or pairs memorised (training pairs at 100% preference accuracy, held-out ones near chance)."""
    out = []
    if n_pairs is not None and n_pairs < FEW_PAIRS:
        out.append(f"only {n_pairs} preference rows (training and held-out together): with fewer than about "
                   f"{FEW_PAIRS} the held-out accuracy is mostly noise; collect more (the scorer labels hundreds "
                   "in a minute on the teaching tasks)")

    def last(key):
        vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        return vals[-1] if vals else None

    train, held = last("rewards/accuracies"), last("eval_rewards/accuracies")
    if train is not None and held is not None and train >= 0.999 and held < 0.6:
        out.append(f"the training pairs reach {train:.0%} preference accuracy but the held-out pairs only "
                   f"{held:.0%}: the run memorised its pairs instead of learning the preference; use more pairs, "
                   "fewer steps, or a higher preference.beta")
    return out

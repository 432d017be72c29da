"""Prompt templates: from a data row to token ids and the loss mask.

A ``Template`` is a system prompt, few-shot examples, a user pattern with ``{field}``
placeholders, the answer field and an optional assistant prefix. It renders through the
tokenizer's own chat template (``apply_chat_template``), with a plain fallback for
tokenizers that have none, and returns, per row, the text, the token ids and the loss
mask (which tokens are trained).

The conversation is cut into segments (prompt, answer, end-of-turn, trailing text),
each tokenized on its own and concatenated. The mask is exact by construction, and the
prompt tokens are the ones generation sees, so training and inference never disagree at
the prompt/answer boundary.

Pure Python: the tokenizer is passed in and used through its public methods.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError

TRAIN_ON = ("completion", "all")
PLAIN_USER_HEADER = "### Input:\n"
PLAIN_ASSISTANT_HEADER = "### Response:\n"


class TemplateError(ConfigError):
    """The template and the data don't fit together; the message names the field or rows."""


def placeholders(pattern: str, where: str = "user_pattern") -> list[str]:
    """The ``{name}`` placeholders a pattern uses, in order, without repeats.

    Only plain names are allowed: a format spec (``{q:>9}``), a conversion (``{q!r}``),
    an attribute or an index (``{q.x}``, ``{q[0]}``) is an error naming ``where``.
    Literal braces are written ``{{`` and ``}}``.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise TemplateError(f"{where} {pattern!r} is not a valid pattern: {exc} "
                            "(write literal braces as '{{' and '}}')") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or (name and not name.isidentifier() and _looks_like_access(name)):
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(
                f"{where} has the placeholder {written}; allowed: only plain {{name}} placeholders "
                "(no format spec ':...', conversion '!r', attribute '.x' or index '[0]'); "
                "write literal braces as '{{' and '}}'"
            )
        if name == "" or not name.isidentifier():
            raise TemplateError(
                f"{where} has the placeholder {{{name}}}; placeholders must be column "
                "names like {question} (write literal braces as '{{' and '}}')"
            )
        if name not in names:
            names.append(name)
    return names


def _looks_like_access(name: str) -> bool:
    """``q.attr`` or ``q[0]``: a name followed by attribute or index access."""
    head = name.split(".", 1)[0].split("[", 1)[0]
    return head != name


def check_pattern_columns(pattern: str, columns: Sequence[str]) -> None:
    """Every placeholder of ``pattern`` must be one of ``columns``; the error names it and lists them."""
    for name in placeholders(pattern):
        if name not in columns:
            raise TemplateError(
                f"placeholder {{{name}}} in user_pattern is not a column of the data; "
                f"columns: {', '.join(columns) or '(none)'}"
            )


@dataclass(frozen=True)
class Segment:
    """A token range of a rendered example with a role: system, example, user, answer, end, other."""

    role: str
    start: int
    end: int


@dataclass(frozen=True)
class RenderedExample:
    text: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 = trained, 0 = masked; same length as input_ids
    segments: tuple[Segment, ...]
    prompt_length: int  # number of prompt tokens (what generation is given)
    full_length: int  # tokens before truncation
    truncated: bool
    end_of_turn: str  # the text that ends the assistant turn (trained in completion mode)
    end_trained: bool  # the whole end-of-turn survived truncation and is trained

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)

    @property
    def labels(self) -> list[int]:
        """input_ids with masked positions set to -100, as transformers' loss expects."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.loss_mask)]


@dataclass(frozen=True)
class ValidationReport:
    n_rows: int
    warnings: tuple[str, ...]
    n_too_long: int
    n_no_trained: int
    lengths: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.warnings


@dataclass
class Template:
    """How a data row becomes a chat conversation to train on.

    user_pattern: the user turn, with ``{column}`` placeholders.
    answer_field: the column holding the assistant's answer (the trained text).
    system: system prompt; None keeps the chat template's own default, "" sends none.
    examples: few-shot rows (dicts with the pattern's fields and the answer field),
        rendered as earlier user/assistant turns.
    assistant_prefix: text the assistant turn starts with (part of the prompt).
    train_on: "completion" (answer + end-of-turn only) or "all" (every token).
    max_length: tokens kept per example; longer ones are cut at the end.
    """

    user_pattern: str = "{question}"
    answer_field: str = "answer"
    system: str | None = None
    examples: list[dict] = field(default_factory=list)
    assistant_prefix: str = ""
    train_on: str = "completion"
    max_length: int = 512

    def __post_init__(self):
        _need(isinstance(self.user_pattern, str), "user_pattern", self.user_pattern,
              "a string with {column} placeholders, e.g. 'Question: {question}'")
        if not self.user_pattern.strip():
            raise TemplateError("user_pattern is empty: write the user turn, e.g. 'Question: {question}'")
        placeholders(self.user_pattern)
        _need(isinstance(self.answer_field, str), "answer_field", self.answer_field,
              "a column name (a string)")
        if not self.answer_field:
            raise TemplateError("answer_field is empty: name the column holding the answer")
        _need(self.system is None or isinstance(self.system, str), "system", self.system, "a string or null")
        _need(isinstance(self.assistant_prefix, str), "assistant_prefix", self.assistant_prefix,
              "a string ('' for none)")
        if not (isinstance(self.train_on, str) and self.train_on in TRAIN_ON):
            raise TemplateError(f"template.train_on={self.train_on!r} is not allowed; allowed: {', '.join(TRAIN_ON)}")
        _need(_is_int(self.max_length), "max_length", self.max_length, "an integer >= 8")
        if self.max_length < 8:
            raise TemplateError(f"template.max_length={self.max_length!r} is too small; allowed: an integer >= 8")
        examples = [] if self.examples is None else self.examples
        _need(isinstance(examples, (list, tuple)), "examples", examples,
              "a list of mappings (few-shot rows with the pattern's fields and the answer field)")
        for i, ex in enumerate(examples):
            _need(isinstance(ex, dict) and all(isinstance(k, str) for k in ex), f"examples[{i}]", ex,
                  f"a mapping of field names to values ({', '.join(self.fields)})")
        self.examples = [dict(e) for e in examples]
        for i, ex in enumerate(self.examples):
            missing = [f for f in self.fields if f not in ex]
            if missing:
                raise TemplateError(f"few-shot example {i} lacks {', '.join(missing)}; it has {', '.join(ex) or 'no fields'}")

    # ---- structure -------------------------------------------------------------------
    @property
    def input_fields(self) -> list[str]:
        return placeholders(self.user_pattern)

    @property
    def fields(self) -> list[str]:
        names = self.input_fields
        return names + ([self.answer_field] if self.answer_field not in names else [])

    def user_text(self, row: dict) -> str:
        return self.user_pattern.format(**{k: _as_text(row.get(k)) for k in self.input_fields})

    def messages(self, row: dict, *, with_examples: bool = True, with_answer: bool = True) -> list[dict]:
        msgs: list[dict] = []
        if self.system is not None and self.system != "":
            msgs.append({"role": "system", "content": self.system})
        if with_examples:
            for ex in self.examples:
                msgs.append({"role": "user", "content": self.user_text(ex)})
                msgs.append({"role": "assistant", "content": self.assistant_prefix + _as_text(ex[self.answer_field])})
        msgs.append({"role": "user", "content": self.user_text(row)})
        if with_answer:
            msgs.append({"role": "assistant", "content": self.assistant_prefix + _as_text(row.get(self.answer_field))})
        return msgs

    def with_examples(self, examples: Sequence[dict]) -> "Template":
        return Template(**{**self.to_dict(), "examples": [dict(e) for e in examples]})

    # ---- rendering ------------------------------------------------------------------
    def prompt_text(self, row: dict, tokenizer, *, with_examples: bool = True) -> str:
        """The text generation starts from: the conversation up to the assistant's answer."""
        msgs = self.messages(row, with_examples=with_examples, with_answer=False)
        if _has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = _plain_render(msgs, tokenizer, generation_prompt=True)
        return text + self.assistant_prefix

    def render(self, row: dict, tokenizer, *, with_examples: bool = True) -> RenderedExample:
        """Text, token ids and loss mask of one row (the answer taken from ``answer_field``)."""
        msgs = self.messages(row, with_examples=with_examples, with_answer=True)
        answer = _as_text(row.get(self.answer_field))
        prompt = self.prompt_text(row, tokenizer, with_examples=with_examples)
        if _has_chat_template(tokenizer):
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
        else:
            full = _plain_render(msgs, tokenizer, generation_prompt=False)
        if not full.startswith(prompt + answer):
            raise TemplateError(
                "the tokenizer's chat template does not render the conversation as "
                "prompt + answer (it rewrites earlier turns or the answer); sftkit can't "
                "tell which tokens to train. Use a tokenizer without that template logic."
            )
        tail = full[len(prompt) + len(answer):]
        end_of_turn = tail.rstrip()
        trailing = tail[len(end_of_turn):]
        if not end_of_turn and getattr(tokenizer, "eos_token", None):
            end_of_turn = tokenizer.eos_token  # templates that don't close the turn: train EOS
        pieces = [("prompt", prompt), ("answer", answer), ("end", end_of_turn), ("other", trailing)]
        ids, prompt_offsets = _encode_prompt(tokenizer, prompt)
        roles: list[str] = ["prompt"] * len(ids)
        for role, text in pieces[1:]:
            if not text:
                continue
            piece_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += piece_ids
            roles += [role] * len(piece_ids)
        prompt_len = roles.count("prompt")
        if self.train_on == "all":
            mask = [1] * len(ids)
        else:
            mask = [1 if r in ("answer", "end") else 0 for r in roles]
        segments = _prompt_segments(self, row, prompt, prompt_offsets, prompt_len, with_examples) + _role_segments(roles)
        full_length = len(ids)
        end_positions = [i for i, r in enumerate(roles) if r == "end"]
        end_trained = bool(end_positions) and end_positions[-1] < self.max_length and all(
            mask[i] for i in end_positions)
        truncated = full_length > self.max_length
        if truncated:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            segments = [Segment(s.role, s.start, min(s.end, self.max_length))
                        for s in segments if s.start < self.max_length]
        return RenderedExample(
            text=prompt + answer + end_of_turn + trailing,
            input_ids=ids,
            loss_mask=mask,
            segments=tuple(segments),
            prompt_length=min(prompt_len, len(ids)),
            full_length=full_length,
            truncated=truncated,
            end_of_turn=end_of_turn,
            end_trained=end_trained,
        )

    # ---- validation ------------------------------------------------------------------
    def check_columns(self, columns: Iterable[str]) -> None:
        """Every placeholder and the answer field must be columns of the data."""
        columns = list(columns)
        check_pattern_columns(self.user_pattern, columns)
        if self.answer_field not in columns:
            raise TemplateError(
                f"answer_field {self.answer_field!r} is not a column of the data; "
                f"columns: {', '.join(columns) or '(none)'}"
            )

    def check_rows(self, rows: Sequence[dict]) -> None:
        """Rows missing a field or with an empty answer are errors naming the first rows (0-based).

        A missing input field, a missing (or null) answer field and an empty answer are
        told apart; every problem found is in the one message.
        """
        if not rows:
            raise TemplateError("the data has no rows")
        self.check_columns(_columns(rows))
        missing: list[int] = []
        no_answer: list[int] = []
        empty: list[int] = []
        for i, row in enumerate(rows):
            if any(row.get(f) is None for f in self.input_fields):
                missing.append(i)
            answer = row.get(self.answer_field)
            if answer is None:
                if self.answer_field not in self.input_fields:  # else already counted as missing
                    no_answer.append(i)
            elif _as_text(answer).strip() == "":
                empty.append(i)
        problems = []
        if missing:
            problems.append(f"{len(missing)} row(s) lack a value for {', '.join(self.input_fields)}: rows "
                            f"{_first(missing)} (0-based); fill or drop them")
        if no_answer:
            problems.append(f"{len(no_answer)} row(s) lack the answer field {self.answer_field!r}: rows "
                            f"{_first(no_answer)} (0-based); fill or drop them")
        if empty:
            problems.append(f"{len(empty)} row(s) have an empty {self.answer_field!r}: rows {_first(empty)} "
                            "(0-based); an empty answer trains nothing but the end of the turn")
        if problems:
            raise TemplateError("; ".join(problems))

    def structured_fields(self, rows: Sequence[dict]) -> dict[str, list[int]]:
        """The template's fields that hold lists or dicts, with the rows (0-based) where they do.

        Such values are rendered as JSON; a view can say so.
        """
        out: dict[str, list[int]] = {}
        for f in self.fields:
            hits = [i for i, row in enumerate(rows) if isinstance(row.get(f), (list, tuple, dict))]
            if hits:
                out[f] = hits
        return out

    def validate(self, rows: Sequence[dict], tokenizer, *, with_examples: bool = True) -> ValidationReport:
        """Check data against the template before any compute: errors raise, warnings return.

        Errors: a placeholder or the answer field not among the columns, rows with
        missing fields or empty answers. Warnings: rows longer than max_length (count and
        what truncation does), rows with nothing trained after truncation, rows whose
        end-of-turn is cut off or untrained (the model would never learn to stop).
        """
        self.check_rows(rows)
        warnings: list[str] = []
        lengths: list[int] = []
        too_long: list[int] = []
        no_trained: list[int] = []
        no_end: list[int] = []
        for i, row in enumerate(rows):
            r = self.render(row, tokenizer, with_examples=with_examples)
            lengths.append(r.full_length)
            if r.truncated:
                too_long.append(i)
            if r.n_trained == 0:
                no_trained.append(i)
            elif not r.end_trained:
                no_end.append(i)
        if too_long:
            warnings.append(
                f"{len(too_long)} of {len(rows)} row(s) are longer than max_length={self.max_length} "
                f"tokens (rows {_first(too_long)}; longest {max(lengths)}): they are cut at the end, "
                "so the end of their answer is not trained. Raise max_length or shorten them."
            )
        if no_trained:
            warnings.append(
                f"{len(no_trained)} row(s) have zero trained tokens after truncation (rows "
                f"{_first(no_trained)}): the prompt fills max_length, so they teach nothing and the "
                "model never sees how the answer ends."
            )
        if no_end:
            warnings.append(
                f"{len(no_end)} row(s) lose their end-of-turn token to truncation (rows "
                f"{_first(no_end)}): trained on answers that never end, the model would never "
                "learn to stop."
            )
        if self.train_on == "completion" and not _end_token_is_trainable(self, tokenizer):
            warnings.append(
                "the end-of-turn token is not trained: the chat template puts nothing after the "
                "answer and the tokenizer has no EOS token, so the model would never learn to stop."
            )
        return ValidationReport(len(rows), tuple(warnings), len(too_long), len(no_trained), tuple(lengths))

    # ---- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Template":
        if not isinstance(data, dict):
            raise TemplateError(f"template={data!r} is not allowed; allowed: a mapping of template fields "
                                f"({', '.join(cls.__dataclass_fields__)})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise TemplateError(f"unknown template field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        import yaml

        from .atomic import write_text_atomic

        path = Path(path)
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


# ---- helpers --------------------------------------------------------------------------
def as_text(value: Any) -> str:
    """A row value as the text that is trained on: lists and dicts as JSON, None as ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):  # not JSON-able (e.g. a set inside): fall back to str
            return str(value)
    return str(value)


_as_text = as_text


def _need(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise TemplateError(f"template.{name}={value!r} is not allowed; allowed: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _first(indices: list[int], n: int = 5) -> str:
    shown = ", ".join(map(str, indices[:n]))
    return shown + (f" and {len(indices) - n} more" if len(indices) > n else "")


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_render(msgs: list[dict], tokenizer, *, generation_prompt: bool) -> str:
    """A readable fallback for tokenizers without a chat template."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    out = []
    for m in msgs:
        if m["role"] == "system":
            out.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            out.append(PLAIN_USER_HEADER + m["content"] + "\n\n")
        else:
            out.append(PLAIN_ASSISTANT_HEADER + m["content"] + eos + "\n\n")
    if generation_prompt:
        out.append(PLAIN_ASSISTANT_HEADER)
    return "".join(out)


def _role_segments(roles: list[str]) -> list[Segment]:
    segs: list[Segment] = []
    for i, role in enumerate(roles):
        if role == "prompt":
            continue
        if segs and segs[-1].role == role and segs[-1].end == i:
            segs[-1] = Segment(role, segs[-1].start, i + 1)
        else:
            segs.append(Segment(role, i, i + 1))
    return segs


def _encode_prompt(tokenizer, prompt: str) -> tuple[list[int], list | None]:
    """The prompt's ids and, from a fast tokenizer, its character offsets (one pass)."""
    if not prompt:
        return [], None
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), None


def _prompt_segments(tpl: Template, row: dict, prompt: str, offsets: list | None, prompt_len: int,
                     with_examples: bool) -> list[Segment]:
    """Token spans of the system prompt, each few-shot example and the final user turn.

    Needs a fast tokenizer's offsets; without them the prompt is one "prompt" span.
    """
    if offsets is None:
        return [Segment("prompt", 0, prompt_len)] if prompt_len else []
    spans: list[tuple[str, int, int]] = []  # role, char start, char end
    pos = 0

    def find(text: str) -> tuple[int, int] | None:
        nonlocal pos
        at = prompt.find(text, pos) if text else -1
        if at < 0:
            return None
        pos = at + len(text)
        return at, pos

    if tpl.system and (hit := find(tpl.system)):
        spans.append(("system", *hit))
    for ex in tpl.examples if with_examples else ():
        user = find(tpl.user_text(ex))
        answer = find(tpl.assistant_prefix + _as_text(ex[tpl.answer_field]))
        if user and answer:
            spans.append(("example", user[0], answer[1]))
    if hit := find(tpl.user_text(row)):
        spans.append(("user", *hit))
    segs: list[Segment] = []
    for role, cs, ce in spans:
        toks = [i for i, (a, b) in enumerate(offsets[:prompt_len]) if b > cs and a < ce]
        if toks:
            segs.append(Segment(role, toks[0], toks[-1] + 1))
    return segs


def _end_token_is_trainable(tpl: Template, tokenizer) -> bool:
    probe = {f: "x" for f in tpl.fields}
    try:
        r = tpl.render(probe, tokenizer, with_examples=False)
    except TemplateError:
        return False
    return bool(r.end_of_turn)

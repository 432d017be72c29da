"""Config fields that describe themselves: help, allowed values and a widget hint as field metadata.

A config dataclass declares each field once, with ``setting(default, help=..., allowed=..., widget=...)``:
a plain ``dataclasses.field(default=..., metadata={...})`` (as peft's and litgpt's configs do).
Everything else is derived from that declaration:

- the check in ``__post_init__`` (``check_fields``), with a message naming the dotted field and
  what is allowed, and the numeric-string coercion (YAML reads ``2e-4`` as a string);
- the example config's comment above the field (its help and allowed values);
- the launcher's knob for it (``knob_of``: label, widget kind, range, step, choices, help).

Rules between fields (early stopping needs evaluations, ...) stay explicit code in the config.
Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

# the metadata keys a ``setting`` declares
HELP, ALLOWED, WIDGET, LABEL, STEP = "help", "allowed", "widget", "label", "step"
# the widget hints, and the kind of allowed values each one edits
WIDGETS = {"int": "Int", "float": "Float", "log_float": "Float", "choice": "Choice", "bool": "Flag", "text": "Text"}
# what a bounded widget shows as the upper end of a field with no upper bound
WIDGET_CAP = 10**7


def parse_number(text: str, *, whole: bool) -> int | float | None:
    """``'8'`` -> 8, ``'2e-4'`` -> 0.0002, ``'1e3'`` -> 1000 if ``whole``; None for anything else."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if whole:
        return int(number) if number.is_integer() else None
    return number


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


# ---- allowed values -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Allowed(ABC):
    """What a field allows (each kind below says which values and in which words).

    ``null``: None when null is not allowed, else what null means ("" for nothing to say);
    ``note``: a word on special values, shown after the description."""

    null: str | None = None
    note: str = ""

    def check(self, value) -> bool:
        if value is None:
            return self.null is not None
        return self.accepts(value)

    def describe(self) -> str:
        """``null (all) or an integer >= 2 (note)``: the words after ``allowed:`` in an error."""
        text = self.base_description()
        if self.note:
            text += f" ({self.note})"
        if self.null is not None:
            text = "null" + (f" ({self.null})" if self.null else "") + " or " + text
        return text

    def coerce(self, value):
        """The value as the field stores it, before the check (numeric strings become numbers)."""
        return value

    def normalize(self, value):
        """The value as the field stores it, after the check."""
        return value

    # each kind says these
    @abstractmethod
    def accepts(self, value) -> bool:
        """Whether ``value`` (already coerced) is allowed, null aside."""

    @abstractmethod
    def base_description(self) -> str:
        """The allowed values in words, without null and note."""


@dataclass(frozen=True)
class Number(Allowed):
    """A number between ``min`` and ``max`` (None: no bound; ``*_open``: the bound itself is out).

    ``describe_as`` replaces the generated words; ``span`` is the range a slider covers first
    (a log slider cannot reach 0); values outside it stay allowed."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    describe_as: str = ""
    span: tuple[float, float] | None = None
    kind: ClassVar[str] = "float"

    def coerce(self, value):
        if isinstance(value, str):
            number = parse_number(value, whole=self.kind == "int")
            return value if number is None else number
        return value

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return False
        return self.max is None or not (value > self.max or (self.max_open and value == self.max))

    def base_description(self) -> str:
        if self.describe_as:
            return self.describe_as
        lo, hi = self.min, self.max
        if self.kind == "int":
            if lo is not None and hi is not None:
                return f"an integer from {_fmt(lo)} to {_fmt(hi)}"
            if lo is not None:
                return f"an integer >= {_fmt(lo)}"
            return "an integer" if hi is None else f"an integer <= {_fmt(hi)}"
        if lo is not None and hi is not None:
            return f"a number in {'(' if self.min_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.max_open else ']'}"
        if lo is not None:
            return f"a number {'>' if self.min_open else '>='} {_fmt(lo)}"
        return "a number" if hi is None else f"a number {'<' if self.max_open else '<='} {_fmt(hi)}"


class Int(Number):
    """A whole number (``True``/``False`` and ``8.0`` are not)."""

    kind: ClassVar[str] = "int"


class Float(Number):
    """A finite number; a whole one stays an int (``training.warmup: 3`` is steps)."""

    kind: ClassVar[str] = "float"


@dataclass(frozen=True)
class Choice(Allowed):
    """One of ``options`` (strings). ``flags``: the options YAML's true and false stand for (a field
    that was a flag and grew an ``auto``: ``packing: true`` still reads as ``on``)."""

    options: tuple[str, ...] = ()
    flags: tuple[str, str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))  # a list or a dict's keys work too

    def coerce(self, value):
        if self.flags is not None and isinstance(value, bool):
            return self.flags[0] if value else self.flags[1]
        return value

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.options

    def base_description(self) -> str:
        return ", ".join(self.options)


@dataclass(frozen=True)
class Flag(Allowed):
    """true or false."""

    def accepts(self, value) -> bool:
        return isinstance(value, bool)

    def base_description(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text(Allowed):
    """A non-blank string of at most ``max_len`` characters, none of them in ``forbid``."""

    describe_as: str = "a non-empty string"
    max_len: int | None = None
    forbid: str = ""

    def accepts(self, value) -> bool:
        return (isinstance(value, str) and bool(value.strip()) and (self.max_len is None or len(value) <= self.max_len)
                and not any(c in value for c in self.forbid))

    def base_description(self) -> str:
        return self.describe_as


@dataclass(frozen=True)
class Names(Allowed):
    """A list of strings, stored sorted and without repeats."""

    describe_as: str = "a list of names"

    def accepts(self, value) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    def normalize(self, value):
        return sorted(set(value))

    def base_description(self) -> str:
        return self.describe_as


# ---- declaring and checking fields --------------------------------------------------------------
def setting(default: Any = MISSING, *, help: str, allowed: Allowed | None = None, widget: str | None = None,
            label: str | None = None, step: float | None = None, default_factory: Any = MISSING) -> Any:
    """A dataclass field with its help (one line), allowed values and widget hint as metadata.

    widget: the knob's kind (one of ``WIDGETS``; None: not a knob); label: the knob's words
    (default: the name with spaces); step: the knob's step (log10 units for ``log_float``).
    ``allowed=None`` is for fields checked elsewhere (a config's sections).
    """
    if not isinstance(help, str) or not help.strip() or "\n" in help:
        raise ValueError(f"help must be one non-empty line, got {help!r}")
    if widget is not None:
        if widget not in WIDGETS:
            raise ValueError(f"widget {widget!r} is not one of {', '.join(WIDGETS)}")
        if not isinstance(allowed, Allowed) or WIDGETS[widget] not in {c.__name__ for c in type(allowed).__mro__}:
            raise ValueError(f"widget {widget!r} does not edit {type(allowed).__name__} values")
    metadata = {HELP: help, ALLOWED: allowed, WIDGET: widget, LABEL: label, STEP: step}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(obj, prefix: str, error: type[Exception]) -> None:
    """Coerce, check and normalize every field of dataclass ``obj`` that declares allowed values.

    The first field out of its range raises ``error``:
    ``training.batch_size=0 is not allowed; allowed: an integer from 1 to 4096``.
    """
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get(ALLOWED)
        if allowed is None:
            continue
        value = allowed.coerce(getattr(obj, f.name))
        if not allowed.check(value):
            where = f"{prefix}.{f.name}" if prefix else f.name
            raise error(f"{where}={value!r} is not allowed; allowed: {allowed.describe()}")
        setattr(obj, f.name, allowed.normalize(value))


def comment_of(f: dataclasses.Field) -> str | None:
    """The example config's comment for a field: its help and, if it has them, its allowed values
    (None: the field declares no help)."""
    help_text = f.metadata.get(HELP)
    if not help_text:
        return None
    allowed = f.metadata.get(ALLOWED)
    if allowed is None or isinstance(allowed, Flag):  # a section, or true/false (the value shows it)
        return help_text
    return f"{help_text}. Allowed: {allowed.describe()}"


# ---- knobs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnobSpec:
    """What a widget for one config field needs, all from the field's metadata.

    min/max: the validation bounds (None: no bound; ``min_open``/``max_open``: the bound itself is
    refused). ``widget_min``/``widget_max`` are finite bounds a bounded widget can take, and
    ``log_min``/``log_max`` the exponents a log slider spans.
    """

    name: str  # dotted: "training.batch_size"
    label: str
    kind: str  # the widget hint: int, float, log_float, choice, bool, text
    min: float | None
    max: float | None
    step: float | None
    choices: tuple[str, ...]
    help: str
    min_open: bool = False
    max_open: bool = False
    nullable: bool = False
    null_means: str = ""
    allowed: str = ""  # the words of the validation message ("an integer from 1 to 4096")
    span: tuple[float, float] | None = None
    default: Any = None

    @property
    def widget_min(self) -> float:
        """0 for a nullable count (0 stands for null: its bounds start at 1 or more), else ``min``."""
        if self.kind == "int" and self.nullable:
            return 0
        if self.min is not None:
            return self.min
        return self.span[0] if self.span else -WIDGET_CAP

    @property
    def widget_max(self) -> float:
        if self.max is not None:
            return self.max
        return self.span[1] if self.span else WIDGET_CAP

    @property
    def log_min(self) -> float:
        return math.log10(self.span[0]) if self.span else math.log10(self.min or 1e-12)

    @property
    def log_max(self) -> float:
        return math.log10(self.span[1]) if self.span else math.log10(self.max or 1.0)


def knob_of(name: str, f: dataclasses.Field) -> KnobSpec | None:
    """The knob for field ``f`` (dotted ``name``), or None when it is not a knob."""
    kind = f.metadata.get(WIDGET)
    if kind is None:
        return None
    allowed = f.metadata[ALLOWED]
    number = isinstance(allowed, Number)
    step = f.metadata.get(STEP)
    if step is None and isinstance(allowed, Int):
        step = 1
    default = f.default if f.default is not MISSING else None
    return KnobSpec(
        name=name, label=f.metadata.get(LABEL) or f.name.replace("_", " "), kind=kind,
        min=allowed.min if number else None, max=allowed.max if number else None, step=step,
        choices=tuple(allowed.options) if isinstance(allowed, Choice) else (), help=f.metadata[HELP],
        min_open=number and allowed.min_open, max_open=number and allowed.max_open,
        nullable=allowed.null is not None, null_means=allowed.null or "", allowed=allowed.describe(),
        span=allowed.span if number else None, default=default)

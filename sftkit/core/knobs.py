"""The notebooks' workshop knobs: one value a notebook uses at full length, another in the fast profile.

A notebook asks ``notebook_knob("steps", 60, fast=3)``. The environment decides, in this order:
``SFTKIT_NOTEBOOK_STEPS`` (one knob, set by hand or by a test), then ``SFTKIT_NOTEBOOK_FAST=1`` (every knob
of every notebook at its fast value: the whole course in minutes, what CI runs), else the full value.
"""

from __future__ import annotations

import os

from .errors import ConfigError

FAST = "SFTKIT_NOTEBOOK_FAST"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def fast_profile() -> bool:
    """Whether ``SFTKIT_NOTEBOOK_FAST`` asks for the fast profile (a value it can't read is an error)."""
    value = os.environ.get(FAST, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{FAST}={os.environ[FAST]!r} is not allowed; allowed: 1/true/yes/on or 0/false/no/off")
    return value in _TRUE


def notebook_knob(name: str, full, fast=None):
    """The value of knob ``name`` (``steps``, ``items``, ...): ``SFTKIT_NOTEBOOK_<NAME>`` when set (read as the
    type of ``full``), else ``fast`` under ``SFTKIT_NOTEBOOK_FAST=1``, else ``full``."""
    var = "SFTKIT_NOTEBOOK_" + name.upper()
    raw = os.environ.get(var)
    if raw is not None and raw.strip():
        if isinstance(full, bool) or not isinstance(full, int):
            return raw.strip()
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a whole number; allowed: a whole number >= 1") from None
        if value < 1:
            raise ConfigError(f"{var}={raw!r} is not allowed; allowed: a whole number >= 1")
        return value
    return fast if fast is not None and fast_profile() else full


__all__ = ["notebook_knob", "fast_profile", "FAST"]

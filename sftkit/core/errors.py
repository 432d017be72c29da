"""Errors sftkit raises. Each names the input at fault and what to do about it.

Every class also derives from the builtin a caller would naturally catch
(``FileNotFoundError``, ``ValueError`` ...), so generic handlers keep working.
"""

from __future__ import annotations


class SftkitError(Exception):
    """Base class for every error sftkit raises on purpose."""


class ModelNotFoundError(SftkitError, FileNotFoundError):
    """A model path, GGUF file or the bundled default model is not there."""


class ModelOfflineError(SftkitError, ConnectionError):
    """A hub id was asked for, it is not cached locally and the hub can't be reached."""


class UnsupportedModelError(SftkitError, ValueError):
    """The file exists but transformers can't load this kind of model."""


class DeviceUnavailableError(SftkitError, RuntimeError):
    """A device was asked for that this machine does not have."""


class QuantizationUnavailableError(SftkitError, RuntimeError):
    """k-bit loading was asked for but bitsandbytes is missing or can't run here."""


class ConfigError(SftkitError, ValueError):
    """A setting is outside what is allowed; the message names the field."""

"""Where sftkit keeps files it generates (converted models, ...).

Reads the environment; never writes to it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The sftkit cache folder.

    ``$SFTKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/sftkit``, else ``~/.cache/sftkit``.
    The folder is not created here.
    """
    explicit = os.environ.get("SFTKIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sftkit"


def models_cache_dir() -> Path:
    return cache_dir() / "models"

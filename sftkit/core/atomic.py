"""Atomic file writes: a temporary file in the same folder, then a rename.

The result has the mode ``open()`` would give a new file (0666 less the umask), or, when it
replaces a file, that file's mode: readers see no difference from a plain write.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new file next to the target, created with 0666 so the kernel applies the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}")


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # replacing: keep its mode
            except FileNotFoundError:
                pass
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path

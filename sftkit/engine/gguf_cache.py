"""Convert a GGUF file once into a safetensors model folder under the sftkit cache.

transformers de-quantizes GGUF tensors to fp32 on every load (about 23 s for the
default model on a 2-core CPU; 40 s with the conversion's save). A model loaded from GGUF can't be ``save_pretrained`` as is
(its config still says ``quant_method: gguf``), so the conversion builds a fresh
model from the cleaned config, loads the state dict, and saves that. Later loads
read the cached folder (about 0.3 s).

Writes are atomic: the folder is built under a temporary name and renamed into
place, with a marker file written last, so a killed conversion never leaves a
folder that looks complete. Its temporary folder (``.tmp-<key>-<pid>``) is removed by
the next conversion or cached load: when that pid no longer runs, or nothing was written
in it for ``STALE_TEMP_SECONDS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from ..core.errors import UnsupportedModelError
from ..core.paths import models_cache_dir

MARKER = "sftkit-converted.json"
STALE_TEMP_SECONDS = 30 * 60  # a temporary folder nothing wrote to for this long is abandoned
_TEMP_NAME = re.compile(r"^\.tmp-(?P<key>.+-[0-9a-f]{12})-(?P<pid>[0-9]+)$")  # convert_gguf's temp folders


def _temp_name(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{os.getpid()}"


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a conversion in another thread of this process
    if os.name == "nt":
        return True  # os.kill would end it there; the age rule decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _last_write(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def clean_stale_temp_folders(folder: str | Path | None = None, *, max_age_s: float | None = None) -> list[Path]:
    """Remove what killed conversions left in the models cache; return the removed folders.

    Only folders named like convert_gguf's own (``.tmp-<name>-<12 hex>-<pid>``), and only when
    the pid in the name no longer runs or nothing was written in the folder for ``max_age_s``
    (``STALE_TEMP_SECONDS``; covers a pid reused after a restart). A running conversion's folder
    is left alone.
    """
    folder = Path(folder) if folder is not None else models_cache_dir()
    limit = STALE_TEMP_SECONDS if max_age_s is None else max_age_s
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in sorted(entries):
        m = _TEMP_NAME.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            stale = not _pid_running(int(m["pid"])) or now - _last_write(entry) > limit
        except FileNotFoundError:  # finished (renamed) or removed meanwhile
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def gguf_architecture(path: str | Path) -> str:
    """Read ``general.architecture`` from a GGUF header without loading tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise UnsupportedModelError(
            f"{path} could not be read as a GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"{path} has no 'general.architecture' entry; is it a GGUF model?")
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def check_gguf_supported(path: str | Path):
    """Parse the GGUF header into a transformers config (no tensors are read).

    Returns the config; raises UnsupportedModelError naming the architecture and
    what transformers can load when it can't load this one.
    """
    from transformers import AutoConfig

    path = Path(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:
        if "not supported" not in str(exc):
            raise
        arch = gguf_architecture(path)
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture '{arch}' can't be loaded by transformers "
            f"(it loads: {', '.join(supported_gguf_architectures())}). Use the original "
            "safetensors model (a hub id or local folder) instead, or load_model('default')."
        ) from exc


def cache_key(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    digest = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{p.stem}-{digest}"


def cached_folder(path: str | Path) -> Path | None:
    """The converted folder for this GGUF, if a complete one exists."""
    folder = models_cache_dir() / cache_key(path)
    return folder if (folder / MARKER).is_file() else None


def convert_gguf(path: str | Path, *, progress=None) -> Path:
    """Convert ``path`` into the cache (if not there yet) and return the folder.

    Removes temporary folders that killed conversions left behind (``clean_stale_temp_folders``).
    """
    clean_stale_temp_folders()
    existing = cached_folder(path)
    if existing is not None:
        return existing
    check_gguf_supported(path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    final = models_cache_dir() / cache_key(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    if progress:
        progress(f"Converting {path.name} to a safetensors cache (once; about 40 s on a 2-core CPU)...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.generation_config = loaded.generation_config
        del loaded
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({
            "source": str(path),
            "size": path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 2),
        }))
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # left by a killed conversion
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

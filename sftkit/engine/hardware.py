"""Probe the machine into a ``HardwareFacts`` snapshot for the policy."""

from __future__ import annotations

import logging
import os
from importlib import metadata

from ..core.policy import HardwareFacts

# bitsandbytes gained its CPU backend (NF4 forward and backward) in the 0.4x line;
# 0.48 is the oldest release sftkit declares.
_BNB_MIN = (0, 48)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def ram_total_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing: fall back to sysconf where it exists
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


class _DropHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def import_bitsandbytes():
    """Import bitsandbytes without its notice about an optional hub-downloaded CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes tries to fetch a faster 4-bit kernel from a
    model hub and logs a warning when it can't; its built-in kernel is used instead. The
    notice means nothing to a workshop and is offline noise, so only that one message is
    dropped, only during this import.
    """
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet = _DropHubKernelNotice()
    log.addFilter(quiet)
    try:
        import bitsandbytes

        try:  # the CPU backend loads lazily and logs the notice when it does
            import importlib

            importlib.import_module("bitsandbytes.backends.cpu.ops")
        except ImportError:
            pass
        return bitsandbytes
    finally:
        log.removeFilter(quiet)


def bitsandbytes_status() -> tuple[bool, str | None, str | None]:
    """(usable, version, problem). Imports bitsandbytes only if it is installed."""
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return False, None, "bitsandbytes is not installed"
    if _version_tuple(version) < _BNB_MIN:
        return False, version, (
            f"bitsandbytes {version} is older than {'.'.join(map(str, _BNB_MIN))}, "
            "the first release sftkit uses for 4-bit on CPU and GPU"
        )
    try:
        import_bitsandbytes()
    except Exception as exc:  # a broken install or missing native library
        return False, version, f"bitsandbytes {version} fails to import ({type(exc).__name__}: {exc})"
    return True, version, None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bf16 matmul instructions (the x86 flags ``avx512_bf16`` or ``amx_bf16``, read from
    /proc/cpuinfo; False where that file is missing, e.g. macOS and Windows, which then train in fp32)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def onednn_bf16() -> bool:
    """Whether torch's oneDNN runs bf16 on this CPU (False when a build or ``ONEDNN_MAX_CPU_ISA`` rules it out)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an op this torch build lacks: no fast bf16 path
        return False


def probe_hardware() -> HardwareFacts:
    import torch

    cuda = bool(torch.cuda.is_available())
    name = bf16 = total = free = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        bf16 = bool(torch.cuda.is_bf16_supported())
        free, total = torch.cuda.mem_get_info(0)
    usable, version, problem = bitsandbytes_status()
    return HardwareFacts(
        cuda_available=cuda,
        cuda_name=name,
        cuda_bf16=bool(bf16),
        cuda_total_bytes=total,
        cuda_free_bytes=free,
        bnb_available=usable,
        bnb_version=version,
        bnb_problem=problem,
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=ram_total_bytes(),
        cpu_bf16=cpu_has_native_bf16() and onednn_bf16(),
    )

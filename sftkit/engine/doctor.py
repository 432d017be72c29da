"""``sftkit doctor``: what is installed, what the machine has, and how to fix what's missing."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

from ..core.modelspec import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "info"
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status in ("warn", "fail")]

    def text(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            lines.append(f"[{marks[c.status]}] {c.name.ljust(width)}  {c.detail}")
            if c.fix:
                lines.append(f"       {' ' * width}  fix: {c.fix}")
        n = len(self.problems())
        lines.append("All good." if n == 0 else f"{n} problem(s) above; each has a fix line.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle):  # IPython shows the text, not the dataclass
        p.text(self.text())


# (distribution, required?, what it is for, fix)
_PACKAGES = [
    ("torch", True, "tensors and autograd", "make install (installs torch==2.13.0 first), or pip install torch"),
    ("transformers", True, "models and tokenizers", "pip install 'transformers>=5'"),
    ("peft", True, "LoRA adapters", "pip install peft"),
    ("accelerate", True, "device placement, multi-process runs", "pip install accelerate"),
    ("bitsandbytes", False, "4-bit / 8-bit weights (QLoRA)", "pip install 'bitsandbytes>=0.48'"),
    ("gguf", True, "reading the bundled GGUF model", "pip install gguf"),
    ("safetensors", True, "weights on disk", "pip install safetensors"),
    ("jupyterlab", False, "the workshop front end", "pip install -e '.[lab]'"),
    ("ipywidgets", False, "widget views in notebooks", "pip install -e '.[ui]'"),
    ("jupyterlab_widgets", False, "ipywidgets' JupyterLab front end", "pip install jupyterlab_widgets"),
    ("plotly", False, "live charts", "pip install 'plotly>=6'"),
    ("anywidget", False, "plotly FigureWidget's front end", "pip install anywidget"),
]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


# Long on purpose: the checks in the order the report shows them, one block each.
def run_doctor() -> DoctorReport:
    checks: list[Check] = []
    py = sys.version_info
    checks.append(Check(
        "python", "ok" if py >= (3, 10) else "fail",
        f"{platform.python_version()} at {sys.executable}",
        "" if py >= (3, 10) else "use Python 3.10 or newer",
    ))
    for dist, required, purpose, fix in _PACKAGES:
        v = _version(dist)
        if v:
            checks.append(Check(dist, "ok", f"{v} ({purpose})"))
        else:
            checks.append(Check(dist, "fail" if required else "warn", f"missing ({purpose})", fix))

    facts = None
    if _version("torch"):
        from .hardware import probe_hardware

        facts = probe_hardware()
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        checks.append(Check("torch build", "info", f"{torch.__version__}, {build}"))
        checks.append(Check(
            "cpu", "info",
            f"{facts.cpu_count} cores, {_gib(facts.ram_total_bytes)} RAM, {platform.machine()}",
        ))
        if facts.cuda_available:
            checks.append(Check(
                "gpu", "ok",
                f"{facts.cuda_name}: {_gib(facts.cuda_free_bytes)} free of "
                f"{_gib(facts.cuda_total_bytes)}, bf16 {'yes' if facts.cuda_bf16 else 'no'}",
            ))
        elif torch.version.cuda:
            checks.append(Check(
                "gpu", "warn", "a CUDA build of torch but no visible GPU",
                "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
            ))
        else:
            checks.append(Check(
                "gpu", "info", "none: training runs on the CPU (LoRA in fp32; 4-bit on request)",
                "",
            ))
        if facts.bnb_version and not facts.bnb_available:
            checks.append(Check("bitsandbytes use", "warn", facts.bnb_problem or "unusable",
                                "pip install -U 'bitsandbytes>=0.48'"))
        from ..core.policy import decide_load_plan

        plan = decide_load_plan(facts)
        checks.append(Check("auto policy", "info", plan.describe().replace("\n", " ")))

    from ..core.modelspec import find_default_gguf

    gguf = find_default_gguf()
    if gguf is None:
        checks.append(Check("default model", "fail", f"{DEFAULT_MODEL_NAME} package not installed",
                            "sftkit prepare"))
    else:
        cached = None
        if _version("transformers") and _version("gguf"):
            from .gguf_cache import cached_folder

            cached = cached_folder(gguf)
        if cached:
            checks.append(Check("default model", "ok", f"{DEFAULT_MODEL_NAME} cached at {cached}"))
        else:
            checks.append(Check(
                "default model", "warn",
                f"{DEFAULT_MODEL_NAME} installed but not converted yet (the first load converts it: about 40 s)",
                "sftkit prepare",
            ))
    return DoctorReport(tuple(checks))

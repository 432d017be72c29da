"""``load_model``: one call from a spec to a ready (model, tokenizer) pair.

Specs: ``"default"`` (the bundled SmolLM2-135M-Instruct GGUF, converted once to a
safetensors cache), a ``.gguf`` file (cached the same way), a local model folder, or
a hub id (a locally cached snapshot is used without touching the network).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..core.errors import ModelNotFoundError, ModelOfflineError
from ..core.modelspec import ModelSource, resolve_model_spec
from ..core.policy import LoadPlan, decide_load_plan
from . import gguf_cache
from .hardware import probe_hardware


@dataclass(frozen=True)
class LoadReport:
    """What ``load_model`` did, in numbers and words."""

    source: ModelSource
    plan: LoadPlan
    folder: str  # the folder the weights were read from
    converted: bool  # True when this call converted a GGUF into the cache
    load_seconds: float
    footprint_bytes: int
    parameters: int

    def summary(self) -> str:
        how = "converted from GGUF and cached" if self.converted else (
            "from the sftkit cache" if self.source.is_gguf else f"from {self.source.kind}")
        return (
            f"Loaded {self.source.display} ({self.parameters / 1e6:.1f}M parameters, "
            f"{self.footprint_bytes / 2**20:.0f} MiB in memory) {how} in {self.load_seconds:.1f} s.\n"
            + self.plan.describe()
        )


class LoadedModel(tuple):
    """``(model, tokenizer)`` that also carries ``.report``.

    Unpacks like a pair: ``model, tokenizer = load_model()``.
    """

    def __new__(cls, model, tokenizer, report: LoadReport):
        self = super().__new__(cls, (model, tokenizer))
        self.report = report
        return self

    @property
    def model(self):
        return self[0]

    @property
    def tokenizer(self):
        return self[1]


def plan_load(quantization: str = "auto", device: str = "auto", dtype: str = "auto",
              attn_implementation: str | None = None) -> LoadPlan:
    """Decide device, precision and quantization for this machine without loading anything."""
    return decide_load_plan(probe_hardware(), quantization=quantization, device=device,
                            dtype=dtype, attn_implementation=attn_implementation)


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Quick check that the hub's host name resolves; avoids minutes of retries offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or ""
    result: dict = {}

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            result["ok"] = True
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if result.get("ok"):
        return True, ""
    if "error" in result:
        return False, f"the hub's host {host} does not resolve ({result['error']})"
    return False, f"looking up the hub's host {host} took over {timeout:.0f} s"


def _hub_folder(repo_id: str) -> str:
    """A local folder for ``repo_id``: the cached snapshot, or a fresh download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    ok, why = _hub_reachable()
    if not ok:
        raise ModelOfflineError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub can't be "
            f"reached ({why}). Use load_model('default') for the bundled SmolLM2-135M-Instruct, "
            "or pass a local model folder or .gguf file."
        )
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:
        name = type(exc).__name__
        if "NotFound" in name or "Gated" in name or "Unauthorized" in name:
            raise ModelNotFoundError(
                f"hub id {repo_id!r} could not be fetched ({name}): check the spelling, or log "
                "in for gated models"
            ) from exc
        raise ModelOfflineError(
            f"model {repo_id!r} could not be downloaded ({name}: {exc}). Use "
            "load_model('default') or a local model folder."
        ) from exc


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _quantization_config(plan: LoadPlan):
    from transformers import BitsAndBytesConfig

    if plan.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(plan.compute_dtype),
        )
    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_from_folder(folder: str, plan: LoadPlan, *, trust_remote_code: bool = False):
    """Load model and tokenizer from a transformers folder according to ``plan``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": _torch_dtype(plan.dtype), "trust_remote_code": trust_remote_code}
    if plan.attn_implementation:
        kwargs["attn_implementation"] = plan.attn_implementation
    qconfig = _quantization_config(plan)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": plan.device if plan.device == "cpu" else 0}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if qconfig is None:
        model = model.to(plan.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_model(
    spec: str | Path = "default",
    *,
    quantization: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress=None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    spec: ``"default"``, a hub id, a local folder, or a ``.gguf`` file.
    quantization: ``auto | 4bit | 8bit | none`` (4-bit is NF4 with double quantization).
    device: ``auto | cpu | cuda``. dtype: ``auto | float32 | bfloat16 | float16``.
    attn_implementation: passed to transformers (``"eager"``, ``"sdpa"``, ...).
    progress: optional callable taking a message (conversion notices).

    Returns a ``LoadedModel`` that unpacks to ``(model, tokenizer)`` and carries
    ``.report`` (what was chosen and why, timings, memory footprint).
    All input checks run before any weights are read.
    """
    started = time.perf_counter()
    source = resolve_model_spec(spec)
    plan = plan_load(quantization, device, dtype, attn_implementation)
    folder, converted = _model_folder(source, progress)
    model, tokenizer = load_from_folder(folder, plan, trust_remote_code=trust_remote_code)
    report = LoadReport(
        source=source,
        plan=plan,
        folder=folder,
        converted=converted,
        load_seconds=time.perf_counter() - started,
        footprint_bytes=int(model.get_memory_footprint()),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return LoadedModel(model, tokenizer, report)


def _model_folder(source, progress=None) -> tuple[str, bool]:
    """A local transformers folder for a resolved spec (converting a GGUF once); converted?"""
    if source.is_gguf:
        folder = gguf_cache.cached_folder(source.location)
        if folder is None:
            return str(gguf_cache.convert_gguf(source.location, progress=progress)), True
        return str(folder), False
    if source.kind == "hub":
        return _hub_folder(source.location), False
    return source.location, False


def load_tokenizer(spec: str | Path = "default", *, trust_remote_code: bool = False, progress=None):
    """The tokenizer of a model spec, without loading any weights (for checks before a run)."""
    from transformers import AutoTokenizer

    folder, _ = _model_folder(resolve_model_spec(spec), progress)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_default_model(progress=print) -> Path:
    """Make sure the default model is installed and converted; return its cache folder."""
    source = resolve_model_spec("default")
    folder = gguf_cache.cached_folder(source.location)
    if folder is None:
        folder = gguf_cache.convert_gguf(source.location, progress=progress)
    return Path(folder)


__all__ = ["load_model", "load_tokenizer", "plan_load", "LoadedModel", "LoadReport", "prepare_default_model"]

"""The device and precision policy: what to load, where, at which precision, and why.

Pure logic over a snapshot of the hardware (``HardwareFacts``), so every branch,
CUDA included, is testable on any machine. The engine probes the facts; this module
decides and explains the decision in words the UI can show.

On CPUs, half-precision matmuls are fast only where the CPU has native bf16 instructions
(AVX512-BF16, AMX): there a bf16 matmul runs about twice as fast as fp32 (measured on the 2-core
EPYC machines the workshops use, torch 2.13; benchmarks/RESULTS.md), elsewhere it falls back to slow
code. So on a CPU with native bf16, "auto" stores the frozen weights in bf16 and runs their matmuls
in bf16 while the activations, the trained weights and the loss stay fp32 (``frozen_dtype``); on
other CPUs everything is fp32. bitsandbytes NF4 runs on CPU but saves memory, not time, so "auto"
turns 4-bit on for CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError, DeviceUnavailableError, QuantizationUnavailableError

QUANTIZATIONS = ("auto", "4bit", "8bit", "none")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class HardwareFacts:
    """What the policy needs to know about the machine."""

    cuda_available: bool = False
    cuda_name: str | None = None
    cuda_bf16: bool = False
    cuda_total_bytes: int | None = None
    cuda_free_bytes: int | None = None
    bnb_available: bool = False
    bnb_version: str | None = None
    bnb_problem: str | None = None  # why bitsandbytes can't be used, if it can't
    cpu_count: int = 1
    ram_total_bytes: int | None = None
    cpu_bf16: bool = False  # the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)


@dataclass(frozen=True)
class LoadPlan:
    """The resolved choice, with the reasons in words."""

    device: str  # "cpu" | "cuda"
    dtype: str  # storage/compute dtype of the non-quantized weights
    quantization: str  # "4bit" | "8bit" | "none"
    compute_dtype: str  # matmul dtype for k-bit layers
    attn_implementation: str | None
    reasons: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # a training run stores its frozen linear/embedding weights in this dtype and runs their matmuls in
    # it, activations and trained weights staying in ``dtype`` (None: the frozen weights are ``dtype`` too)
    frozen_dtype: str | None = None

    @property
    def method(self) -> str:
        """What a fine-tune with this plan is called: QLoRA on 4-bit, LoRA otherwise."""
        return "QLoRA" if self.quantization == "4bit" else "LoRA"

    def describe(self) -> str:
        """One paragraph a newcomer can read: what was chosen and why."""
        head = (
            f"{self.device.upper()}: {self.method}, weights "
            + (f"in {self.quantization} NF4 with {self.compute_dtype} compute"
               if self.quantization == "4bit" else
               f"in 8-bit with {self.compute_dtype} compute" if self.quantization == "8bit" else
               f"in {self.dtype}" + (f", frozen weights' matmuls in {self.frozen_dtype} when training"
                                     if self.frozen_dtype else ""))
            + "."
        )
        lines = [head, *self.reasons]
        lines += [f"Warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _normalize(value: str, allowed: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} is not a string; allowed: {', '.join(allowed)}")
    v = value.strip().lower()
    v = _DTYPE_ALIASES.get(v, v)
    if v in ("4-bit", "nf4", "int4"):
        v = "4bit"
    if v in ("8-bit", "int8"):
        v = "8bit"
    if v in ("no", "off", "fp", "full"):
        v = "none"
    if v not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return v


# Long on purpose: one decision table read top to bottom, each choice next to the reason it records.
def decide_load_plan(
    facts: HardwareFacts,
    *,
    quantization: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> LoadPlan:
    """Resolve the user's request against the hardware.

    Raises DeviceUnavailableError when CUDA is asked for but absent, and
    QuantizationUnavailableError when k-bit is asked for but bitsandbytes can't run.
    """
    quantization = _normalize(quantization, QUANTIZATIONS, "quantization")
    device = _normalize(device, DEVICES, "device")
    dtype = _normalize(dtype, DTYPES, "dtype")
    reasons: list[str] = []
    warnings: list[str] = []
    frozen_dtype: str | None = None

    # Device.
    if device == "cuda" and not facts.cuda_available:
        raise DeviceUnavailableError(
            "device='cuda' was asked for but no CUDA GPU is visible to torch "
            "(torch.cuda.is_available() is False). Use device='auto' or 'cpu'; on a GPU "
            "machine install a CUDA build of torch (see the README, 'GPU machines')."
        )
    if device == "auto":
        device = "cuda" if facts.cuda_available else "cpu"
        if device == "cuda":
            reasons.append(f"CUDA GPU found ({facts.cuda_name or 'unnamed'}): training runs on it.")
        else:
            reasons.append(
                f"CPU found ({facts.cpu_count} cores, no CUDA GPU): training runs on the CPU."
            )

    # Dtype of the non-quantized weights and of the compute.
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if facts.cuda_bf16 else "float16"
            reasons.append(
                "bf16 compute: this GPU supports it." if facts.cuda_bf16
                else "fp16 compute: this GPU has no bf16 support."
            )
        else:
            dtype = "float32"
            if facts.cpu_bf16 and quantization in ("auto", "none"):
                frozen_dtype = "bfloat16"
                reasons.append(
                    "fp32 compute, with the frozen weights stored in bf16 when an adapter trains: this CPU has "
                    "native bf16 matmuls (AVX512-BF16/AMX), about twice as fast as fp32, and the frozen weights "
                    "take half the memory; the adapters, the residual stream and the loss stay fp32, and backward "
                    "keeps bf16 copies of the activations. dtype='float32' keeps everything in fp32.")
            elif facts.cpu_bf16:
                reasons.append("fp32 compute for the non-quantized weights: with k-bit weights the frozen "
                               "weights are not stored in bf16.")
            else:
                reasons.append("fp32 compute: this CPU has no native bf16 matmuls (AVX512-BF16/AMX), and "
                               "without them bf16/fp16 matmuls are many times slower than fp32.")
    elif device == "cpu" and dtype == "float16":
        warnings.append(
            "dtype=float16 on CPU: CPUs have no fast fp16 matmuls, so they run many times slower than fp32; "
            "use dtype='auto' unless memory forces it.")
    elif device == "cpu" and dtype == "bfloat16":
        warnings.append(
            "dtype=bfloat16 on CPU: " + (
                "every weight and activation in bf16, the adapters' small first changes are partly rounded away "
                "(dtype='auto' keeps only the frozen weights in bf16)" if facts.cpu_bf16 else
                "this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so they run many times slower than fp32")
            + "; use dtype='auto' unless memory forces it.")
    elif device == "cuda" and dtype == "bfloat16" and not facts.cuda_bf16:
        raise ConfigError(
            f"dtype='bfloat16' was asked for but this GPU ({facts.cuda_name}) has no bf16 "
            "support; use dtype='float16' or 'auto'"
        )

    # Quantization.
    def _bnb_error(kind: str) -> QuantizationUnavailableError:
        problem = facts.bnb_problem or "bitsandbytes is not installed"
        return QuantizationUnavailableError(
            f"quantization='{kind}' needs bitsandbytes, but {problem}. Install it with "
            "`pip install 'bitsandbytes>=0.48'`, or use quantization='none' (plain LoRA)."
        )

    if quantization in ("4bit", "8bit"):
        if not facts.bnb_available:
            raise _bnb_error(quantization)
        if device == "cpu":
            reasons.append(
                f"{quantization} on CPU as asked: it saves memory (about 3x for 4-bit) but not "
                "time; each forward dequantizes the weights."
            )
        else:
            reasons.append(f"{quantization} on CUDA as asked.")
    elif quantization == "auto":
        if device == "cuda":
            if facts.bnb_available:
                quantization = "4bit"
                reasons.append("4-bit NF4 with double quantization (QLoRA): fits larger models in GPU memory.")
            else:
                quantization = "none"
                reasons.append(
                    f"4-bit off because {facts.bnb_problem or 'bitsandbytes is not installed'}: "
                    "plain LoRA instead."
                )
        else:
            quantization = "none"
            reasons.append(
                "4-bit off because on a CPU it saves memory but not time; pass "
                "quantization='4bit' to trade speed for memory."
            )
    else:
        reasons.append("No quantization, as asked: full-precision weights.")

    compute_dtype = dtype
    if quantization == "8bit":
        compute_dtype = "float16" if device == "cpu" else dtype
        if device == "cpu":
            warnings.append("8-bit matmuls on CPU run in fp16 and are slow; 4-bit or none is faster.")

    return LoadPlan(
        device=device,
        dtype=dtype,
        quantization=quantization,
        compute_dtype=compute_dtype,
        attn_implementation=attn_implementation,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
        frozen_dtype=frozen_dtype if quantization == "none" else None,
    )

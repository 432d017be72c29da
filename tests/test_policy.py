"""The device/precision policy, every branch, on any machine (pure logic)."""

import pytest

from sftkit.core.errors import ConfigError, DeviceUnavailableError, QuantizationUnavailableError
from sftkit.core.policy import HardwareFacts, decide_load_plan

CPU = HardwareFacts(cpu_count=2, bnb_available=True, bnb_version="0.50.2")
CPU_NO_BNB = HardwareFacts(cpu_count=2, bnb_problem="bitsandbytes is not installed")
H100 = HardwareFacts(cuda_available=True, cuda_name="NVIDIA H100", cuda_bf16=True, bnb_available=True)
T4 = HardwareFacts(cuda_available=True, cuda_name="Tesla T4", cuda_bf16=False, bnb_available=True)
GPU_NO_BNB = HardwareFacts(cuda_available=True, cuda_name="NVIDIA H100", cuda_bf16=True,
                           bnb_problem="bitsandbytes is not installed")


def test_cpu_auto_is_fp32_lora_and_says_why_4bit_is_off():
    plan = decide_load_plan(CPU)
    assert (plan.device, plan.dtype, plan.quantization, plan.method) == ("cpu", "float32", "none", "LoRA")
    text = plan.describe()
    assert "CPU found" in text and "4-bit off because" in text and "fp32" in text


def test_cuda_auto_is_qlora_nf4_bf16():
    plan = decide_load_plan(H100)
    assert (plan.device, plan.quantization, plan.compute_dtype, plan.method) == ("cuda", "4bit", "bfloat16", "QLoRA")
    assert "NVIDIA H100" in plan.describe() and "NF4" in plan.describe()


def test_cuda_without_bf16_uses_fp16():
    plan = decide_load_plan(T4)
    assert plan.dtype == "float16" and plan.compute_dtype == "float16"


def test_cuda_without_bitsandbytes_falls_back_with_reason():
    plan = decide_load_plan(GPU_NO_BNB)
    assert plan.quantization == "none"
    assert "4-bit off because bitsandbytes is not installed" in plan.describe()


def test_cpu_4bit_on_request_explains_the_trade():
    plan = decide_load_plan(CPU, quantization="4bit")
    assert plan.quantization == "4bit" and plan.compute_dtype == "float32"
    assert "saves memory" in plan.describe()


def test_cuda_asked_but_absent():
    with pytest.raises(DeviceUnavailableError, match=r"device='cuda'.*no CUDA GPU"):
        decide_load_plan(CPU, device="cuda")


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_kbit_asked_without_bitsandbytes(kind):
    with pytest.raises(QuantizationUnavailableError, match=rf"quantization='{kind}' needs bitsandbytes.*not installed"):
        decide_load_plan(CPU_NO_BNB, quantization=kind)


def test_bad_values_name_field_and_allowed():
    with pytest.raises(ConfigError, match=r"quantization='3bit'.*allowed: auto, 4bit, 8bit, none"):
        decide_load_plan(CPU, quantization="3bit")
    with pytest.raises(ConfigError, match=r"device='tpu'.*allowed: auto, cpu, cuda"):
        decide_load_plan(CPU, device="tpu")
    with pytest.raises(ConfigError, match=r"dtype='int3'"):
        decide_load_plan(CPU, dtype="int3")


def test_aliases_and_bf16_on_cpu_warns():
    plan = decide_load_plan(CPU, quantization="NF4", dtype="bf16")
    assert plan.quantization == "4bit" and plan.dtype == "bfloat16"
    assert any("many times slower" in w for w in plan.warnings)


def test_bf16_on_gpu_without_support_is_an_error():
    with pytest.raises(ConfigError, match="no bf16"):
        decide_load_plan(T4, device="cuda", dtype="bfloat16")


CPU_BF16 = HardwareFacts(cpu_count=2, bnb_available=True, bnb_version="0.50.2", cpu_bf16=True)


def test_cpu_with_native_bf16_trains_frozen_weights_in_bf16_and_says_why():
    plan = decide_load_plan(CPU_BF16)
    assert (plan.dtype, plan.compute_dtype, plan.frozen_dtype) == ("float32", "float32", "bfloat16")
    text = plan.describe()
    assert "frozen weights' matmuls in bfloat16" in text and "AVX512-BF16/AMX" in text
    assert "dtype='float32' keeps everything in fp32" in text


def test_frozen_bf16_only_where_it_is_native_and_not_asked_otherwise():
    assert decide_load_plan(CPU).frozen_dtype is None  # no native bf16: all fp32, and the text says why
    assert "no native bf16" in decide_load_plan(CPU).describe()
    assert decide_load_plan(CPU_BF16, dtype="float32").frozen_dtype is None  # asked for fp32 everywhere
    kbit = decide_load_plan(CPU_BF16, quantization="4bit")
    assert kbit.frozen_dtype is None and "no native bf16" not in kbit.describe()  # 4-bit: not bf16, and why
    assert decide_load_plan(H100).frozen_dtype is None and decide_load_plan(H100, quantization="none").frozen_dtype is None
    all_bf16 = decide_load_plan(CPU_BF16, dtype="bfloat16")  # native, but every weight in bf16: warned why
    assert all_bf16.dtype == "bfloat16" and any("rounded away" in w for w in all_bf16.warnings)
    assert any("many times slower" in w for w in decide_load_plan(CPU, dtype="bfloat16").warnings)
    # no CPU here has fast fp16 matmuls, bf16 or not
    assert any("no fast fp16" in w for w in decide_load_plan(CPU_BF16, dtype="float16").warnings)


def test_native_bf16_is_read_from_the_cpu_flags():
    from sftkit.engine.hardware import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t: fpu sse2 avx2 avx512f\nbugs\t: avx512_bf16\n")  # flags line only
    assert not cpu_has_native_bf16("Features\t: fp asimd\n")


def test_the_probe_also_asks_torch_whether_its_bf16_kernels_run_here(monkeypatch):
    from sftkit.engine import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)  # e.g. ONEDNN_MAX_CPU_ISA=AVX2
    assert hardware.probe_hardware().cpu_bf16 is False

"""load_model on real models: the bundled GGUF, a local folder, a cached hub snapshot, errors."""

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import sftkit
from sftkit.core.errors import (
    DeviceUnavailableError,
    ModelNotFoundError,
    ModelOfflineError,
    QuantizationUnavailableError,
    UnsupportedModelError,
)
from sftkit.core.modelspec import find_default_gguf
from sftkit.engine import gguf_cache


def greedy_answer(model, tokenizer, question, max_new_tokens=24):
    msgs = [{"role": "user", "content": question}]
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_default_model_answers_a_chat_prompt(default_model_folder):
    loaded = sftkit.load_model("default")
    model, tokenizer = loaded
    assert not loaded.report.converted
    assert Path(loaded.report.folder).resolve() == default_model_folder.resolve()  # the cache may be linked
    if torch.cuda.is_available():
        assert model.device.type == "cuda" and loaded.report.plan.device == "cuda"
    else:
        assert model.dtype == torch.float32 and model.device.type == "cpu"
    answer = greedy_answer(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer
    summary = loaded.report.summary()
    assert "SmolLM2-135M-Instruct" in summary and "from the sftkit cache" in summary


@pytest.mark.slow
def test_first_load_converts_and_caches_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path))
    gguf = find_default_gguf()
    assert gguf_cache.cached_folder(gguf) is None
    first = sftkit.load_model("default")
    folder = gguf_cache.cached_folder(gguf)
    assert first.report.converted and folder is not None and str(folder).startswith(str(tmp_path))
    assert (folder / "model.safetensors").is_file() and (folder / gguf_cache.MARKER).is_file()
    assert not list(tmp_path.glob("models/.tmp-*")), "a temporary folder was left behind"
    second = sftkit.load_model("default")
    assert not second.report.converted
    assert second.report.load_seconds < first.report.load_seconds
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575]])
    with torch.no_grad():
        a = first.model(ids).logits
        b = second.model(ids).logits
    assert torch.equal(a, b)
    # The same file passed as a path shares the cache entry.
    third = sftkit.load_model(str(gguf))
    assert third.report.source.kind == "gguf" and not third.report.converted


@pytest.mark.slow
def test_4bit_default_model_on_cpu_is_smaller_and_still_answers(default_model_folder):
    import bitsandbytes as bnb

    full = sftkit.load_model("default", quantization="none")
    q = sftkit.load_model("default", quantization="4bit")
    assert q.report.plan.quantization == "4bit" and q.report.plan.method == "QLoRA"
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in q.model.modules())
    assert n4 == 30 * 7  # every attention and MLP projection of the 30 blocks
    assert q.report.footprint_bytes < 0.5 * full.report.footprint_bytes
    assert "Paris" in greedy_answer(q.model, q.tokenizer, "What is the capital of France?")


def test_local_folder_loads_with_eager_attention(tiny_llama_dir):
    loaded = sftkit.load_model(str(tiny_llama_dir), attn_implementation="eager")
    assert loaded.report.source.kind == "folder"
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer.pad_token is not None


def test_hub_id_served_from_a_local_cache_without_network(tiny_llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = tmp_path / "models--sftkit-test--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama_dir, snap)
    (tmp_path / "models--sftkit-test--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--sftkit-test--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    loaded = sftkit.load_model("sftkit-test/tiny-llama")
    assert loaded.report.source.kind == "hub" and loaded.report.folder == str(snap)
    assert time.perf_counter() - started < 20


def test_hub_id_offline_and_uncached_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelOfflineError, match=r"'sftkit-test/not-cached'.*not in the local .* cache.*'default'"):
        sftkit.load_model("sftkit-test/not-cached")


def test_path_not_found_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        sftkit.load_model(str(tmp_path / "no" / "such" / "model"))


def test_unsupported_gguf_architecture_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), arch="sftkit-test-arch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"odd.gguf: GGUF architecture 'sftkit-test-arch'.*it loads: .*llama"):
        sftkit.load_model(str(path))
    models = gguf_cache.models_cache_dir()
    assert str(models).startswith(str(tmp_path))
    assert not (models.exists() and any("odd-" in p.name for p in models.iterdir())), list(models.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_on_a_machine_without_it(tiny_llama_dir):
    with pytest.raises(DeviceUnavailableError, match=r"device='cuda'.*torch.cuda.is_available\(\) is False"):
        sftkit.load_model(str(tiny_llama_dir), device="cuda")


def test_4bit_without_bitsandbytes_fails_before_loading(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(QuantizationUnavailableError, match=r"quantization='4bit' needs bitsandbytes.*pip install"):
        sftkit.load_model(str(tiny_llama_dir), quantization="4bit")


def test_plan_load_reports_in_words_without_loading():
    plan = sftkit.plan_load()
    text = plan.describe()
    if torch.cuda.is_available():
        assert "CUDA GPU found" in text
    else:
        assert text.startswith("CPU: LoRA") and "4-bit off because" in text


# ---- files sftkit writes ------------------------------------------------------------------
@pytest.fixture()
def umask():
    """Set the process umask for one test, and put the old one back."""
    import os

    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_atomic_writes_get_the_mode_open_would_give_and_keep_a_replaced_files_mode(tmp_path, umask):
    import os
    import stat

    from sftkit.core.atomic import write_text_atomic

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    for mask in (0o022, 0o077, 0o002):
        umask(mask)
        plain = tmp_path / f"plain-{mask:o}.txt"
        plain.write_text("x")
        atomic = write_text_atomic(tmp_path / f"atomic-{mask:o}.txt", "x")
        assert mode(atomic) == mode(plain) == 0o666 & ~mask, (oct(mask), oct(mode(atomic)))
    umask(0o022)
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    os.chmod(kept, 0o640)
    write_text_atomic(kept, '{"a": 1}')
    assert mode(kept) == 0o640 and kept.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_stale_conversion_folders_are_removed_and_a_live_ones_is_kept(tmp_path, monkeypatch):
    import os
    import subprocess

    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path))
    models = gguf_cache.models_cache_dir()
    models.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: a killed conversion
    live = subprocess.Popen(["sleep", "120"])  # a conversion still writing
    try:
        def tmp_folder(name, pid, age_s=0):
            d = models / f".tmp-{name}-0123456789ab-{pid}"
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"partial")
            if age_s:
                old = time.time() - age_s
                for p in (d / "model.safetensors", d):
                    os.utime(p, (old, old))
            return d

        dead = tmp_folder("killed", gone.pid)
        old_live_pid = tmp_folder("abandoned", live.pid, age_s=gguf_cache.STALE_TEMP_SECONDS + 60)
        fresh = tmp_folder("converting", live.pid)
        mine = tmp_folder("this-process", os.getpid())
        others = [models / ".tmp-not-ours", models / "user-model-0123456789ab-1", models / ".tmp-x-123"]
        for d in others:
            d.mkdir()
        # A later load finds its converted folder in the cache: the clean-up runs on that path too.
        gguf = find_default_gguf()
        done = models / gguf_cache.cache_key(gguf)
        done.mkdir()
        (done / gguf_cache.MARKER).write_text("{}")
        assert gguf_cache.convert_gguf(gguf) == done
        assert not dead.exists() and not old_live_pid.exists()
        assert fresh.exists() and mine.exists() and all(d.exists() for d in others)
        assert (fresh / "model.safetensors").read_bytes() == b"partial"
        assert sorted(p.name for p in gguf_cache.clean_stale_temp_folders()) == []  # nothing more to do
    finally:
        live.kill()
        live.wait()
    assert gguf_cache.clean_stale_temp_folders() == [fresh]  # its writer is gone now

"""Frozen weights in bf16 with fp32 activations (engine/precision.py), the CPU training path on CPUs with
native bf16: what changes, what does not, and that training follows the fp32 run.

On the tiny random Llama; the bf16 matmuls run on any CPU (slowly where bf16 is not native), so these
tests do not depend on the machine."""

import copy

import pytest
import torch

from sftkit.engine.precision import frozen_dtype_of, frozen_matmul_modules, store_frozen_in


@pytest.fixture(scope="module")
def lora_pair(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    return model


def _batch(n=4, length=24, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def test_only_frozen_matmuls_change_and_trained_weights_stay_fp32(lora_pair):
    model = copy.deepcopy(lora_pair)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = [name for name, _ in frozen_matmul_modules(model)]
    assert frozen and all("lora_" not in name for name in frozen)
    changed = store_frozen_in(model)
    assert changed == len(frozen) and frozen_dtype_of(model) == "bfloat16"
    assert store_frozen_in(model) == 0  # a second call changes nothing
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    dtypes = {name: m.weight.dtype for name, m in model.named_modules() if name in frozen}
    assert set(dtypes.values()) == {torch.bfloat16}
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # not a matmul: untouched
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if model.config.tie_word_embeddings:
        assert head.weight is emb.weight  # a tied head stays tied


def test_activations_stay_fp32_and_the_loss_is_the_fp32_loss_within_bf16_rounding(lora_pair):
    fp32, mixed = copy.deepcopy(lora_pair), copy.deepcopy(lora_pair)
    store_frozen_in(mixed)
    batch = _batch()
    seen = []
    hook = mixed.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    out_mixed = mixed(**batch, output_hidden_states=True)
    hook.remove()
    out_fp32 = fp32(**batch)
    assert seen == [torch.float32] and out_mixed.logits.dtype == torch.float32
    assert all(h.dtype == torch.float32 for h in out_mixed.hidden_states)
    assert out_mixed.loss.item() == pytest.approx(out_fp32.loss.item(), rel=1e-2)
    assert out_mixed.loss.item() != out_fp32.loss.item()  # the bf16 matmuls did run


def _curve(lora_pair, frozen: bool, activations: bool, steps: int = 8) -> list[float]:
    """Losses of ``steps`` AdamW steps: frozen matmuls in bf16 or not, backward's activations in bf16 or not."""
    from contextlib import nullcontext

    from sftkit.engine.precision import saved_in

    model = copy.deepcopy(lora_pair)
    if frozen:
        store_frozen_in(model)
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        with saved_in(model) if activations else nullcontext():
            loss = model(**_batch(seed=step % 2)).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("activations", [False, True], ids=["fp32-activations", "bf16-activations"])
def test_training_follows_the_fp32_curve(lora_pair, activations):
    """Eight AdamW steps with the frozen matmuls in bf16 (and, as runs do, backward's activations in bf16) give
    the fp32 run's losses within bf16 rounding. (With the whole default model in bf16, its loss fell about half
    as fast over the first steps, as the adapters' small first changes were rounded away where they meet bf16
    outputs; precision.py.)"""
    fp32, mixed = _curve(lora_pair, False, False), _curve(lora_pair, True, activations)
    assert fp32[0] - fp32[-1] > 0.05, fp32
    assert mixed[0] - mixed[-1] == pytest.approx(fp32[0] - fp32[-1], rel=0.1), (mixed, fp32)
    for a, b in zip(mixed, fp32):
        assert a == pytest.approx(b, rel=1e-3)


def _grads(model, batch, keep=None):
    model.zero_grad(set_to_none=True)
    if keep is None:
        loss = model(**batch).loss
    else:
        with keep:
            loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_backward_reads_bf16_copies_of_the_activations_and_gives_the_same_gradients(lora_pair):
    from sftkit.engine.measure import measure_training_step
    from sftkit.engine.precision import saved_in

    model = copy.deepcopy(lora_pair)
    store_frozen_in(model)
    batch = _batch()
    loss, plain = _grads(model, batch)
    loss_kept, kept = _grads(model, batch, saved_in(model))
    assert loss_kept == loss  # the forward is the same fp32 forward
    for name, g in plain.items():
        if g.abs().max() > 0:
            cos = torch.nn.functional.cosine_similarity(g.flatten(), kept[name].flatten(), dim=0)
            assert cos > 0.999, name
            assert not torch.equal(g, kept[name]) or g.numel() < 64  # the copies were read (not the fp32 values)
    full = measure_training_step(model, 4, 64).activations
    halved = measure_training_step(model, 4, 64, saved_dtype="bfloat16").activations
    assert 0.45 * full < halved < 0.6 * full, (full, halved)


def test_one_copy_per_saved_tensor_and_parameters_never_copied(lora_pair):
    from sftkit.engine.precision import _Packed, saved_in

    model = copy.deepcopy(lora_pair)
    keep = saved_in(model)
    x = torch.randn(64, 128)
    first, again = keep.pack(x), keep.pack(x)
    assert isinstance(first, _Packed) and again is first and first.tensor.dtype == torch.bfloat16
    x.add_(1.0)  # changed in place: a new copy
    assert keep.pack(x) is not first
    weight = next(p for p in model.parameters() if p.numel() >= 4096)
    assert keep.pack(weight) is weight
    small, ids = torch.randn(8, 8), torch.arange(10_000)
    assert keep.pack(small) is small and keep.pack(ids) is ids
    with keep:
        pass
    assert keep._copies == {}  # nothing outlives the pass


def test_a_real_forward_copies_a_tensor_saved_by_several_operations_once(lora_pair):
    """In a Llama block the q, k and v adapters (and gate/up) read the same norm output: one bf16 copy."""
    from sftkit.engine.precision import _Packed, saved_in

    model = copy.deepcopy(lora_pair)
    store_frozen_in(model)
    keep = saved_in(model)
    calls, copies = [], set()
    pack = keep.pack

    def counting(tensor):
        out = pack(tensor)
        if isinstance(out, _Packed):
            calls.append(id(out))
            copies.add(id(out))
        return out

    keep.pack = counting
    keep.hooks = torch.autograd.graph.saved_tensors_hooks(counting, __import__(
        "sftkit.engine.precision", fromlist=["unpack"]).unpack)
    with keep:
        loss = model(**_batch()).loss
    loss.backward()
    assert len(calls) > len(copies) > 0, (len(calls), len(copies))


def test_a_run_that_saves_the_whole_model_stays_fp32_on_a_bf16_cpu(tiny_llama_dir, tmp_path, monkeypatch):
    """Freeze tuning saves the model: its frozen weights must leave the run as they came in."""
    from safetensors import safe_open

    from sftkit.engine import hardware
    from sftkit.engine.train import run_training

    from helpers import tiny_config

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=2, eval_every=0, sample_every=0).with_changes(
        adapter={"preset": "freeze_tuning", "top_n": 1})
    result = run_training(cfg)
    assert result.state == "finished", result.message
    started = next(e for e in result.run.events() if e["event"] == "started")
    assert started["frozen_dtype"] is None
    files = list((result.run.path / "model").glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}


def test_gpt2s_conv1d_projections_are_stored_in_bf16_too(tmp_path, default_model_folder):
    """GPT-2's block projections are transformers' Conv1D, not nn.Linear: they are frozen matmuls as well."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "gpt2", "gpt2", default_model_folder)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    fp32 = copy.deepcopy(model)
    store_frozen_in(model)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    batch = _batch()
    out, ref = model(**batch), fp32(**batch)
    assert out.logits.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)


def test_a_run_resumed_where_the_precision_policy_differs_records_it_and_warns(tiny_llama_dir, tmp_path, monkeypatch):
    """Started with bf16 frozen weights (a bf16 CPU), resumed on a CPU without: the resumed event names the
    precision and a warning says the curve goes on in another one. Resumed alike: no warning."""
    import shutil

    from sftkit.core.runstore import RunFolder
    from sftkit.engine import hardware
    from sftkit.engine.train import run_training

    from helpers import tiny_config

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=4, eval_every=0, sample_every=0,
                      checkpoint_every=2)
    full = run_training(cfg).run
    assert next(e for e in full.events() if e["event"] == "started")["frozen_dtype"] == "bfloat16"

    def cut(name):  # a copy of the run cut back to its step-2 checkpoint
        run = RunFolder(tmp_path / "runs" / name)
        shutil.copytree(full.path, run.path)
        shutil.rmtree(run.checkpoints_dir / "checkpoint-4")
        shutil.rmtree(run.adapter_dir)
        return run

    same = cut("same")
    assert run_training(same.config(), same, resume=True).state == "finished"
    resumed = [e for e in same.events() if e["event"] == "resumed"]
    assert resumed[-1]["frozen_dtype"] == "bfloat16"
    assert not [e for e in same.events() if e["event"] == "warning" and "precision" in e["message"]]

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    other = cut("other")
    assert run_training(other.config(), other, resume=True).state == "finished"
    resumed = [e for e in other.events() if e["event"] == "resumed"]
    assert resumed[-1]["frozen_dtype"] is None
    warned = [e["message"] for e in other.events() if e["event"] == "warning" and "precision" in e["message"]]
    assert warned and "started with bfloat16" in warned[0]

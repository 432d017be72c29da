"""Model anatomy and FreezePlan on tiny Llama, Qwen2, GPT-2 and the default model:
counts equal requires_grad sums, layer subsets are exact, errors name the field,
the memory estimate is checked against measured tensors."""

import pytest
import torch

import sftkit
from sftkit.engine.anatomy import inspect_model
from sftkit.engine.freeze import PRESETS, PROMPT_FAMILIES, FreezePlan, PlanError
from sftkit.engine.measure import measure_training_step

ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, default_model_folder):
    from helpers import make_tiny_model

    return {a: make_tiny_model(tmp_path_factory.mktemp(a), a, default_model_folder) for a in ARCHS}


def load(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_blocks(model, anatomy) -> set[int]:
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad and f"{anatomy.block_path}." in name:
            out.add(int(name.split(f"{anatomy.block_path}.")[1].split(".")[0]))
    return out


def test_anatomy_by_introspection(tiny_dirs):
    expect = {
        "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], True),
        "qwen2": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
        "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], True),
    }
    for arch, (path, attn, mlp, tied) in expect.items():
        m = load(tiny_dirs[arch])
        a = inspect_model(m)
        assert (a.block_path, a.attention_columns, a.mlp_columns, a.tied, a.n_blocks) == (path, attn, mlp, tied, 2)
        assert a.total_params == sum(p.numel() for p in m.parameters())
        assert len(a.norm_columns) == 2 and a.final_norms
        assert a.head_module == "lm_head"
    gpt2 = inspect_model(load(tiny_dirs["gpt2"]))
    assert gpt2.embedding_modules == ["transformer.wte", "transformer.wpe"]
    assert gpt2.linear[(0, "attn.c_attn")].out_features == 3 * 64  # Conv1D shapes read right
    qwen = inspect_model(load(tiny_dirs["qwen2"]))
    assert {p.name for p in qwen.params.values() if p.is_bias} == {
        f"model.layers.{b}.self_attn.{x}_proj.bias" for b in range(2) for x in "qkv"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset,top_n", [(p, 1 if p in ("lora_top_blocks", "freeze_tuning") else None)
                                          for p in PRESETS if p != "none" and p not in PROMPT_FAMILIES]
                         + [("lora_attention", 1)])  # prompt methods: tests/test_peft_methods.py
def test_reported_count_equals_requires_grad_and_blocks_are_exact(tiny_dirs, arch, preset, top_n):
    m = load(tiny_dirs[arch])
    a = inspect_model(m)
    plan = FreezePlan.preset(preset, a, top_n=top_n, rank=4, alpha=8)
    trained = plan.apply(m, a)
    assert plan.trainable_params(a) == trainable(trained)
    if preset != "bitfit":
        assert trained_blocks(trained, a) == ({1} if top_n == 1 else {0, 1})
    if plan.kind == "lora":
        adapted = {n.rsplit(".lora_A", 1)[0].replace("base_model.model.", "")
                   for n, _ in trained.named_parameters() if ".lora_A." in n}
        assert adapted == set(plan.lora_modules)


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_and_head_toggles(tiny_dirs, arch):
    m = load(tiny_dirs[arch])
    a = inspect_model(m)
    for emb, head in [(True, False), (False, True), (True, True)]:
        m = load(tiny_dirs[arch])
        plan = FreezePlan.preset("lora_attention", a, embeddings=emb, head=head, rank=4)
        trained = plan.apply(m, a)
        assert plan.trainable_params(a) == trainable(trained), (emb, head)
        m = load(tiny_dirs[arch])
        full = FreezePlan.preset("freeze_tuning", a, top_n=1, embeddings=emb, head=head)
        assert full.trainable_params(a) == trainable(full.apply(m, a))


def test_non_rectangular_choice_targets_exact_modules(tiny_dirs):
    m = load(tiny_dirs["llama"])
    a = inspect_model(m)
    plan = FreezePlan(lora_modules={a.module_name(0, "self_attn.q_proj"), a.module_name(1, "mlp.down_proj")}, rank=2)
    cfg = plan.lora_config(a)
    assert set(cfg.target_modules) == set(plan.lora_modules) and cfg.layers_to_transform is None
    trained = plan.apply(m, a)
    assert plan.trainable_params(a) == trainable(trained) == 2 * (64 + 64) + 2 * (128 + 64)
    rect = FreezePlan.preset("lora_attention", a, top_n=1)
    cfg = rect.lora_config(a)
    assert sorted(cfg.target_modules) == sorted(a.attention_columns) and list(cfg.layers_to_transform) == [1]
    assert cfg.layers_pattern in ("layers", ["layers"])


@pytest.mark.parametrize("arch", ARCHS)
def test_plans_round_trip_through_the_adapter_section(tiny_dirs, arch):
    a = inspect_model(load(tiny_dirs[arch]))
    edited = FreezePlan.preset("lora_attention", a, head=True, rank=4) - FreezePlan(
        lora_modules={a.module_name(0, a.attention_columns[0])})
    bare = FreezePlan(train_params=FreezePlan.preset("bitfit", a).train_params | FreezePlan.embeddings(a).train_params)
    for plan in (edited, bare, FreezePlan.preset("freeze_tuning", a, top_n=1, embeddings=True)):
        section = plan.to_adapter(a)
        again = FreezePlan.from_adapter(section, a)
        assert (again.lora_modules, again.train_params, again.rank) == (plan.lora_modules, plan.train_params,
                                                                         plan.rank)
        assert again.trainable_params(a) == plan.trainable_params(a)
    assert edited.to_adapter(a).remove_lora == [a.module_name(0, a.attention_columns[0])]
    assert bare.to_adapter(a).preset == "bitfit" and bare.to_adapter(a).embeddings


def test_old_import_paths_still_work():
    import sftkit.core.anatomy as core_anatomy
    import sftkit.core.plan as core_plan
    import sftkit.engine.anatomy as engine_anatomy
    import sftkit.engine.freeze as freeze

    for name in ("FreezePlan", "PlanError", "PRESETS", "ResolvedPlan", "anatomy_numbers", "Anatomy", "inspect_model",
                 "base_model_of"):
        assert hasattr(freeze, name), name
    for name in ("Anatomy", "LinearInfo", "ParamInfo", "inspect_model", "base_model_of", "find_blocks",
                 "logical_numel"):
        assert hasattr(engine_anatomy, name), name
    assert engine_anatomy.Anatomy is core_anatomy.Anatomy and freeze.PlanError is core_plan.PlanError
    assert issubclass(freeze.FreezePlan, core_plan.FreezePlan) and sftkit.FreezePlan is freeze.FreezePlan


def test_set_operations(tiny_dirs):
    a = inspect_model(load(tiny_dirs["llama"]))
    attn = FreezePlan.preset("lora_attention", a)
    every = FreezePlan.preset("lora_all_linear", a)
    mlp_only = every - attn
    assert mlp_only.lora_modules == {a.module_name(b, c) for b in range(2) for c in a.mlp_columns}
    assert (mlp_only | attn).lora_modules == every.lora_modules


def test_bad_input_names_the_field(tiny_dirs):
    a = inspect_model(load(tiny_dirs["llama"]))
    with pytest.raises(PlanError, match="nothing is trainable"):
        FreezePlan().validate(a)
    with pytest.raises(PlanError, match=r"target module 'qkv_proj' is not in this llama model; .*self_attn.q_proj"):
        FreezePlan.lora(a, ["q_proj", "qkv_proj"])
    with pytest.raises(PlanError, match=r"rank=0 must be a positive integer"):
        FreezePlan.preset("lora_attention", a, rank=0)
    with pytest.raises(PlanError, match=r"alpha=-1 must be > 0"):
        FreezePlan.preset("lora_attention", a, alpha=-1)
    with pytest.raises(PlanError, match=r"top_n=5 must be between 1 and 2"):
        FreezePlan.preset("freeze_tuning", a, top_n=5)
    with pytest.raises(PlanError, match="unknown preset"):
        FreezePlan.preset("everything", a)


def test_peft_wrapped_and_4bit_models_are_understood(default_model_folder):
    loaded = sftkit.load_model("default", quantization="4bit")
    a = inspect_model(loaded.model)
    assert a.n_blocks == 30 and len(a.linear) == 30 * 7 and all(li.quantized for li in a.linear.values())
    full = inspect_model(sftkit.load_model("default").model)
    assert a.total_params == full.total_params  # 4-bit weights counted unpacked
    plan = FreezePlan.preset("lora_attention", a, top_n=10, rank=8)
    peft_model = plan.apply(loaded.model, a)
    assert plan.trainable_params(a) == trainable(peft_model)
    again = inspect_model(peft_model)  # already wrapped: same anatomy
    assert (again.n_blocks, again.linear_columns, again.total_params) == (30, a.linear_columns, a.total_params)


# ---- memory: estimate vs measured ------------------------------------------------------
ACTIVATION_TOLERANCE = 0.20  # stated in the README; measured 0.94-1.13 across presets


@pytest.mark.slow
@pytest.mark.parametrize("preset,top_n,gc,attn,trained,frozen", [
    ("lora_attention", None, False, "sdpa", None, None),
    ("lora_all_linear", None, False, "eager", None, None),
    ("freeze_tuning", 4, False, "sdpa", None, None),
    ("bitfit", None, False, "sdpa", None, None),
    ("lora_attention", None, True, "sdpa", None, None),
    ("lora_all_linear", None, False, "sdpa", 12, None),  # sftkit's runs: the head at the 12 trained tokens only
    # the frozen weights and saved activations in bf16 (adapter runs on CPUs with native bf16, engine/precision.py)
    ("lora_all_linear", None, False, "sdpa", 12, "bfloat16"),
    ("ia3", None, False, "sdpa", 12, "bfloat16"),
])
def test_memory_estimate_matches_measurement_on_the_default_model(default_model_folder, preset, top_n, gc, attn,
                                                                   trained, frozen):
    from sftkit.engine.precision import store_frozen_in

    model = sftkit.load_model("default", attn_implementation=attn).model
    a = inspect_model(model)
    plan = FreezePlan.preset(preset, a, top_n=top_n)
    est = plan.memory_estimate(a, batch_size=2, seq_len=80, gradient_checkpointing=gc, attention=attn,
                               trained_per_row=trained, frozen=frozen)
    tuned = plan.apply(model, a)
    if frozen:
        assert store_frozen_in(tuned, frozen) > 0
    if gc:
        tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tuned.enable_input_require_grads()
    m = measure_training_step(tuned, 2, 80, trained_per_row=trained, saved_dtype=frozen)
    assert est.weights == pytest.approx(m.weights, rel=0.01)
    assert est.gradients == pytest.approx(m.gradients, rel=0.01)
    assert est.optimizer == pytest.approx(m.optimizer, rel=0.01)
    assert est.activations == pytest.approx(m.activations, rel=ACTIVATION_TOLERANCE)


def test_4bit_weight_estimate_matches_the_loaded_footprint(default_model_folder):
    q = sftkit.load_model("default", quantization="4bit")
    a = inspect_model(q.model)
    est = FreezePlan.preset("lora_attention", a).memory_estimate(a, weights="4bit")
    lora_bytes = FreezePlan.preset("lora_attention", a).trainable_params(a) * 4
    assert est.weights - lora_bytes == pytest.approx(q.report.footprint_bytes, rel=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("preset,top_n", [("lora_attention", None), ("lora_all_linear", None), ("lora_top_blocks", 8),
                                          ("freeze_tuning", 4), ("bitfit", None)])
def test_every_preset_on_the_default_model(default_model_folder, preset, top_n):
    model = sftkit.load_model("default").model
    a = inspect_model(model)
    plan = FreezePlan.preset(preset, a, top_n=top_n)
    trained = plan.apply(model, a)
    assert plan.trainable_params(a) == trainable(trained)
    blocks = trained_blocks(trained, a)
    if preset == "bitfit":
        assert blocks == set(range(30))  # every block's norms
    else:
        assert blocks == (set(range(30 - top_n, 30)) if top_n else set(range(30)))


def test_passes_bound_the_activation_estimate_and_trained_positions_shrink_the_logits():
    from sftkit.core.memory import estimate_memory

    sizes = {"total_params": 1000, "linear_params": 800, "n_blocks": 4, "hidden": 64, "intermediate": 128,
             "vocab": 1000, "heads": 4}
    whole = estimate_memory(sizes, trainable=10, batch_size=8, seq_len=100)
    passes = estimate_memory(sizes, trainable=10, batch_size=8, seq_len=100, pass_tokens=200)
    per_row = (4 * (9 * 64 + 4 * 128) + 64) * 4 + 1000 * 4  # a row's block values (fp32) + its logits, per token
    assert whole.activations == 8 * 100 * per_row
    assert passes.activations == 2 * 100 * per_row  # two whole rows per pass of 200 tokens
    assert any("passes of 2 row(s)" in n for n in passes.notes)
    long_rows = estimate_memory(sizes, trainable=10, batch_size=8, seq_len=500, pass_tokens=200)
    assert long_rows.activations == 1 * 500 * per_row  # a row longer than a pass is a pass of its own
    head_only = estimate_memory(sizes, trainable=10, batch_size=8, seq_len=100, trained_per_row=10)
    assert whole.activations - head_only.activations == 8 * 90 * 1000 * 4  # logits for 10 tokens a row, not 100

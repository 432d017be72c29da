"""PlanEditor and the core plan without widgets or a model: a hand-made anatomy record, cell
toggles, presets, groups, counters, the estimate and whether it fits, change events, and the
plan's adapter-section form (preset + edits, found directly)."""

import subprocess
import sys

import pytest

from sftkit.core.anatomy import Anatomy, LinearInfo, ParamInfo
from sftkit.core.plan import PRESET_MEANINGS, PRESETS, FreezePlan, PlanError, PresetChoice
from sftkit.core.runconfig import AdapterConfig, RunConfig
from sftkit.state.plan_editor import ERROR, ESTIMATE, FIT_FRACTION, PLAN, SELECTION, PlanEditor

H, I, V = 8, 16, 32  # hidden, intermediate, vocab
ATTN = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
        "self_attn.o_proj": (H, H)}
MLP = {"mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H)}
NORMS = ("input_layernorm", "post_attention_layernorm")


def make_anatomy(n_blocks: int = 3, biases: bool = False) -> Anatomy:
    """A Llama-shaped record: blocks of q/k/v/o + gate/up/down + two norms, embeddings, head."""
    linear, params, module_params = {}, {}, {}

    def param(module, leaf, numel, block=None, column=None, kind="other"):
        name = f"{module}.{leaf}"
        params[name] = ParamInfo(name, module, numel, 4 * numel, block, column, kind, leaf == "bias", False)
        module_params.setdefault(module, []).append(name)

    for b in range(n_blocks):
        for column, (fin, fout) in {**ATTN, **MLP}.items():
            kind = "attention" if column in ATTN else "mlp"
            module = f"model.layers.{b}.{column}"
            bias = biases and column in ATTN
            linear[(b, column)] = LinearInfo(module, b, column, kind, fin, fout, fin * fout + (fout if bias else 0),
                                             False)
            param(module, "weight", fin * fout, b, column, kind)
            if bias:
                param(module, "bias", fout, b, column, kind)
        for norm in NORMS:
            param(f"model.layers.{b}.{norm}", "weight", H, b, norm, "norm")
    param("model.embed_tokens", "weight", V * H, kind="embedding")
    param("model.norm", "weight", H, kind="norm")
    param("lm_head", "weight", V * H, kind="head")
    return Anatomy("llama", "model.layers", n_blocks, list(ATTN), list(MLP), [], list(NORMS), linear, params,
                   ["model.embed_tokens"], "lm_head", False, ["model.norm"], H, I, V, 2, 2, module_params)


@pytest.fixture()
def editor():
    return PlanEditor(make_anatomy(), device_bytes=2**30, batch_size=2, seq_len=16)


def events_of(ed) -> list:
    seen = []
    ed.on_change(seen.append)
    return seen


# ---- the editor ----------------------------------------------------------------------------------
def test_starts_on_lora_attention_with_counters(editor):
    a = editor.anatomy
    assert editor.plan.lora_modules == FreezePlan.preset("lora_attention", a).lora_modules
    assert editor.trainable == editor.plan.trainable_params(a) == 3 * 4 * 16 * (H + H)
    assert editor.trainable_percent == pytest.approx(100 * editor.trainable / a.total_params)
    assert editor.estimate is not None and editor.error is None and editor.fits and editor.warning is None
    assert (editor.preset, editor.top_n, editor.click_sets) == ("lora_attention", 3, "lora")
    assert editor.columns == list(ATTN) + list(MLP) + list(NORMS)
    assert editor.cell_state(0, "self_attn.q_proj") == "lora" and editor.cell_state(0, "mlp.up_proj") == "off"
    assert hasattr(editor.plan, "apply") and hasattr(editor.plan, "lora_config")  # the engine's plan


def test_toggles_set_the_click_mode_and_back(editor):
    seen = events_of(editor)
    before = editor.trainable
    editor.toggle(1, "mlp.down_proj")
    assert "model.layers.1.mlp.down_proj" in editor.plan.lora_modules
    assert editor.trainable == before + 16 * (I + H) and seen == [PLAN]
    editor.toggle(1, "mlp.down_proj")
    assert editor.trainable == before and editor.cell_state(1, "mlp.down_proj") == "off"
    editor.select(click_sets="full")
    editor.toggle(2, "mlp.up_proj")
    assert editor.cell_state(2, "mlp.up_proj") == "full" and editor.trainable == before + H * I
    editor.toggle(0, "input_layernorm", mode="lora")  # a norm trains in full, whatever the mode
    assert editor.cell_state(0, "input_layernorm") == "full"
    assert editor.cell_params(0, "input_layernorm") == H and editor.plan.label == "custom"
    assert seen == [PLAN, PLAN, SELECTION, PLAN, PLAN]


def test_presets_keep_settings_and_groups(editor):
    editor.set_settings(rank=4)
    editor.set_group("embeddings", True)
    assert editor.groups["embeddings"] and "model.embed_tokens.weight" in editor.plan.train_params
    editor.select(preset="freeze_tuning", top_n=1)
    assert editor.apply_preset()
    assert editor.plan.method == "full" and editor.plan.blocks(editor.anatomy) == [2]
    assert "model.embed_tokens.weight" in editor.plan.train_params and editor.plan.rank == 4
    assert editor.apply_preset("lora_all_linear", 3)
    assert editor.plan.origin == PresetChoice("lora_all_linear", None, True, False)  # all blocks: no top_n
    n4 = editor.trainable
    editor.set_group("embeddings", False)
    editor.set_settings(rank=8)
    assert editor.trainable == 2 * (n4 - V * H)
    assert set(editor.presets()) == set(PRESETS)


def test_refused_edits_keep_the_plan_and_say_why(editor):
    seen = events_of(editor)
    plan = editor.plan
    assert not editor.set_settings(rank=0) and editor.plan is plan
    assert "rank=0" in editor.error and seen == [ERROR]
    assert not editor.apply_preset("lora_attention", 7) and "top_n=7" in editor.error
    editor.set_budget(batch_size=4)  # the next change recounts and clears the error
    assert editor.error is None and seen[-1] == ESTIMATE
    with pytest.raises(ValueError):
        editor.select(preset="everything")


def test_nothing_trainable_is_an_error_without_estimate(editor):
    for b in range(3):
        for c in ATTN:
            editor.toggle(b, c)
    assert "nothing is trainable" in editor.error and editor.estimate is None and editor.fits


def test_estimate_follows_the_budget_and_the_threshold_is_named():
    ed = PlanEditor(make_anatomy(), device_bytes=2**20, batch_size=1, seq_len=8)
    small = ed.estimate.total
    assert ed.fits == (small <= FIT_FRACTION * 2**20)
    seen = events_of(ed)
    ed.set_budget(batch_size=64, seq_len=4096)
    assert ed.estimate.total > small and not ed.fits and seen == [ESTIMATE]
    assert "won't fit in device: 1 MiB" in ed.warning and "gradient checkpointing" in ed.warning
    ed.set_budget(gradient_checkpointing=True)
    assert ed.estimate.activations < ed.estimate.total
    ed.set_budget(batch_size=64)  # no change, no event
    assert seen == [ESTIMATE, ESTIMATE]
    assert PlanEditor(make_anatomy(), device_bytes=None).fits


def test_unsubscribe_and_adapter_config(editor):
    seen = []
    stop = editor.on_change(seen.append)
    editor.toggle(0, "mlp.up_proj")
    stop()
    editor.toggle(1, "mlp.up_proj")
    assert seen == [PLAN]
    section = editor.adapter_config()
    assert isinstance(section, AdapterConfig) and section.preset == "lora_attention"
    assert section.add_lora == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


def test_editor_layer_imports_no_widgets():
    code = ("import sys; import sftkit.state.plan_editor; "
            "print(sorted(m for m in ('ipywidgets', 'plotly', 'IPython') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the core plan: one PRESETS, one serialised form ---------------------------------------------
def test_one_presets_definition():
    import sftkit.core.runconfig as runconfig
    import sftkit.engine.freeze as freeze

    assert runconfig.PRESETS is PRESETS is freeze.PRESETS and tuple(PRESET_MEANINGS) == PRESETS
    assert "none" in PRESETS and not FreezePlan.preset("none", make_anatomy()).lora_modules


def test_core_and_engine_plans_are_one_plan():
    from sftkit.engine.freeze import FreezePlan as EnginePlan

    a = make_anatomy()
    core, engine = FreezePlan.preset("lora_attention", a), EnginePlan.preset("lora_attention", a)
    assert core == engine and hash(core) == hash(engine) and type(engine) is EnginePlan
    assert type(engine | core) is EnginePlan and EnginePlan.of(core) == core
    assert EnginePlan.of(core).origin == core.origin
    assert FreezePlan.from_dict(core.to_dict()).origin == core.origin


def test_to_adapter_uses_the_origin_directly(monkeypatch):
    a = make_anatomy(n_blocks=30)
    plan = (FreezePlan.preset("lora_top_blocks", a, top_n=5, head=True, rank=4)
            - FreezePlan(lora_modules={"model.layers.29.mlp.up_proj"})) | FreezePlan(train_params={"model.norm.weight"})
    calls = []
    real = FreezePlan.preset.__func__
    monkeypatch.setattr(FreezePlan, "preset", classmethod(lambda cls, *args, **kw: calls.append(args) or
                                                          real(cls, *args, **kw)))
    section = plan.to_adapter(a)
    assert len(calls) == 1  # the origin's preset, nothing tried
    assert (section.preset, section.top_n, section.head, section.rank) == ("lora_top_blocks", 5, True, 4)
    assert section.remove_lora == ["model.layers.29.mlp.up_proj"] and section.add_train == ["model.norm.weight"]
    again = FreezePlan.from_adapter(RunConfig.from_yaml(RunConfig(adapter=section.__dict__).to_yaml()).adapter, a)
    assert (again.lora_modules, again.train_params) == (plan.lora_modules, plan.train_params)
    assert again.label == "lora_top_blocks(top 5) + head (edited)"


@pytest.mark.parametrize("choice", [PresetChoice("lora_attention"), PresetChoice("lora_all_linear", None, True),
                                    PresetChoice("freeze_tuning", 4), PresetChoice("lora_top_blocks", 7, False, True),
                                    PresetChoice("lora_attention", 2), PresetChoice("bitfit")])
def test_plans_without_origin_find_their_preset_among_few(monkeypatch, choice):
    a = make_anatomy(n_blocks=30, biases=True)
    built = FreezePlan.preset(choice.name, a, top_n=choice.top_n, embeddings=choice.embeddings, head=choice.head)
    bare = FreezePlan(lora_modules=built.lora_modules, train_params=built.train_params)
    assert bare.origin is None
    calls = []
    real = FreezePlan.preset.__func__
    monkeypatch.setattr(FreezePlan, "preset", classmethod(lambda cls, *args, **kw: calls.append(args) or
                                                          real(cls, *args, **kw)))
    section = bare.to_adapter(a)
    assert len(calls) <= 12  # a handful read off the plan, not every preset x every top_n
    assert not (section.add_lora or section.remove_lora or section.add_train or section.remove_train), section
    rebuilt = FreezePlan.from_adapter(section, a)
    assert (rebuilt.lora_modules, rebuilt.train_params) == (bare.lora_modules, bare.train_params)


def test_origin_from_another_model_falls_back():
    small, big = make_anatomy(n_blocks=3), make_anatomy(n_blocks=30)
    origin = FreezePlan.preset("freeze_tuning", big, top_n=20).origin
    moved = FreezePlan.preset("freeze_tuning", small, top_n=1).with_settings(origin=origin)
    section = moved.to_adapter(small)  # top_n=20 does not exist on 3 blocks
    assert (section.preset, section.top_n) == ("freeze_tuning", 1) and not section.add_train


def test_from_adapter_names_bad_names():
    with pytest.raises(PlanError, match=r"adapter.add_lora: model.layers.9.mlp.up_proj not in this model"):
        FreezePlan.from_adapter(AdapterConfig(add_lora=["model.layers.9.mlp.up_proj"]), make_anatomy())
    with pytest.raises(PlanError, match="trains nothing"):
        FreezePlan.from_adapter(AdapterConfig(preset="none"), make_anatomy())


def test_frozen_weights_in_bf16_halve_the_frozen_part_of_the_estimate_only():
    a = make_anatomy()
    total = a.total_params
    fp32, mixed = PlanEditor(a), PlanEditor(a, frozen="bfloat16")
    assert PlanEditor(a, frozen="float32").frozen is None  # the same as the weights: nothing apart
    lora = fp32.trainable
    assert fp32.estimate.weights == (total + lora) * 4  # the base and the adapters, fp32
    assert mixed.estimate.weights == total * 2 + lora * 4  # the base in bf16, the adapters fp32
    assert (mixed.estimate.gradients, mixed.estimate.optimizer) == (fp32.estimate.gradients, fp32.estimate.optimizer)
    assert any("frozen weights stored in bfloat16" in n for n in mixed.estimate.notes)
    # a plan that trains weights in place saves the whole model: its runs stay fp32, and so does the estimate
    top = FreezePlan.preset("freeze_tuning", a, top_n=1)
    assert PlanEditor(a, top, frozen="bfloat16").estimate == PlanEditor(a, top).estimate
    assert PlanEditor(a, weights="4bit", frozen="bfloat16").frozen is None  # k-bit weights are not stored apart
    with pytest.raises(ValueError, match="frozen='<b>'"):
        PlanEditor(a, frozen="<b>")

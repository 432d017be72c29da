"""Every PEFT family side by side: LoRA (DoRA, rsLoRA), IA3, prompt tuning, prefix tuning, p-tuning,
LLaMA-Adapter (adaption prompt), BitFit and freeze tuning. Each trains through the run engine; the
trainable count equals the requires_grad count; the saved adapter loads with plain peft and gives the
run's own eval loss; merging works where it can and is refused by name where it can't; the memory
estimate is checked against measured tensor bytes; the shoot-out trains every method on the same rows."""

import math

import pytest
import torch

import sftkit
from sftkit.core.plan import ADAPTION_PROMPT_MODELS, PROMPT_FAMILIES
from sftkit.core.runconfig import RunConfig, RunConfigError
from sftkit.engine.anatomy import inspect_model
from sftkit.engine.freeze import FreezePlan, PlanError
from sftkit.engine.measure import measure_training_step

from helpers import make_tiny_model, tiny_config

# (preset, extra adapter settings) for every method the run engine offers
METHODS = {
    "lora": ("lora_attention", {}),
    "dora": ("lora_attention", {"use_dora": True}),
    "rslora": ("lora_attention", {"rslora": True}),
    "ia3": ("ia3", {}),
    "prompt_tuning": ("prompt_tuning", {"virtual_tokens": 6}),
    "prompt_from_text": ("prompt_tuning", {"virtual_tokens": 6, "prompt_init": "Answer with a date:"}),
    "prefix_tuning": ("prefix_tuning", {"virtual_tokens": 6}),
    "p_tuning": ("p_tuning", {"virtual_tokens": 6}),
    "adaption_prompt": ("adaption_prompt", {"virtual_tokens": 4, "top_n": 1}),
}
# LLaMA-Adapter's gates start at zero: a few tiny steps need a larger rate to move the loss measurably
RATES = {"adaption_prompt": 0.05}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def method_config(model_dir, store, method, **training):
    preset, extra = METHODS[method]
    training = {"learning_rate": RATES.get(method, 5e-3), "max_steps": 4, "eval_every": 0, "sample_every": 0,
                "checkpoint_every": 4, **training}
    cfg = tiny_config(model_dir, store, **training)
    return cfg.with_changes(name=method, adapter={"preset": preset, "rank": 4, "alpha": 8.0, "dropout": 0.0, **extra})


def eval_loss_with_plain_peft(cfg, run, model_dir, adapter: bool = True) -> float:
    """The eval split scored by a transformers Trainer around plain ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from sftkit.core.rundata import run_rows
    from sftkit.engine.recipes import build_datasets
    from sftkit.engine.train import build_collator

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter:
        model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    data = build_datasets(run_rows(cfg), tokenizer)
    args = TrainingArguments(output_dir=str(run.path / "plain-eval"), per_device_eval_batch_size=cfg.training.batch_size,
                             use_cpu=True, report_to="none", remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data.eval, data_collator=build_collator(tokenizer, False))
    return trainer.evaluate()["eval_loss"]


# ---- each method through the run engine --------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bf16-frozen"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_loads_with_plain_peft_giving_the_runs_eval_loss(method, dtype, tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    """float32: every weight fp32 in the run, so plain peft (fp32) gives the run's eval loss exactly. bf16-frozen:
    the default on a CPU with native bf16 (made so here whatever this CPU is: bf16 matmuls run anywhere), the
    frozen weights and the saved activations in bf16 (engine/precision.py); plain peft's fp32 loss is then the
    run's within bf16 rounding, far closer than the adapter's own effect."""
    from sftkit.engine import hardware, precision
    from sftkit.engine.train import run_training

    packed = []
    if dtype == "bf16-frozen":
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda cpuinfo=None: True)
        monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
        pack = precision.saved_in.pack
        monkeypatch.setattr(precision.saved_in, "pack", lambda self, t: packed.append(1) or pack(self, t))
    cfg = method_config(tiny_llama_dir, tmp_path / "runs", method).with_changes(
        model={"dtype": "float32" if dtype == "float32" else "auto"})
    result = run_training(cfg)
    run = result.run
    assert result.state == "finished", result.message
    started = next(e for e in run.events() if e["event"] == "started")
    final = run.events()[-1]
    assert final["event"] == "finished" and math.isfinite(final["eval_loss"])
    # the count the run reports is what trains (build_model checks it against requires_grad too)
    model = sftkit.load_model(str(tiny_llama_dir)).model
    anatomy = inspect_model(model)
    plan = FreezePlan.from_adapter(cfg.adapter, anatomy)
    assert started["trainable"] == plan.trainable_params(anatomy) == trainable(plan.apply(model, anatomy))
    # plain peft, plain Trainer: the same eval loss the run measured with its own model
    cfg = run.config()
    frozen = None if dtype == "float32" else "bfloat16"
    assert started["frozen_dtype"] == frozen and bool(packed) == bool(frozen)  # SFT steps kept bf16 activations
    tolerance = 2e-5 if frozen is None else 5e-4  # measured: at most 2.3e-4 apart on a loss of 10.5
    with_adapter = eval_loss_with_plain_peft(cfg, run, tiny_llama_dir)
    without = eval_loss_with_plain_peft(cfg, run, tiny_llama_dir, adapter=False)
    assert with_adapter == pytest.approx(final["eval_loss"], abs=tolerance)
    # and the adapter is not a no-op: without it the loss is another, by more than that tolerance
    assert abs(without - final["eval_loss"]) > max(1e-4, 2 * tolerance)


# ---- the configuration refuses what can't work, by name ----------------------------------------------
@pytest.mark.parametrize("preset", PROMPT_FAMILIES)
def test_prompt_methods_refuse_packing_naming_the_setting(preset, tiny_llama_dir, tmp_path):
    with pytest.raises(RunConfigError, match=r"training.packing=on is not allowed with adapter.preset=" + preset):
        RunConfig.from_dict({"adapter": {"preset": preset}, "training": {"packing": True}})
    # LoRA, IA3 and the rest pack as before
    for other in ("lora_attention", "ia3", "bitfit"):
        assert RunConfig.from_dict({"adapter": {"preset": other}, "training": {"packing": True}}).training.packing == "on"


@pytest.mark.parametrize("changes,words", [
    ({"preset": "ia3", "use_dora": True}, "adapter.use_dora=True is not allowed"),
    ({"preset": "prompt_tuning", "rslora": True}, "adapter.rslora=True is not allowed"),
    ({"preset": "bitfit", "use_dora": True}, "adapter.use_dora=True is not allowed"),
    ({"preset": "prompt_tuning", "virtual_tokens": 0}, "adapter.virtual_tokens=0 is not allowed"),
    ({"preset": "prefix_tuning", "virtual_tokens": 513}, "adapter.virtual_tokens=513 is not allowed"),
])
def test_method_knobs_are_checked_naming_the_field(changes, words):
    with pytest.raises(RunConfigError, match=words):
        RunConfig.from_dict({"adapter": changes})


def test_plan_refuses_prompt_methods_with_modules_or_unsupported_models(tiny_llama_dir, tmp_path):
    a = inspect_model(sftkit.load_model(str(tiny_llama_dir)).model)
    base = RunConfig().adapter
    for preset in PROMPT_FAMILIES:
        adapter = base.__class__(preset=preset, embeddings=True)
        with pytest.raises(PlanError, match="adapter.embeddings"):
            FreezePlan.from_adapter(adapter, a)
        adapter = base.__class__(preset=preset, add_lora=["model.layers.0.self_attn.q_proj"])
        with pytest.raises(PlanError, match="adapter.add_lora"):
            FreezePlan.from_adapter(adapter, a)
    qwen = inspect_model(sftkit.load_model(str(make_tiny_model(tmp_path / "q", "qwen2", tiny_llama_dir))).model)
    with pytest.raises(PlanError, match="IA3 has no bias option"):
        (FreezePlan.preset("ia3", qwen) | FreezePlan.biases(qwen)).resolve(qwen)
    assert qwen.model_type not in ADAPTION_PROMPT_MODELS
    with pytest.raises(PlanError, match="adaption_prompt .* supports model types llama, mistral, gpt2"):
        FreezePlan.preset("adaption_prompt", qwen).resolve(qwen)


def test_adaption_prompt_model_types_are_peft_s():
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    assert set(ADAPTION_PROMPT_MODELS) == set(TRANSFORMERS_MODEL_CONFIG)


# ---- export honesty -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,merges", [("ia3", True), ("dora", True), ("prompt_tuning", False),
                                           ("prefix_tuning", False)])
def test_merge_what_can_merge_and_refuse_by_name_what_cant(method, merges, tiny_llama_dir, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.engine.output import MergeRefused, export_adapter, load_trained, merge_and_save
    from sftkit.engine.train import run_training

    run = run_training(method_config(tiny_llama_dir, tmp_path / "runs", method, max_steps=2)).run
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    tuned, _ = load_trained(run)
    with torch.no_grad():
        want = tuned(input_ids=ids).logits[:, -ids.shape[1]:]  # prompt tuning's logits include its virtual tokens
    if merges:
        out = merge_and_save(run, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(str(out))
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
    else:
        with pytest.raises(MergeRefused, match=rf"adapter.preset={METHODS[method][0]}.*nothing to merge"):
            merge_and_save(run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()  # refused before anything was written
    exported = export_adapter(run, tmp_path / "exported")
    assert PeftConfig.from_pretrained(str(exported)).peft_type.value == {
        "ia3": "IA3", "dora": "LORA", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}[method]
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(exported))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits[:, -ids.shape[1]:], want, atol=1e-5)
    export_adapter(run, tmp_path / "exported")  # an earlier export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="did not write"):
        export_adapter(run, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ---- the shoot-out -----------------------------------------------------------------------------------------
def test_shootout_trains_each_method_as_a_run_and_scores_them_on_the_same_items(tiny_llama_dir, tmp_path, cache):
    from sftkit.core.runstore import RunStore
    from sftkit.engine.shootout import METHODS, Budget, Shootout, compare_methods, latest_shootout

    lines = []
    chosen = ["LoRA", "IA3", "prompt tuning", "BitFit"]
    result = compare_methods("dates", chosen, Budget(steps=3, batch_size=4, rows=60, eval_items=6),
                             model=str(tiny_llama_dir), store=tmp_path / "runs", progress=lines.append)
    assert [r["method"] for r in result.methods] == chosen and result.complete
    runs = {r.name: r for r in RunStore(tmp_path / "runs").runs()}
    assert len(runs) == 4  # one ordinary run per method, in the history
    model = sftkit.load_model(str(tiny_llama_dir)).model
    a = inspect_model(model)
    for row in result.methods:
        run = runs[row["run"]]
        cfg = run.config()
        assert cfg.training.max_steps == 3 and cfg.training.seed == 0 and cfg.data.rows == 60  # the same budget
        assert cfg.training.learning_rate == METHODS[row["method"]].learning_rate
        plan = FreezePlan.from_adapter(cfg.adapter, a)
        assert row["trainable"] == plan.trainable_params(a)
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable"] / a.total_params)
        assert row["state"] == "finished" and row["peak_mib"] > 0 and row["tokens_per_s"] > 0 and row["minutes"] > 0
        assert row["n"] == 6 and row["score"] is not None and len(row["score_ci"]) == 2
        assert row["score_ci"][0] <= row["score"] <= row["score_ci"][1]
        assert row["kl"] is not None and row["kl"] >= 0  # forgetting, for adapters and for BitFit's saved model
        assert [s for s, _ in result.curves[row["method"]]] == [1, 2, 3]
    assert result.best in chosen and sum(r.get("vs_best") == "best" for r in result.methods) == 1
    assert all("p_vs_best" in r for r in result.methods if r["method"] != result.best)
    for r in result.methods:  # the p against the best is Holm-adjusted over the methods compared with it
        if r.get("p_vs_best") is not None:
            assert r["p_vs_best"] <= r["p_vs_best_holm"] <= min(1.0, 3 * r["p_vs_best"]) + 1e-12
    assert any("training prompt tuning (3/4)" in line for line in lines)
    # saved beside the runs: a re-opened notebook reads the same table
    again = latest_shootout(tmp_path / "runs")
    assert again.methods == Shootout.from_dict(result.to_dict()).methods and "prompt tuning" in again.text()
    # and the view shows it after a restart: the table and the four curves
    from sftkit.ui import ShootoutView

    view = ShootoutView.reopen(tmp_path / "runs")
    assert all(name in view.table.value for name in chosen) and len(view.figure.data) == 4
    assert view.start_button.disabled is False and view.stop_button.disabled is True


def test_shootout_table_escapes_what_it_shows():
    from sftkit.engine.shootout import Shootout
    from sftkit.ui.shootout_view import table_html

    row = {"method": "<img src=x onerror=alert(1)>", "trainable": 10, "trainable_percent": 0.01, "peak_mib": 1.0,
           "tokens_per_s": 2.0, "minutes": 0.1, "eval_loss": 1.0, "score": 0.5, "score_ci": [0.2, 0.8],
           "vs_best": "<b>x</b>", "kl": 0.0}
    hostile = {"steps": "<script>alert(2)</script>", "batch_size": "<img src=y>", "rows": 4, "seed": "<i>", "eval_items": 1}
    out = table_html(Shootout(task="<t>", budget=hostile, methods=[row], best=row["method"]))
    assert "<img" not in out and "&lt;img" in out and "<b>x</b>" not in out and "50.0% [20.0, 80.0]" in out
    assert "<script" not in out and "&lt;script&gt;" in out and "<i>" not in out and "&lt;t&gt;" in out


# ---- the picker shows what each method trains --------------------------------------------------------------
def test_picker_shows_each_method_its_counts_and_virtual_tokens(tiny_llama_dir):
    from sftkit.ui import LayerPicker

    model = sftkit.load_model(str(tiny_llama_dir)).model
    picker = LayerPicker(model, device_bytes=2**34)
    ed = picker.editor
    picker.preset.value = "ia3"
    picker.apply_preset_button.click()
    assert ed.plan.kind == "ia3" and ed.error is None
    states = {c: ed.cell_state(0, c) for c in ed.columns}
    assert states["self_attn.k_proj"] == states["self_attn.v_proj"] == states["mlp.down_proj"] == "ia3"
    assert states["self_attn.q_proj"] == "off" and picker.cells[(0, "self_attn.k_proj")].description.startswith("I ")
    picker.cells[(1, "self_attn.q_proj")].click()  # a click adds IA3 to q_proj of block 1
    assert ed.cell_state(1, "self_attn.q_proj") == "ia3" and ed.trainable == trainable(ed.plan.apply(
        sftkit.load_model(str(tiny_llama_dir)).model, ed.anatomy))
    assert "IA3" in picker.counters.value and "of the model" in picker.counters.value

    picker.preset.value = "prompt_tuning"
    picker.apply_preset_button.click()
    picker.virtual_tokens.value = 7
    assert ed.plan.kind == "prompt_tuning" and ed.trainable == 7 * ed.anatomy.hidden_size
    assert picker.tokens.value.count("sftkit-virtual-token") == 7 and "in front of every prompt" in picker.tokens.value
    assert all(ed.cell_state(b, c) == "off" for b in range(2) for c in ed.columns)
    picker.cells[(0, "self_attn.q_proj")].click()  # cells are not a prompt method's: refused, said, unchanged
    assert "virtual tokens, not modules" in picker.messages.value and ed.plan.kind == "prompt_tuning"
    assert f"{100 * 7 * 64 / ed.total_params:.3f}%" in picker.counters.value

    picker.preset.value = "adaption_prompt"
    picker.top_n.value = 1
    picker.apply_preset_button.click()
    assert ed.cell_state(1, "self_attn.q_proj") == "prompt" and ed.cell_state(0, "self_attn.q_proj") == "off"
    assert "blocks 1 to 1" in picker.tokens.value

    picker.preset.value = "lora_attention"
    picker.apply_preset_button.click()
    picker.use_dora.value = True
    assert ed.plan.use_dora and "DoRA" in picker.counters.value and picker.tokens.value == ""
    picker.preset.value = "ia3"
    picker.apply_preset_button.click()  # DoRA is LoRA's: the IA3 plan drops it
    assert ed.plan.kind == "ia3" and not ed.plan.use_dora and picker.use_dora.value is False
    assert ed.adapter_config().preset == "ia3"


@pytest.mark.slow
@pytest.mark.parametrize("preset,extra", [("ia3", {}), ("lora_attention", {"use_dora": True}),
                                          ("prompt_tuning", {}), ("prefix_tuning", {}), ("p_tuning", {}),
                                          ("adaption_prompt", {"top_n": 10})])
def test_memory_estimate_of_each_method_matches_measurement_on_the_default_model(default_model_folder, preset, extra):
    from test_freeze_plan import ACTIVATION_TOLERANCE

    model = sftkit.load_model("default").model
    a = inspect_model(model)
    extra = dict(extra)
    plan = FreezePlan.preset(preset, a, top_n=extra.pop("top_n", None), **extra)
    est = plan.memory_estimate(a, batch_size=2, seq_len=80)
    trained = plan.apply(model, a)
    assert plan.trainable_params(a) == trainable(trained)
    m = measure_training_step(trained, 2, 80)
    assert est.weights == pytest.approx(m.weights, rel=0.01)
    assert est.gradients == pytest.approx(m.gradients, rel=0.01)
    assert est.optimizer == pytest.approx(m.optimizer, rel=0.01)
    assert est.activations == pytest.approx(m.activations, rel=ACTIVATION_TOLERANCE)


# ---- review fixes: the shoot-out ---------------------------------------------------------------------------------
def test_stopped_shootout_still_scores_the_methods_that_finished(tiny_llama_dir, tmp_path, cache):
    import threading

    from sftkit.engine.shootout import Budget, compare_methods, latest_shootout

    stop = threading.Event()

    def on_run(method, run):
        if method.name == "IA3":  # Stop pressed as the second method starts: LoRA finished, BitFit never starts
            stop.set()

    result = compare_methods("dates", ["LoRA", "IA3", "BitFit"], Budget(steps=2, batch_size=4, rows=40, eval_items=4),
                             model=str(tiny_llama_dir), store=tmp_path / "runs", stop=stop, on_run=on_run)
    rows = {r["method"]: r for r in result.methods}
    assert "BitFit" not in rows and not result.complete
    assert rows["LoRA"]["state"] == "finished" and rows["LoRA"]["n"] == 4 and rows["LoRA"]["score"] is not None
    assert latest_shootout(tmp_path / "runs").methods[0]["score"] == rows["LoRA"]["score"]


def test_shootout_text_shows_a_dash_for_a_method_that_failed_before_it_started():
    from sftkit.engine.shootout import Shootout

    failed = {"method": "IA3", "state": "failed", "trainable": None, "trainable_percent": None}
    ok = {"method": "LoRA", "state": "finished", "trainable": 1234, "trainable_percent": 0.5, "score": 0.5,
          "score_ci": [0.25, 0.75]}
    text = Shootout(task="dates", budget={}, methods=[ok, failed]).text()
    assert "1,234" in text and "0.500" in text and "50.0 [25.0, 75.0]" in text
    line = next(x for x in text.splitlines() if x.startswith("IA3"))
    assert line.split()[1:3] == ["-", "-"]


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "", "x" * 101, "a b", 5])
def test_shootout_name_is_checked_before_anything_trains(name, tmp_path):
    from sftkit.engine.shootout import compare_methods

    with pytest.raises(RunConfigError, match=r"name=.* is not allowed; allowed: 1 to 100 letters"):
        compare_methods("dates", ["LoRA"], model="no-such-model-is-loaded", store=tmp_path / "runs", name=name)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_shootouts_of_the_same_name_are_kept_and_the_latest_is_the_last_saved(tmp_path):
    from sftkit.engine.shootout import Shootout, latest_shootout, save_shootout, shootouts

    store = tmp_path / "runs"
    first = Shootout(task="dates", budget={}, methods=[{"method": "LoRA", "run": "r"}], name="zz")
    save_shootout(first, store)
    second = Shootout(task="dates", budget={}, methods=[{"method": "IA3", "run": "r"}], name="zz")
    save_shootout(second, store)
    assert second.name == "zz-2" and Shootout.load(store / "shootouts" / "zz.json").methods == [{"method": "LoRA", "run": "r"}]
    third = Shootout(task="dates", budget={}, methods=[{"method": "BitFit", "run": "r"}], name="aa")  # sorts first by name
    save_shootout(third, store)
    assert [p.name for p in shootouts(store)] == ["zz.json", "zz-2.json", "aa.json"]
    assert latest_shootout(store).methods == [{"method": "BitFit", "run": "r"}]
    save_shootout(first, store)  # saving the same result again updates its own file
    assert latest_shootout(store).name == "zz" and len(shootouts(store)) == 3


@pytest.mark.parametrize("preset", PROMPT_FAMILIES)
def test_memory_estimate_of_prompt_learning_uses_full_logits_and_no_passes(preset, tiny_llama_dir):
    from sftkit.core.plan import PROMPT_LEARNING

    a = inspect_model(sftkit.load_model(str(tiny_llama_dir)).model)
    plan = FreezePlan.preset(preset, a, top_n=1 if preset == "adaption_prompt" else None)
    plain = plan.memory_estimate(a, batch_size=8, seq_len=256)
    fast = plan.memory_estimate(a, batch_size=8, seq_len=256, trained_per_row=4, pass_tokens=64)
    if preset in PROMPT_LEARNING:  # their runs get neither the fast loss nor passes (recipes.choose_batching)
        assert fast == plain
    else:  # LLaMA-Adapter gets both, as LoRA does
        assert fast.activations < plain.activations


@pytest.mark.parametrize("preset", ["lora_attention", "ia3", "prefix_tuning", "p_tuning", "adaption_prompt", "bitfit"])
def test_prompt_init_is_refused_with_presets_that_would_drop_it(preset):
    with pytest.raises(RunConfigError, match=rf"adapter.prompt_init='Answer:' is not allowed; allowed: null with "
                                             rf"preset {preset}.*prompt_tuning"):
        RunConfig.from_dict({"adapter": {"preset": preset, "prompt_init": "Answer:"}})
    assert RunConfig.from_dict({"adapter": {"preset": "prompt_tuning", "prompt_init": "Answer:"}}).adapter.prompt_init


@pytest.mark.parametrize("make", [
    lambda M, B: M("x", {"preset": "ia3"}, True),
    lambda M, B: B(steps=True),
    lambda M, B: B(batch_size=True),
    lambda M, B: B(eval_items=True),
])
def test_shootout_method_and_budget_refuse_bools_as_numbers(make):
    from sftkit.engine.shootout import Budget, Method

    with pytest.raises(RunConfigError, match=r"=True is not allowed"):
        make(Method, Budget)


def test_prefix_tuning_count_uses_the_configs_head_dim(tiny_llama_dir, tmp_path):
    """Qwen3 / Gemma set head_dim apart from hidden / heads; peft sizes the prefix from it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, max_position_embeddings=512, vocab_size=len(tok))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "wide"))
    tok.save_pretrained(str(tmp_path / "wide"))
    model = sftkit.load_model(str(tmp_path / "wide")).model
    a = inspect_model(model)
    assert a.head_dim == 32 and a.attention_head_dim == 32 != a.hidden_size // a.n_heads
    plan = FreezePlan.preset("prefix_tuning", a, virtual_tokens=6)
    assert plan.trainable_params(a) == 6 * 2 * (2 * 32 * 2) == trainable(plan.apply(model, a))


def test_shootout_keeps_a_method_that_could_not_start_as_a_failed_row_and_saves_no_empty_table(tmp_path):
    from sftkit.engine.shootout import Budget, Shootout, compare_methods, latest_shootout, save_shootout

    store = tmp_path / "runs"
    earlier = Shootout(task="dates", budget={}, methods=[{"method": "LoRA", "run": "r1"}], name="earlier")
    save_shootout(earlier, store)
    lines = []
    result = compare_methods("dates", ["LoRA", "IA3"], Budget(steps=1, batch_size=4, rows=8, eval_items=2),
                             model=str(tmp_path / "no-model-here"), store=store, progress=lines.append)
    assert [r["method"] for r in result.methods] == ["LoRA", "IA3"]  # every method goes on after a failure
    for row in result.methods:
        assert row["run"] is None and row["state"].startswith("failed: ") and "no-model-here" in row["state"]
        assert row["trainable"] is None and row["score"] is None
    assert not result.complete and result.path is None and "IA3" in result.text()
    assert any("IA3 could not start" in line for line in lines)
    assert latest_shootout(store).name == "earlier"  # a table where nothing ran does not become the latest
    assert [p.name for p in (store / "shootouts").iterdir()] == ["earlier.json"]
    stale = Shootout(task="dates", budget={}, methods=[{"method": "LoRA", "run": None, "state": "failed"}], name="x")
    save_shootout(stale, store)
    assert latest_shootout(store).name == "earlier"


# ---- review fixes: export and merge outputs --------------------------------------------------------------
def test_an_export_never_replaces_a_merge_nor_a_merge_an_export_without_force(tiny_llama_dir, tmp_path):
    """Exports and merges share one marker file; each replaces only its own kind's earlier output."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftkit.core.runstore import RunStore
    from sftkit.engine.output import MERGE_MARKER, export_adapter, merge_and_save

    cfg = method_config(tiny_llama_dir, tmp_path / "runs", "lora")
    run = RunStore(cfg.store).new_run(cfg.name)
    cfg.save(run.config_path)  # a run folder with a real peft adapter (no training needed to check the outputs)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(run.adapter_dir))

    merged = merge_and_save(run, tmp_path / "merged")
    assert json.loads((merged / MERGE_MARKER).read_text())["kind"] == "merge"
    with pytest.raises(Exception, match=r"holds a merged model .*an export does not replace it"):
        export_adapter(run, merged)
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))  # the merged model is kept

    exported = export_adapter(run, tmp_path / "exported")
    assert json.loads((exported / MERGE_MARKER).read_text())["kind"] == "export"
    with pytest.raises(Exception, match="holds an exported adapter"):
        merge_and_save(run, exported)
    assert (exported / "adapter_config.json").is_file() and not (exported / "config.json").exists()
    assert export_adapter(run, exported) == exported  # its own kind: replaced
    assert merge_and_save(run, merged) == merged

    marker = json.loads((exported / MERGE_MARKER).read_text())  # a marker written before the kind was recorded
    del marker["kind"]
    (exported / MERGE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(Exception, match="holds an exported adapter"):
        merge_and_save(run, exported)
    export_adapter(run, exported)

    export_adapter(run, merged, force=True)  # force replaces it, as it replaces any folder
    assert (merged / "adapter_config.json").is_file() and not (merged / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no folder left aside


def test_holm_adjusts_the_p_values_against_the_best_and_the_table_says_so():
    from sftkit.engine.shootout import HOLM_NOTE, Shootout, holm
    from sftkit.ui.shootout_view import table_html

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002]) and holm([0.45, 0.4, 0.3]) == pytest.approx([0.9, 0.9, 0.9])
    assert holm([]) == [] and holm([0.02]) == [0.02]
    rows = [{"method": "LoRA", "trainable": 1, "trainable_percent": 0.1, "score": 0.9, "score_ci": [0.8, 1.0],
             "vs_best": "best"},
            {"method": "IA3", "trainable": 1, "trainable_percent": 0.1, "score": 0.5, "score_ci": [0.3, 0.7],
             "p_vs_best": 0.02, "p_vs_best_holm": 0.04, "vs_best": "LoRA is better"}]
    result = Shootout(task="dates", budget={}, methods=rows, best="LoRA")
    assert "Holm-adjusted" in HOLM_NOTE and HOLM_NOTE in result.text() and "Holm-adjusted" in table_html(result)
    assert "Holm" not in Shootout(task="dates", budget={}, methods=rows[:1], best="LoRA").text()


def test_notebook_07_states_the_trainable_counts_the_plans_compute(default_model_folder):
    """The counts the notebook's text quotes are the default model's, computed, not remembered."""
    import json
    from pathlib import Path

    from sftkit.engine.shootout import METHODS as SHOOTOUT

    notebook = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "07_peft_methods.ipynb").read_text())
    text = " ".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")
    a = inspect_model(sftkit.load_model("default").model)
    for name in ("LoRA", "DoRA", "IA3", "BitFit", "p-tuning", "freeze tuning"):
        n = FreezePlan.from_adapter(RunConfig.from_dict({"adapter": SHOOTOUT[name].adapter}).adapter, a).trainable_params(a)
        assert f"{n:,}" in text and f"{100 * n / a.total_params:.3f}%" in text, name
    assert "about 1.4%" not in text


def test_reopened_shootout_session_restores_its_methods_budget_and_model(tmp_path):
    from sftkit.engine.shootout import METHODS as SHOOTOUT
    from sftkit.engine.shootout import Budget, Method, Shootout, save_shootout
    from sftkit.state.shootout import ShootoutSession

    store = tmp_path / "runs"
    mine = Method("small LoRA", {"preset": "lora_attention", "rank": 2, "alpha": 4.0}, 2e-3)
    budget = Budget(steps=7, batch_size=2, rows=30, eval_items=5, seed=3)
    rows = [{"method": mine.name, "run": "r1", "adapter": mine.adapter, "learning_rate": mine.learning_rate},
            {"method": "IA3", "run": "r2"}]  # a row saved before the adapter was kept: a METHODS name
    save_shootout(Shootout(task="sorting", budget={**budget.__dict__, "seconds": 12.5}, methods=rows, name="s",
                           model="some/model"), store)
    session = ShootoutSession.reopen(store)
    assert session.task == "sorting" and session.budget == budget and session.model == "some/model"
    assert session.methods == [mine, SHOOTOUT["IA3"]]
    broken = [{"method": "odd", "run": "r3", "adapter": {"preset": "lora_attention", "rank": 0}, "learning_rate": 1e-3}]
    save_shootout(Shootout(task="dates", budget={"steps": True}, methods=broken, name="t"), store)
    session = ShootoutSession.reopen(store)  # a file's bad settings: shown, said, not reused
    assert session.result.name == "t" and session.methods is None and "can't be reused" in session.line
    assert "adapter.rank=0 is not allowed" in session.line


def test_shootout_runs_are_named_after_the_shootout_and_the_method():
    from sftkit.engine.shootout import METHODS as SHOOTOUT
    from sftkit.engine.shootout import Budget, Method, method_config

    assert method_config("dates", SHOOTOUT["prompt tuning"], Budget(), name="cmp1").name == "shootout-cmp1-prompt-tuning"
    assert method_config("dates", SHOOTOUT["LoRA"], Budget()).name == "shootout-LoRA"
    long = method_config("dates", SHOOTOUT["LLaMA-Adapter"], Budget(), name="x" * 100).name
    assert len(long) <= 64 and long.startswith("shootout-xxx") and long.endswith("-LLaMA-Adapter")
    odd = Method("a/b c", {"preset": "ia3"}, 1e-3)
    assert method_config("dates", odd, Budget(), name="n").name == "shootout-n-a-b-c"


def test_the_default_shootout_is_the_seven_and_the_variants_come_by_name(tmp_path):
    """compare_methods trains the seven default methods when not told; rsLoRA, p-tuning and freeze tuning
    are named methods with configs the run engine accepts, each with its own knob set."""
    from sftkit.engine.shootout import DEFAULT_METHODS, METHODS, Budget, _resolve_methods, method_config

    assert [m.name for m in _resolve_methods(None)] == list(DEFAULT_METHODS)
    assert set(DEFAULT_METHODS) < set(METHODS) and sftkit.DEFAULT_PEFT_METHODS == DEFAULT_METHODS
    extras = _resolve_methods(["rsLoRA", "p-tuning", "freeze tuning"])
    cfgs = [method_config("dates", m, Budget(steps=2), store=tmp_path) for m in extras]
    assert cfgs[0].adapter.rslora is True and cfgs[0].adapter.preset == "lora_attention"
    assert cfgs[1].adapter.preset == "p_tuning" and cfgs[1].adapter.virtual_tokens == 20
    assert cfgs[2].adapter.preset == "freeze_tuning" and cfgs[2].adapter.top_n == 2
    assert [c.training.learning_rate for c in cfgs] == [1e-3, 1e-2, 1e-4]

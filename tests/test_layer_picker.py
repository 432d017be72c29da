"""LayerPicker headless: click cells and presets, check the plan and the counters."""

import re

import pytest

import sftkit
from sftkit.engine.freeze import FreezePlan
from sftkit.ui import LayerPicker


@pytest.fixture()
def picker(tiny_llama_dir):
    model = sftkit.load_model(str(tiny_llama_dir)).model
    return LayerPicker(model, device_bytes=8 * 2**30, batch_size=4, seq_len=64)


def counter_params(p) -> int:
    return int(re.search(r"<b>([\d,]+)</b> trainable", p.counters.value).group(1).replace(",", ""))


def test_starts_with_lora_on_attention_and_counts_match(picker):
    a = picker.anatomy
    assert picker.plan.lora_modules == FreezePlan.preset("lora_attention", a).lora_modules
    assert counter_params(picker) == picker.plan.trainable_params(a)
    assert picker.cell_state(0, "self_attn.q_proj") == "lora" and picker.cell_state(0, "mlp.up_proj") == "off"
    assert picker.cells[(0, "self_attn.q_proj")].description.startswith("L ")


def test_clicking_cells_toggles_lora_and_full(picker):
    a = picker.anatomy
    before = counter_params(picker)
    picker.cells[(1, "mlp.down_proj")].click()
    assert a.module_name(1, "mlp.down_proj") in picker.plan.lora_modules
    assert counter_params(picker) == before + 16 * (128 + 64)
    picker.cells[(1, "mlp.down_proj")].click()  # back to frozen
    assert counter_params(picker) == before
    picker.click_sets.value = "full"
    picker.cells[(0, "input_layernorm")].click()  # norms train in full
    assert picker.cell_state(0, "input_layernorm") == "full"
    assert picker.plan.trainable_params(a) == counter_params(picker) == before + 64
    assert picker.cells[(0, "input_layernorm")].style.button_color == "#fdba74"


def test_presets_top_n_and_settings(picker):
    a = picker.anatomy
    picker.preset.value = "freeze_tuning"
    picker.top_n.value = 1
    picker.apply_preset_button.click()
    assert picker.plan.method == "full" and picker.plan.blocks(a) == [1]
    assert all(picker.cell_state(1, c) == "full" for c in a.linear_columns)
    assert all(picker.cell_state(0, c) == "off" for c in a.linear_columns)
    picker.preset.value = "lora_all_linear"
    picker.top_n.value = 2
    picker.apply_preset_button.click()
    n16 = counter_params(picker)
    picker.rank.value = 8
    assert counter_params(picker) * 2 == n16 and picker.plan.rank == 8
    picker.embeddings.value = True
    assert any(a.params[n].kind == "embedding" for n in picker.plan.train_params)
    assert counter_params(picker) == picker.plan.trainable_params(a)


def test_memory_counter_and_the_wont_fit_warning(tiny_llama_dir):
    model = sftkit.load_model(str(tiny_llama_dir)).model
    p = LayerPicker(model, device_bytes=128 * 2**20, batch_size=4, seq_len=64)  # runs use passes of 512 tokens
    assert "MiB" in p.counters.value and not p.messages.value
    small = p.estimate.total
    p.batch_size.value = 256
    p.seq_len.value = 2048
    assert p.estimate.total > small and "won't fit" in p.messages.value
    p.checkpointing.value = True
    assert p.estimate.activations < p.estimate.total


def test_nothing_trainable_is_shown_as_an_error(picker):
    a = picker.anatomy
    for b in range(a.n_blocks):
        for c in a.attention_columns:
            picker.cells[(b, c)].click()
    assert picker.error and "nothing is trainable" in picker.error
    assert "sftkit-error" in picker.messages.value


def test_controls_follow_the_editor(picker):
    """The widgets are bound to picker.editor both ways: a change made on the editor redraws."""
    a = picker.anatomy
    picker.editor.set_plan(FreezePlan.preset("freeze_tuning", a, top_n=1, rank=8))
    assert picker.rank.value == 8 and picker.preset.value == "freeze_tuning" and picker.top_n.value == 1
    assert picker.cells[(1, "mlp.up_proj")].style.button_color == "#fdba74"
    picker.editor.set_budget(batch_size=2)
    assert picker.batch_size.value == 2 and "batch 2 x 64" in picker.counters.value
    picker.head.value = True
    assert picker.editor.groups["head"] and FreezePlan.head(a).train_params <= picker.plan.train_params
    assert picker.editor.adapter_config().head is False and picker.editor.adapter_config().add_train

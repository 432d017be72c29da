"""The fast training step computes the standard loss and gradient: packed attention per row, the head
and the loss at trained positions only, batches run as passes of whole rows, packing chosen from the
rows (tiny random Llama with grouped-query attention, the default model's tokenizer)."""

import json
import random

import pytest
import torch

from sftkit.core.teaching import teaching_task
from sftkit.engine import fast

from helpers import losses, tiny_config


def _rows(n=6, seed=0):
    """Intent rows whose messages repeat 1 to 6 times: lengths that vary several-fold."""
    rng = random.Random(seed)
    return [{"message": " ".join([r["message"]] * rng.randint(1, 6)), "label": r["label"]}
            for r in teaching_task("intent").rows(n, seed=seed)]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    import dataclasses

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.engine.train import build_examples

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))  # non-zero B: LoRA really acts
    template = dataclasses.replace(teaching_task("intent").template, max_length=512)
    examples = build_examples(template, _rows(), tok)
    assert len({len(e["input_ids"]) for e in examples}) > 3
    return model, tok, examples


def _batches(tok, examples):
    from sftkit.engine.train import build_collator

    return build_collator(tok, False)(examples), build_collator(tok, True)(examples)


def _loss_and_grad(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return float(loss.detach()), grad.clone()


def _close(g, ref, rel=1e-5):
    return float((g - ref).norm() / ref.norm()) < rel


def test_packed_attention_keeps_rows_apart_and_equals_each_row_alone(tiny):
    model, tok, examples = tiny
    _, packed = _batches(tok, examples)
    base = model.get_base_model()
    with torch.no_grad():
        block_mask = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        assert fast.use_packed_attention(model)  # its probe saw every layer run per row
        try:
            assert base.config._attn_implementation == fast.PACKED_ATTENTION
            before = dict(fast.PACKED_CALLS)
            per_row = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
            layers = base.config.num_hidden_layers
            assert fast.PACKED_CALLS["per_row"] == before["per_row"] + layers  # the per-row branch ran, in every layer
            assert fast.PACKED_CALLS["standard"] == before["standard"]
        finally:
            fast.restore_attention(model)
        assert base.config._attn_implementation == "sdpa"
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(per_row[start:start + n], alone, atol=1e-5)
            start += n
    assert torch.allclose(per_row, block_mask, atol=1e-5)  # what sdpa computes under its block mask


def test_the_loss_at_trained_positions_equals_the_models_own_loss_and_gradient(tiny):
    model, tok, examples = tiny
    padded, packed = _batches(tok, examples)
    items = int((padded["labels"][:, 1:] != -100).sum())
    ref_loss, ref_grad = _loss_and_grad(model, lambda: model(**padded).loss)
    for batch in (padded, packed):
        loss, grad = _loss_and_grad(model, lambda: fast.trained_positions_loss(model, batch))
        assert loss == pytest.approx(ref_loss, rel=1e-5) and _close(grad, ref_grad)
        # normalised by the count the Trainer passes (the whole accumulated batch's trained tokens)
        loss, _ = _loss_and_grad(model, lambda: fast.trained_positions_loss(model, batch, torch.tensor(2 * items)))
        assert loss == pytest.approx(ref_loss / 2, rel=1e-5)
    # packed, with the per-row attention: the same loss and gradient as the padded batch
    fast.use_packed_attention(model)
    try:
        loss, grad = _loss_and_grad(model, lambda: fast.trained_positions_loss(model, packed))
        std_loss, std_grad = _loss_and_grad(model, lambda: model(**packed).loss)
    finally:
        fast.restore_attention(model)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and _close(grad, ref_grad)
    assert std_loss == pytest.approx(ref_loss, rel=1e-5) and _close(std_grad, ref_grad)
    keep = fast.trained_positions(padded["labels"])
    assert int(keep.sum()) == items and keep.sum() < padded["attention_mask"].sum() / 3  # the head's work saved


@pytest.mark.parametrize("packed", [False, True])
def test_passes_of_whole_rows_give_the_whole_batch_gradient(tiny, packed):
    model, tok, examples = tiny
    batch = _batches(tok, examples)[packed]
    lengths = [len(e["input_ids"]) for e in examples]
    budget = max(lengths) + 5
    parts = fast.split_batch(batch, budget)
    assert len(parts) > 1
    real = [int(p["attention_mask"].sum()) if "attention_mask" in p else p["input_ids"].shape[1] for p in parts]
    assert sum(real) == sum(lengths)
    # no pass holds more than the budget, padding included
    assert all(p["input_ids"].numel() <= budget for p in parts), [p["input_ids"].shape for p in parts]
    if not packed:  # each group is cut to its own longest row
        assert all(p["input_ids"].shape[1] == int(p["attention_mask"].sum(1).max()) for p in parts)
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    ref_loss, ref_grad = _loss_and_grad(model, lambda: fast.trained_positions_loss(model, batch, items))
    model.zero_grad()
    total = 0.0
    for part in parts:
        loss = fast.trained_positions_loss(model, part, items)
        loss.backward()
        total += float(loss)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert total == pytest.approx(ref_loss, rel=1e-5) and _close(grad, ref_grad)
    assert fast.split_batch(batch, None) == [batch] and fast.split_batch(batch, 10**6) == [batch]
    one_row = fast.split_batch(batch, 1)  # a row longer than the budget is a pass of its own
    assert len(one_row) == len(examples)


def test_padding_share_and_the_packing_choice_by_hand():
    assert fast.padding_share([10, 10, 10], 2) == 0.0
    assert fast.padding_share([10, 30], 2) == pytest.approx(1 - 40 / 60)  # every draw is {10, 30}
    assert fast.padding_share([10, 30], 1) == 0.0  # one row per batch: nothing to pad
    on, share, why = fast.choose_packing("auto", [10, 30], 2)
    assert on and "33% padding" in why and "auto" in why
    off, share, why = fast.choose_packing("auto", [30, 31, 32], 3)
    assert not off and share < fast.AUTO_PACKING_THRESHOLD and "only" in why
    assert fast.choose_packing(True, [30, 30], 2)[0] and not fast.choose_packing(False, [10, 30], 2)[0]


def _mixed_source(folder, n=40):
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed=3)))
    return str(path)


def test_a_packed_run_trains_the_same_loss_as_a_padded_one_and_says_what_it_chose(tiny_llama_dir, tmp_path, cache):
    """Same rows, seed and batches: packing (auto, chosen for these mixed lengths) with the per-row
    attention, the trained-positions loss and passes gives the padded run's losses."""
    from sftkit.core.runconfig import RunConfig
    from sftkit.engine.train import run_training

    source = _mixed_source(tmp_path)
    runs = {}
    for packing, passes in (("off", None), ("auto", 200)):
        cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=3, eval_every=0, sample_every=0,
                          checkpoint_every=100, packing=packing, max_pass_tokens=passes, batch_size=6)
        cfg = RunConfig.from_dict({**cfg.to_dict(), "name": f"packing-{packing}",
                                   "data": {**cfg.to_dict()["data"], "source": source, "rows": None},
                                   "template": {**teaching_task("intent").template.to_dict(), "max_length": 512}})
        result = run_training(cfg)
        assert result.state == "finished", result.message
        runs[packing] = result.run
    events = {k: next(e for e in r.events() if e["event"] == "batching") for k, r in runs.items()}
    assert events["auto"]["packing"] is True and events["auto"]["padding_share"] > fast.AUTO_PACKING_THRESHOLD
    assert "packing: on (auto)" in events["auto"]["message"] and events["auto"]["packed_attention"] is True
    assert events["off"]["packing"] is False and events["auto"]["fast_loss"] is True
    assert events["auto"]["max_pass_tokens"] == 200
    off, auto = losses(runs["off"]), losses(runs["auto"])
    assert sorted(off) == sorted(auto) == [1, 2, 3]
    for step in off:
        assert auto[step] == pytest.approx(off[step], rel=1e-4), (step, auto, off)


def test_uniform_rows_are_not_packed(tiny_llama_dir, tmp_path, cache):
    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=1, eval_every=0, sample_every=0,
                      checkpoint_every=100)
    result = run_training(cfg)
    assert result.state == "finished", result.message
    event = next(e for e in result.run.events() if e["event"] == "batching")
    assert event["packing"] is False and "packing: off (auto)" in event["message"]
    assert event["padding_share"] < fast.AUTO_PACKING_THRESHOLD


def test_one_long_row_among_short_ones_never_makes_an_oversized_padded_pass():
    ids = torch.zeros(16, 200, dtype=torch.long)
    mask = torch.zeros(16, 200, dtype=torch.long)
    mask[0, :200] = 1
    mask[1:, :10] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.full((16, 200), -100)}
    parts = fast.split_batch(batch, 256)
    assert all(p["input_ids"].numel() <= 256 or p["input_ids"].shape[0] == 1 for p in parts)
    assert sum(p["input_ids"].shape[0] for p in parts) == 16


def test_left_padded_passes_keep_their_positions():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": mask, "labels": torch.zeros(3, 4).long()}
    parts = fast.split_batch(batch, 4)
    for part in parts:
        m, pos = part["attention_mask"], part["position_ids"]
        assert (pos[m.bool()] == (m.cumsum(1) - 1)[m.bool()]).all()  # 0, 1, ... from each row's first real token


def test_settings_the_per_row_attention_lacks_leave_a_model_on_sdpa(tiny_llama_dir, tmp_path):
    """A sliding window (Mistral) is not what the per-row branch computes: the probe keeps sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64, sliding_window=4,
                               max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    assert fast.use_packed_attention(model) is False
    assert model.config._attn_implementation == "sdpa"


def test_the_run_engine_step_equals_the_stock_trainer_step(tiny, tmp_path):
    """GuardedTrainer with the trained-positions loss, packed rows and passes against stock
    transformers.Trainer with padded batches and the model's own loss: the same gradient at the first
    optimizer step, with gradient accumulation and answers of very different lengths."""
    import copy

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sftkit.engine.train import GuardedTrainer, build_collator, build_examples

    model, tok, _ = tiny
    import dataclasses

    template = dataclasses.replace(teaching_task("intent").template, max_length=512)
    rows = [{**r, "label": " ".join(["word"] * (1 + 7 * i))} for i, r in enumerate(_rows(12, seed=5))]
    data = build_examples(template, rows, tok)
    grads = {}

    class Grab(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.key not in grads:
                grads[self.key] = torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.requires_grad])

    def args(name):
        return TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=3,
                                 gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0, report_to="none",
                                 use_cpu=True, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                                 remove_unused_columns=False, logging_steps=1)

    stock = Trainer(model=copy.deepcopy(model), args=args("stock"), train_dataset=data,
                    data_collator=build_collator(tok, False), callbacks=[Grab("stock")])
    stock.train()
    ours_model = copy.deepcopy(model)
    assert fast.use_packed_attention(ours_model)
    ours = GuardedTrainer(model=ours_model, args=args("ours"), train_dataset=data,
                          data_collator=build_collator(tok, True), callbacks=[Grab("ours")])
    ours.fast_loss, ours.max_pass_tokens = True, 120
    ours.train()
    assert _close(grads["ours"], grads["stock"], rel=1e-5)
    stock_loss = [h["loss"] for h in stock.state.log_history if "loss" in h]
    ours_loss = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert ours_loss == pytest.approx(stock_loss, rel=1e-5)

"""The run engine on real models: training, resume, Stop, kill -9, NaN, refusal, reattach,
accelerate with two processes, merge. Runs go through the same process entry point the
notebook and the command line use."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftkit.core.examples import example_config
from sftkit.core.runconfig import RunConfig
from sftkit.core.runstore import DeviceBusyError, RunFolder, RunStore
from sftkit.core.template import TemplateError

from helpers import losses, tiny_config, wait_for

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_in_process_writes_the_whole_folder(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs")
    result = run_training(cfg)
    run = result.run
    assert result.state == "finished", run.read_status()
    assert (run.path / "config.yaml").is_file() and RunConfig.load(run.config_path).training == cfg.training
    metrics = run.metrics()
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 9))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "memory_rss"} <= set(m) for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8]
    assert [s["step"] for s in run.samples()] == [4, 8]
    kinds = [e["event"] for e in run.events()]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "checkpoint" in kinds
    assert [s for s, _ in run.checkpoints()] == [6, 8]  # keep_checkpoints=2
    # plain peft loads the adapter
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    assert RunStore(tmp_path / "runs").table()[0]["state"] == "finished"


def test_packed_batches_match_separate_rows(tiny_llama_dir):
    """Packing puts rows into one sequence; position ids keep them apart (no cross-row attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.core.teaching import teaching_task
    from sftkit.engine.train import build_collator, build_examples

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation="sdpa")
    model.config.use_cache = False
    task = teaching_task("dates")
    examples = build_examples(task.template, task.rows(3), tok)
    packed = build_collator(tok, packing=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(together[start:start + n], alone, atol=1e-4)
            start += n


def test_example_run_learns_and_resume_repeats_it(default_model_folder, tmp_path, cache):
    """The example config on the default model, run for a dozen steps: loss goes down, the
    adapter changes the answers, and resuming from the step-8 checkpoint gives the same
    losses as the uninterrupted run."""
    from peft import PeftModel

    from sftkit.core.rundata import run_rows
    from sftkit.core.teaching import teaching_task
    from sftkit.engine.generate import answer_rows
    from sftkit.engine.models import load_model
    from sftkit.engine.train import run_training

    cfg = example_config().with_changes(store=str(tmp_path / "runs"), training={
        "max_steps": 12, "eval_every": 4, "checkpoint_every": 4, "sample_every": 4})
    full = run_training(cfg).run
    assert full.state() == "finished", full.read_status()
    loss = losses(full)
    assert sorted(loss) == list(range(1, 13))
    assert sum(loss[s] for s in range(9, 13)) / 4 < loss[1] / 4, loss

    # resume: a copy of the run cut back to its step-8 checkpoint, continued in this process
    cut = RunFolder(tmp_path / "runs" / "cut")
    shutil.copytree(full.path, cut.path)
    shutil.rmtree(cut.checkpoints_dir / "checkpoint-12")
    shutil.rmtree(cut.adapter_dir)
    assert cut.state() == "finished"  # an ended run (the copy's status names no live writer of its own)
    assert cut.last_checkpoint().name == "checkpoint-8"
    result = run_training(cut.config(), cut, resume=True)
    assert result.state == "finished", cut.read_status()
    again = losses(cut)
    assert sorted(again) == list(range(1, 13))
    for step in range(9, 13):
        assert again[step] == pytest.approx(loss[step], rel=1e-3, abs=1e-5), (step, again[step], loss[step])
    assert any(e["event"] == "resumed" and e["step"] == 8 for e in cut.events())

    # plain peft reload changes the answers on held-out rows
    rows = run_rows(cfg)
    held = rows.eval[:12]
    model, tok = load_model("default")
    before = answer_rows(model, tok, rows.template, held, few_shot=False, max_new_tokens=16)
    tuned = PeftModel.from_pretrained(model, str(full.adapter_dir))
    after = answer_rows(tuned, tok, rows.template, held, few_shot=False, max_new_tokens=16)
    task = teaching_task("dates")
    score_before = sum(task.score(p, r) for p, r in zip(before, held))
    score_after = sum(task.score(p, r) for p, r in zip(after, held))
    assert before != after
    assert score_after > score_before and score_after >= len(held) * 0.75, (before, after)


def test_stop_refusal_and_reattach(tiny_llama_dir, tmp_path, cache):
    from sftkit.engine.launch import attach, launch

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=0, sample_every=0,
                      checkpoint_every=1000, packing=True)
    handle = launch(cfg)
    wait_for(lambda: len(losses(handle.run)) >= 3, what="three logged steps")
    # a second run on the same device is refused with the running run's name
    with pytest.raises(DeviceBusyError, match=f"already training on cpu: .*{handle.run.name}"):
        launch(cfg.with_changes(name="second"))
    assert [r.name for r in RunStore(tmp_path / "runs").runs()] == [handle.run.name]
    # a fresh view (as after a kernel restart) reads the run so far, then only what is new
    view = attach(handle.run.path)
    first = view.poll()
    assert first.state == "running" and len(first.metrics) >= 3
    wait_for(lambda: view.poll().metrics, what="new metrics for the reattached view")
    handle.stop()
    assert handle.wait(120) == "stopped", handle.run.read_status()
    status = handle.run.read_status()
    assert status["message"].startswith("stopped at step") and handle.run.has_adapter()
    assert len(losses(handle.run)) >= 3 and view.poll().state == "stopped"


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_finishes(tiny_llama_dir, tmp_path, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.engine.launch import launch, resume

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=0, sample_every=0)
    handle = launch(cfg)
    wait_for(lambda: len(handle.run.checkpoints()) >= 2, what="two checkpoints")
    handle.kill()
    assert handle.run.state() == "interrupted"
    last = handle.run.last_checkpoint()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(last))
    assert all(math.isfinite(p.abs().sum().item()) for n, p in model.named_parameters() if "lora_" in n)
    step = int(last.name.split("-")[1])
    again = resume(handle.run, max_steps=step + 2)
    assert again.wait(120) == "finished", handle.run.read_status()
    assert max(losses(handle.run)) == step + 2 and handle.run.has_adapter()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_llama_dir, tmp_path, cache):
    from sftkit.engine.launch import launch

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=20, eval_every=0, sample_every=0)
    handle = launch(cfg, env={"SFTKIT_FAULT_NAN_AT_STEP": "5"})
    assert handle.wait(120) == "failed"
    status = handle.run.read_status()
    assert "non-finite (NaN or inf) at step 5" in status["message"], status
    assert "checkpoints/checkpoint-4" in status["message"], status
    assert handle.run.last_checkpoint().name == "checkpoint-4"
    assert not handle.run.has_adapter()
    assert max(losses(handle.run)) == 5 and math.isnan(losses(handle.run)[5])


def test_template_and_data_errors_come_before_any_process(tiny_llama_dir, tmp_path, cache):
    from sftkit.core.data import DataError
    from sftkit.engine.launch import launch

    bad = tiny_config(tiny_llama_dir, tmp_path / "runs").with_changes(
        template={"user_pattern": "{txt}", "answer_field": "iso"})
    with pytest.raises(TemplateError, match=r"\{txt\}.*columns: text, iso"):
        launch(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "iso": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match="line 2"):
        launch(bad.with_changes(data={"source": str(rows)}, template={"user_pattern": "{text}", "answer_field": "iso"}))
    assert not (tmp_path / "runs").exists() or RunStore(tmp_path / "runs").runs() == []


def test_out_of_memory_message_names_the_knobs():
    import torch

    from sftkit.engine.train import _failure_message

    msg = _failure_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    for knob in ("training.batch_size", "training.max_length", "training.gradient_checkpointing", "4bit"):
        assert knob in msg


def test_accelerate_two_cpu_processes(tiny_llama_dir, tmp_path, cache):
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=4, eval_every=2, sample_every=0)
    path = cfg.save(tmp_path / "run.yaml")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "sftkit", "train", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = RunStore(tmp_path / "runs").runs()
    assert len(runs) == 1, runs  # both processes wrote one run folder
    run = runs[0]
    status = run.read_status()
    assert status["state"] == "finished" and status["world_size"] == 2
    assert sorted(losses(run)) == [1, 2, 3, 4] and run.has_adapter()


def test_cli_train_runs_and_merge(tiny_llama_dir, tmp_path, cache):
    import torch
    from transformers import AutoModelForCausalLM

    from sftkit.engine.output import load_trained

    cfg = tiny_config(tiny_llama_dir, "runs", max_steps=2, eval_every=0, sample_every=0)
    cfg.save(tmp_path / "run.yaml")
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "sftkit", "train", "run.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "finished" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    listing = subprocess.run([sys.executable, "-m", "sftkit", "runs", "--store", "runs"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert "tiny" in listing.stdout and "finished" in listing.stdout and "2/2" in listing.stdout
    run = RunStore(tmp_path / "runs").latest()
    merged_dir = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "-m", "sftkit", "merge", str(run.path), str(merged_dir)],
                           capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-2000:]
    assert list(merged_dir.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    tuned, _ = load_trained(run)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "sftkit", "train", "nothing.yaml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nothing.yaml does not exist" in bad.stderr


def test_plan_round_trips_through_the_adapter_section(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from sftkit.engine.anatomy import inspect_model
    from sftkit.engine.freeze import FreezePlan, PlanError
    from sftkit.engine.train import adapter_config_from_plan, build_plan

    anatomy = inspect_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)))
    base = FreezePlan.preset("lora_attention", anatomy, rank=8)
    edited = (base - FreezePlan(lora_modules={"model.layers.0.self_attn.q_proj"})) | FreezePlan(
        lora_modules={"model.layers.1.mlp.up_proj"}, train_params={"model.norm.weight"})
    for plan in (base, FreezePlan.preset("freeze_tuning", anatomy, top_n=1), edited.with_settings(label="mine")):
        section = adapter_config_from_plan(plan, anatomy)
        cfg = RunConfig(adapter=section.__dict__)
        assert RunConfig.from_yaml(cfg.to_yaml()).adapter == section
        again = build_plan(cfg.adapter, anatomy)
        assert (again.lora_modules, again.train_params, again.rank) == (plan.lora_modules, plan.train_params, plan.rank)
    section = adapter_config_from_plan(edited, anatomy)
    assert section.preset == "lora_attention" and section.remove_lora == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(PlanError, match=r"adapter.add_lora: model.layers.9.mlp.up_proj not in this model"):
        build_plan(RunConfig(adapter={"add_lora": ["model.layers.9.mlp.up_proj"]}).adapter, anatomy)


def test_4bit_run_on_cpu_trains_the_same_with_eval_and_samples_in_between(tiny_llama_dir, tmp_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference the first time it
    runs in eval mode without grad, and backward through it is gone from then on. Eval and samples
    inside a run must not change training: the losses match a run without them."""
    from sftkit.engine.train import run_training

    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=6, eval_every=0, sample_every=0,
                      checkpoint_every=100).with_changes(model={"quantization": "4bit"})
    plain = run_training(cfg.with_changes(name="plain")).run
    watched = run_training(cfg.with_changes(name="watched", training={"eval_every": 2, "sample_every": 2})).run
    assert plain.state() == watched.state() == "finished", (plain.read_status(), watched.read_status())
    assert "4bit" in watched.read_status()["plan"] and [s["step"] for s in watched.samples()][:2] == [2, 4]
    a, b = losses(plain), losses(watched)
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)


def test_a_run_process_that_cannot_start_ends_as_failed_with_its_log(tiny_llama_dir, tmp_path, cache):
    from sftkit.engine.launch import launch

    handle = launch(tiny_config(tiny_llama_dir, tmp_path / "runs"), env={"PYTHONHOME": str(tmp_path / "nowhere")})
    assert handle.wait(60) == "failed"  # the handle records why its own process ended
    message = handle.run.read_status()["message"]
    assert "exited (code" in message and "run.log" in message
    assert handle.poll().state == "failed"


def test_model_errors_come_before_the_process_or_end_the_run_with_the_message(tmp_path, cache):
    from sftkit.core.errors import ModelNotFoundError
    from sftkit.engine.launch import launch
    from sftkit.engine.train import run_training

    cfg = tiny_config(tmp_path / "no-such-model", tmp_path / "runs")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        launch(cfg)  # the launcher loads the tokenizer to render the rows: no folder, no process
    assert not (tmp_path / "runs").exists() or RunStore(tmp_path / "runs").runs() == []
    with pytest.raises(ModelNotFoundError):  # the same error inside a run process ends the run with it
        run_training(cfg)
    run = RunStore(tmp_path / "runs").latest()
    assert run.state() == "failed" and "no-such-model" in run.read_status()["message"]
    assert [e["event"] for e in run.events()] == ["failed"]


def test_stop_while_the_model_loads_is_kept(tiny_llama_dir, tmp_path, cache):
    from sftkit.engine.launch import launch

    handle = launch(tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=100000, eval_every=0, sample_every=0))
    handle.stop()  # before the process has even imported torch
    assert handle.wait(120) == "stopped", handle.run.read_status()
    assert max(losses(handle.run)) <= 2 and handle.run.has_adapter()


def test_early_stopping_ends_the_run_and_keeps_the_best_adapter(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from sftkit.engine.train import run_training

    # a threshold no eval can beat: the second evaluation triggers the stop
    cfg = tiny_config(tiny_llama_dir, tmp_path / "runs", max_steps=40, eval_every=2, checkpoint_every=2,
                      sample_every=0, early_stopping_patience=1, early_stopping_threshold=100.0)
    result = run_training(cfg)
    run = result.run
    assert result.state == "finished", run.read_status()
    message = run.read_status()["message"]
    assert message.startswith("early stopping at step 4 of 40") and "the adapter is the best checkpoint" in message
    assert max(losses(run)) == 4
    evals = {m["step"]: m["eval_loss"] for m in run.metrics() if "eval_loss" in m}
    best_step = min(evals, key=evals.get)
    assert f"(checkpoint-{best_step}," in message
    best = load_file(str(run.checkpoints_dir / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    saved = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    assert all((best[k] == saved[k]).all() for k in best)

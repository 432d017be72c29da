"""RunConfig YAML round trips and validation; the run store's files. Pure Python, no models."""

import json
import socket
import subprocess
import sys

import pytest

from sftkit.core.examples import example_config, example_config_yaml
from sftkit.core.runconfig import PRESETS, RunConfig, RunConfigError, config_diff
from sftkit.core.runproto import ProcessId
from sftkit.core.runstore import DeviceBusyError, DeviceLock, RunFolder, RunStore, RunWriter, read_jsonl
from sftkit.core.template import Template


def every_config():
    yield RunConfig()
    yield example_config()
    yield RunConfig(name="mine", data={"source": "/data/rows.csv", "rows": None},
                    template=Template(user_pattern="Q: {q}", answer_field="a", system="Be brief.",
                                      examples=[{"q": "2+2", "a": "4"}], assistant_prefix="A:", train_on="all",
                                      max_length=64))
    for preset in PRESETS:
        top = 2 if preset in ("lora_top_blocks", "freeze_tuning") else None
        yield RunConfig(adapter={"preset": preset, "top_n": top, "add_lora": ["model.layers.0.mlp.up_proj"],
                                 "remove_train": ["model.norm.weight"], "embeddings": True})
    yield RunConfig(model={"quantization": "4bit", "device": "cuda", "dtype": "bfloat16",
                           "attn_implementation": "eager"},
                    training={"max_steps": 7, "eval_every": 5, "early_stopping_patience": 2, "checkpoint_every": 10,
                              "packing": True, "gradient_checkpointing": True, "warmup": 3, "lr_schedule": "linear"})


@pytest.mark.parametrize("cfg", list(every_config()), ids=lambda c: f"{c.name}-{c.adapter.preset}-{c.model.quantization}")
def test_yaml_round_trip(cfg, tmp_path):
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    path = cfg.save(tmp_path / "run.yaml")
    loaded = RunConfig.load(path)
    # loading from a file makes relative paths absolute against the file's folder, nothing else changes
    assert loaded.store == str(tmp_path / "runs")
    assert [d for d in config_diff(cfg, loaded) if d[0] not in ("store", "data.source")] == []


def test_example_config_is_commented_and_parses():
    text = example_config_yaml()
    assert text.count("\n  # ") >= 30  # a comment above every field
    assert RunConfig.from_yaml(text) == example_config()
    assert example_config().model.spec == "default" and example_config().data.source == "teaching:dates"


@pytest.mark.parametrize("section,values,names", [
    ("training", {"batch_size": 0}, ["training.batch_size=0", "1 to 4096"]),
    ("training", {"learning_rate": -1}, ["training.learning_rate", "(0, 1]"]),
    ("training", {"lr_schedule": "wavy"}, ["training.lr_schedule", "cosine"]),
    ("training", {"warmup": 2.5}, ["training.warmup", "fraction"]),
    ("training", {"early_stopping_patience": 2}, ["training.eval_every", "early stopping"]),
    ("training", {"early_stopping_patience": 2, "eval_every": 3, "checkpoint_every": 10},
     ["training.checkpoint_every", "multiple of training.eval_every=3"]),
    ("training", {"packing": "yes"}, ["training.packing", "auto, on, off"]),
    ("training", {"max_pass_tokens": 8}, ["training.max_pass_tokens", "an integer >= 16"]),
    ("training", {"epochs": float("nan")}, ["training.epochs"]),
    ("model", {"quantization": "3bit"}, ["model.quantization", "4bit"]),
    ("model", {"device": "tpu"}, ["model.device", "cuda"]),
    ("data", {"eval_fraction": 1.5}, ["data.eval_fraction", "[0, 1)"]),
    ("data", {"sample_prompts": 99}, ["data.sample_prompts", "0 to 8"]),
    ("adapter", {"preset": "everything"}, ["adapter.preset", "lora_attention"]),
    ("adapter", {"preset": "freeze_tuning"}, ["adapter.top_n", "needs it"]),
    ("adapter", {"rank": 0}, ["adapter.rank", "1 to 1024"]),
    ("adapter", {"add_lora": "q_proj"}, ["adapter.add_lora", "list"]),
])
def test_bad_values_name_field_and_range(section, values, names):
    with pytest.raises(RunConfigError) as err:
        RunConfig.from_dict({section: values})
    for n in names:
        assert n in str(err.value)


def test_unknown_fields_are_named():
    with pytest.raises(RunConfigError, match=r"training\.batchsize.*batch_size"):
        RunConfig.from_yaml("training:\n  batchsize: 4\n")
    with pytest.raises(RunConfigError, match=r"unknown field\(s\) optimiser"):
        RunConfig.from_yaml("optimiser: adam\n")
    with pytest.raises(RunConfigError, match=r"template\.pattern"):
        RunConfig.from_yaml("template:\n  pattern: x\n")
    with pytest.raises(RunConfigError, match="template is null"):
        RunConfig.from_yaml("data:\n  source: rows.jsonl\n")
    with pytest.raises(RunConfigError, match="not valid YAML"):
        RunConfig.from_yaml("training: [\n")


def test_config_diff_names_dotted_fields():
    a = example_config()
    b = a.with_changes(training={"learning_rate": 5e-4}, adapter={"rank": 8}, name="other")
    assert config_diff(a, b) == [("name", "dates-lora", "other"), ("adapter.rank", 16, 8),
                                 ("training.learning_rate", 1e-3, 5e-4)]


def test_run_store_folders_and_torn_lines(tmp_path):
    store = RunStore(tmp_path / "runs")
    a, b = store.new_run("x y"), store.new_run("x y")
    assert a.name != b.name and a.name.endswith("-x-y")
    example_config().save(a.config_path)
    assert store.runs() == [a]  # b has no config yet: not a run
    writer = RunWriter(a)
    writer.metric({"step": 1, "loss": 2.0})
    with open(a.metrics_path, "a") as fh:
        fh.write('{"step": 2, "lo')  # a write cut short by a kill
    rows, offset = read_jsonl(a.metrics_path)
    assert rows == [{"schema": 1, "step": 1, "loss": 2.0}] and offset == len(a.metrics_path.read_bytes()) - 15
    assert a.metrics() == [{"step": 1, "loss": 2.0}]
    # a process that died while running reads as interrupted
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = RunWriter(a, process=ProcessId(int(dead.stdout), None, socket.gethostname()))
    gone.status("pending")
    gone.status("running")
    assert a.state() == "interrupted"
    writer.status("pending")
    writer.status("running")
    assert a.state() == "running" and a.is_active()
    # only checkpoints with the completion marker count
    (a.checkpoints_dir / "checkpoint-2").mkdir(parents=True)
    (a.checkpoints_dir / "checkpoint-4").mkdir()
    (a.checkpoints_dir / "checkpoint-2" / "sftkit-complete.json").write_text("{}")
    assert a.last_checkpoint().name == "checkpoint-2"
    assert store.get(a.name) == a
    assert store.table()[0]["state"] == "running"


def test_device_lock_refuses_a_second_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    run = RunFolder(tmp_path / "r1")
    first, second = DeviceLock("cpu"), DeviceLock("cpu")
    assert first.holder() is None
    first.acquire(run)
    try:
        assert second.holder()["run"] == str(run.path)
        with pytest.raises(DeviceBusyError, match=r"already training on cpu: .*r1 \(pid \d+\).*Stop"):
            second.acquire(RunFolder(tmp_path / "r2"))
    finally:
        first.release()
    assert second.holder() is None
    json.loads(first.path.read_text())

"""What several test modules share: small real models built from a config (random weights, saved
to disk), tiny run configs and run folders, waiting on a condition, and a running JupyterLab from a
temporary copy of the project. Fixtures live in conftest.py."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_model(folder: Path, arch: str, tokenizer_from: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   **common)
    elif arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return Path(folder)


def tiny_config(model_dir, store, **training):
    """A run config for a tiny model: 8 steps of batch 4 on the dates task, checkpoints every 2."""
    from sftkit.core.runconfig import RunConfig

    t = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "checkpoint_every": 2, "eval_every": 4,
         "sample_every": 4, "sample_max_new_tokens": 4, "lr_schedule": "constant", "warmup": 0}
    t.update(training)
    return RunConfig.from_dict({
        "name": "tiny", "store": str(store), "model": {"spec": str(model_dir)},
        "data": {"source": "teaching:dates", "rows": 80, "max_eval_rows": 8, "sample_prompts": 1},
        "adapter": {"preset": "lora_all_linear", "rank": 4, "alpha": 8.0, "dropout": 0.0},
        "training": t,
    })


def wait_for(predicate, timeout=120.0, what="condition"):
    """Wait until ``predicate()`` is true (polling), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def losses(run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.metrics() if "loss" in m}


def make_run(tmp_path, name="r"):
    """A run folder with the example config and nothing else (the run protocol's starting point)."""
    from sftkit.core.examples import example_config
    from sftkit.core.runstore import RunFolder

    run = RunFolder(tmp_path / "runs" / name)
    run.path.mkdir(parents=True)
    example_config().with_changes(store=str(tmp_path / "runs")).save(run.config_path)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"token {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def linked_cache(folder: Path, default_model_folder: Path) -> Path:
    """An sftkit cache of its own (device locks, ...) that links the converted default model."""
    folder.mkdir(parents=True, exist_ok=True)
    models = default_model_folder.parent.resolve()  # the shared models folder itself, not a link to it
    (folder / "models").symlink_to(models, target_is_directory=True)
    return folder


def project_copy(folder: Path) -> Path:
    """lab/ (start.sh and its settings) and the notebooks, as the project lays them out."""
    shutil.copytree(ROOT / "lab", folder / "lab", ignore=shutil.ignore_patterns("build_notebooks.py"))
    (folder / "notebooks").mkdir()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(nb, folder / "notebooks" / nb.name)
    return folder


@contextlib.contextmanager
def running_lab(folder: Path, cache: Path, **extra_env: str):
    """lab/start.sh of a project copy in ``folder``; yields base URL, token, log and the notebooks folder.
    ``extra_env``: more environment for the server and its kernels (e.g. the notebooks' fast profile;
    SFTKIT_FRONTEND="notebook" starts the Notebook 7 interface instead of JupyterLab)."""
    port = free_port()
    log = folder / "lab.log"
    env = dict(os.environ, CI="true", VENV=str(ROOT / ".venv"), SFTKIT_CACHE_DIR=str(cache), **extra_env)
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(folder / "lab" / "start.sh"), "--no-browser", f"--port={port}"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        url = None
        while time.time() < deadline and url is None:
            m = re.search(r"(http://127\.0\.0\.1:%d/(?:lab|tree)\?token=([0-9a-f]+))" % port, log.read_text())
            if m:
                url, token = m.group(1), m.group(2)
            elif proc.poll() is not None:
                pytest.fail(f"lab/start.sh exited early:\n{log.read_text()}")
            else:
                time.sleep(0.5)  # polling the log for the URL, not a fixed wait
        assert url, f"no URL with a token in the log:\n{log.read_text()}"
        yield {"base": f"http://127.0.0.1:{port}", "token": token, "log": log,
               "notebooks": (folder / "notebooks").resolve(), "cache": cache}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def keep_screenshot(target, name: str, folder: Path) -> Path:
    """A PNG of ``target`` (a playwright page or locator) as ``folder/name.png``; when SFTKIT_SCREENSHOTS names
    a folder (`make screenshots`: docs/screenshots) it is copied there too, so the README's pictures come
    from the real browser run. Without the variable nothing is written outside ``folder``."""
    path = Path(folder) / f"{name}.png"
    target.screenshot(path=str(path))
    keep = os.environ.get("SFTKIT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_piece(why: str, *, ci_message: str | None = None) -> None:
    """A piece the set-up (`make test`) installs is missing: under CI the test fails (with
    ``ci_message``, default: ``why`` and that `make test` must install it), elsewhere it is skipped,
    saying why. Never a silent skip in CI."""
    if in_ci():
        pytest.fail(f"CI={os.environ['CI']}: " + (ci_message or f"{why}; `make test` must install it"), pytrace=False)
    pytest.skip(why)


def eager_attentions(model, ids):
    """``output_attentions`` of a plain eager forward (a peft model's base switched for it and back):
    [layers, heads, queries, keys] as float32 numpy, the reference the attention captures are checked against."""
    import numpy as np
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        base.set_attn_implementation(before)
    return np.stack([x[0].float().numpy() for x in out.attentions])

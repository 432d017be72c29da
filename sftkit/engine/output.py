"""What a run leaves behind: load the trained adapter, or merge it into a full model."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.runstore import RunFolder, RunStateError


def _run(run) -> RunFolder:
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    if not run.exists():
        raise RunStateError(f"{run.path} is not a run folder (no config.yaml)")
    return run


def load_trained(run, *, quantization: str = "none", device: str = "auto", checkpoint: str | Path | None = None):
    """The run's base model with its trained adapter, as ``(PeftModel, tokenizer)``.

    checkpoint: a checkpoint folder to load instead of ``adapter/`` (a stopped or killed run's
    last checkpoint, for instance). It is plain ``peft.PeftModel.from_pretrained`` underneath.
    """
    from peft import PeftModel

    from .models import load_model

    run = _run(run)
    cfg = run.config()
    folder = Path(checkpoint) if checkpoint is not None else run.adapter_dir
    if not (folder / "adapter_config.json").is_file():
        full = run.path / "model"
        if checkpoint is None and (full / "config.json").is_file():  # a plan without LoRA saves the model
            return load_model(str(full), quantization=quantization, device=device)
        raise RunStateError(f"{folder} holds no adapter (adapter_config.json); the run is {run.state()}"
                            + (f", its last checkpoint is {run.last_checkpoint()}" if run.last_checkpoint() else ""))
    model, tokenizer = load_model(cfg.model.spec, quantization=quantization, device=device, dtype=cfg.model.dtype,
                                  attn_implementation=cfg.model.attn_implementation)
    model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    return model, tokenizer


def merge_and_save(run, output: str | Path) -> Path:
    """Merge the run's adapter into its (unquantized) base model; save safetensors + tokenizer."""
    run = _run(run)
    output = Path(output)
    model, tokenizer = load_trained(run, quantization="none", device="cpu")
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output

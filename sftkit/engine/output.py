"""What a run leaves behind: load the trained adapter, merge it into a full model (the methods that
change weights: LoRA, DoRA, IA3), or export the adapter as it is (every method; the only export of a
prompt method, which has no weights to fold in)."""

from __future__ import annotations

import shutil
import tempfile
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


MERGE_MARKER = ".sftkit-merged.json"
# peft methods whose adapter is not a change of weights: they add virtual tokens, nothing to fold in
UNMERGEABLE = {"PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "p-tuning",
               "ADAPTION_PROMPT": "LLaMA-Adapter (adaption prompt)"}


class MergeRefused(RunStateError):
    """The run's method can't be merged into the weights (a soft prompt, a prefix): export the adapter."""


def adapter_method(run) -> str | None:
    """peft's type of the run's saved adapter (``LORA``, ``IA3``, ``PROMPT_TUNING``, ...); None without one."""
    import json

    run = _run(run)
    try:
        return json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError):
        return None


def check_mergeable(run) -> None:
    """Refuse, naming the method and the setting, to merge an adapter that is not a weight change."""
    run = _run(run)
    kind = adapter_method(run)
    if kind in UNMERGEABLE:
        preset = run.config().adapter.preset
        raise MergeRefused(f"run {run.name} trained {UNMERGEABLE[kind]} (adapter.preset={preset}): its virtual tokens "
                           "are not a change of the weights, so there is nothing to merge. Use the adapter as it is "
                           f"({run.adapter_dir}, plain peft.PeftModel.from_pretrained loads it), or export it with "
                           "sftkit.export_adapter; merging works for LoRA, DoRA and IA3 runs")


def export_adapter(run, output: str | Path, *, force: bool = False) -> Path:
    """The run's adapter (any peft method) and tokenizer copied to ``output``: the export of a method that
    can't merge. ``output`` follows merge_and_save's rules (new, empty, or an earlier export's)."""
    import json
    import time

    from ..core.atomic import write_text_atomic

    run = _run(run)
    output = Path(output).expanduser()
    _check_merge_output(run, output, force, kind="export")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise RunStateError(f"run {run.name} has no adapter to export ({run.adapter_dir}); the run is {run.state()}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".export", dir=str(output.parent)))
    try:
        shutil.copytree(run.adapter_dir, tmp / "adapter")
        files = sorted(str(p.relative_to(tmp / "adapter")) for p in (tmp / "adapter").rglob("*") if p.is_file())
        write_text_atomic(tmp / "adapter" / MERGE_MARKER, json.dumps({"run": str(run.path.resolve()), "kind": "export",
                                                                       "time": time.time(), "files": files}))
        _check_merge_output(run, output, force, kind="export")
        _swap_in(tmp / "adapter", output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _swap_in(new: Path, output: Path) -> None:
    """``new`` renamed to ``output``: an existing ``output`` renamed aside first (put back if the rename
    fails), removed only once the new one is in place."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=str(output.parent)))
        old.rmdir()
        output.rename(old)
    try:
        new.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)  # the earlier folder back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_files(output: Path) -> tuple[set[str] | None, str | None]:
    """The files an earlier merge or export wrote into ``output`` (from its marker) and which of the two
    wrote them ("merge" or "export"), or (None, None) without a marker."""
    import json

    try:
        data = json.loads((output / MERGE_MARKER).read_text(encoding="utf-8"))
        files = set(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in ("merge", "export"):  # a marker from before the kind was written: an export is an adapter alone
        kind = "export" if "adapter_config.json" in files and "config.json" not in files else "merge"
    return files | {MERGE_MARKER}, kind


def _check_merge_output(run: RunFolder, output: Path, force: bool, kind: str = "merge") -> None:
    """OUT must be new, an empty folder, or an earlier output of the same kind (a merge's for a merge, an
    export's for an export) holding only what it wrote. ``force`` replaces another folder, but never the run
    folder (or anything inside or above it), the home folder, the working directory or a folder above it,
    or the file system's root."""
    out, run_dir = output.resolve(), run.path.resolve()
    if out == run_dir or run_dir in out.parents or out in run_dir.parents:
        raise RunStateError(f"merge output {output} is the run folder, inside it or above it; give a folder of its own")
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor) or out == Path.home().resolve() or out == cwd or out in cwd.parents:
        raise RunStateError(f"merge output {output} is the root, the home folder or the working directory (or above "
                            "it); give a folder of its own")
    if not output.exists() and not output.is_symlink():
        return
    if output.is_symlink() or not output.is_dir():
        raise RunStateError(f"merge output {output} exists and is not a folder; give a new folder")
    present = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file() or p.is_symlink()}
    written, written_by = _merge_files(output)
    if not present or force or (written is not None and written_by == kind and present <= written):
        return
    if written is not None and written_by != kind:
        what = {"merge": "a merged model", "export": "an exported adapter"}
        article = "an" if kind == "export" else "a"
        raise RunStateError(f"{kind} output {output} holds {what[written_by]} (sftkit's earlier {written_by}); "
                            f"{article} {kind} does not replace it: nothing was changed. Give a new folder, or --force "
                            "(force=True) to replace it.")
    if written is not None:
        extra = sorted(present - written)
        raise RunStateError(f"merge output {output} is an earlier merge's, but now also holds files it did not "
                            f"write ({', '.join(extra[:5])}); nothing was changed. Move them, give a new folder, or "
                            "--force (force=True) to replace it all.")
    raise RunStateError(f"merge output {output} is a non-empty folder that sftkit did not write; nothing was "
                        "changed. Give a new folder, or --force (force=True) to replace it.")


def merge_and_save(run, output: str | Path, *, force: bool = False) -> Path:
    """Merge the run's adapter into its (unquantized) base model; save safetensors + tokenizer.

    LoRA, DoRA and IA3 merge; a prompt method (prompt / prefix tuning, p-tuning, LLaMA-Adapter) is
    refused with ``MergeRefused`` naming it (``export_adapter`` copies its adapter instead).

    output: a new or empty folder, or an earlier merge's output (a marker lists what it wrote),
    which is replaced. Any other existing folder is refused unless ``force``. The new model is
    written beside it and swapped in: the old folder renamed aside, the new one renamed in (the
    old one put back if that fails), then the old removed.
    """
    import json
    import time

    from ..core.atomic import write_text_atomic

    run = _run(run)
    output = Path(output).expanduser()
    check_mergeable(run)  # a soft prompt or a prefix has nothing to merge: said before anything is loaded
    _check_merge_output(run, output, force)  # before any model is loaded
    model, tokenizer = load_trained(run, quantization="none", device="cpu")
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".merging", dir=str(output.parent)))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_text_atomic(tmp / MERGE_MARKER, json.dumps({"run": str(run.path.resolve()), "kind": "merge",
                                                          "time": time.time(), "files": files}))
        _check_merge_output(run, output, force)  # still true after the minutes the merge took
        _swap_in(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output

"""The example run: the default model learns the ``dates`` teaching task in about a minute on a CPU."""

from __future__ import annotations

import yaml

from .runconfig import RunConfig

COMMENTS = {
    "name": "part of the run folder's name: <store>/<YYYYMMDD-HHMMSS>-<name>",
    "store": "the folder run folders go into (relative to this file)",
    "model": "which model and how to load it",
    "model.spec": "'default' (bundled SmolLM2-135M-Instruct), a hub id, a local folder or a .gguf file",
    "model.quantization": "auto | 4bit | 8bit | none. auto: 4-bit NF4 QLoRA on CUDA, plain fp32 LoRA on CPU",
    "model.device": "auto | cpu | cuda",
    "model.dtype": "auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, fp32 on CPU)",
    "model.attn_implementation": "sdpa | eager",
    "data": "the rows",
    "data.source": "teaching:dates, teaching:intent, or a .jsonl/.json/.csv file (relative to this file)",
    "data.rows": "teaching tasks: rows to generate; files: keep the first N (null: all)",
    "data.eval_fraction": "held-out share for eval loss and samples (0: none)",
    "data.max_eval_rows": "cap on held-out rows evaluated (eval time grows with it)",
    "data.split_seed": "the same seed gives the same split",
    "data.sample_prompts": "held-out rows the run answers every training.sample_every steps",
    "template": "null: the teaching task's template. Otherwise user_pattern, answer_field, system, ...",
    "adapter": "what trains: a preset plus explicit additions/removals",
    "adapter.preset": "lora_attention | lora_all_linear | lora_top_blocks | freeze_tuning | bitfit | none",
    "adapter.top_n": "lora_top_blocks / freeze_tuning: how many of the last blocks",
    "adapter.embeddings": "also train the input embeddings",
    "adapter.head": "also train the output head",
    "adapter.rank": "LoRA rank",
    "adapter.alpha": "LoRA scale numerator (the update is scaled by alpha / rank)",
    "adapter.dropout": "LoRA dropout",
    "adapter.add_lora": "module paths to add LoRA to, e.g. model.layers.0.mlp.down_proj",
    "adapter.remove_lora": "module paths to take out of the preset",
    "adapter.add_train": "parameter names to train in full, e.g. model.norm.weight",
    "adapter.remove_train": "parameter names to take out of the preset",
    "training": "the optimisation loop (a step is one optimizer update)",
    "training.epochs": "passes over the training rows (ignored when max_steps is set)",
    "training.max_steps": "total optimizer steps (null: from epochs)",
    "training.batch_size": "rows per device per forward pass",
    "training.grad_accum": "forward passes per optimizer step (effective batch = batch_size x grad_accum)",
    "training.learning_rate": "peak learning rate",
    "training.lr_schedule": "constant | constant_with_warmup | linear | cosine",
    "training.warmup": "warm-up: a fraction of the steps (< 1) or a number of steps",
    "training.max_length": "tokens per row (null: the template's max_length)",
    "training.weight_decay": "AdamW weight decay",
    "training.max_grad_norm": "gradient clipping (0: none)",
    "training.eval_every": "steps between eval-loss measurements (0: once at the end)",
    "training.early_stopping_patience": "stop after this many evals without improvement (0: off)",
    "training.early_stopping_threshold": "the improvement that counts",
    "training.gradient_checkpointing": "recompute activations in backward: less memory, about 30% slower",
    "training.seed": "the same seed gives the same run",
    "training.packing": "pack rows into one padding-free sequence per batch (kept apart: no cross-row attention)",
    "training.checkpoint_every": "steps between resumable checkpoints",
    "training.keep_checkpoints": "how many checkpoints to keep",
    "training.sample_every": "steps between sample generations (0: only at the end)",
    "training.sample_max_new_tokens": "length cap of those generations",
    "training.logging_every": "steps between metric lines",
}


def example_config() -> RunConfig:
    return RunConfig.from_dict({
        "name": "dates-lora",
        "store": "runs",
        "model": {"spec": "default"},
        "data": {"source": "teaching:dates", "rows": 400, "eval_fraction": 0.1, "max_eval_rows": 16,
                 "sample_prompts": 2},
        "template": None,
        "adapter": {"preset": "lora_all_linear", "rank": 16, "alpha": 32.0, "dropout": 0.0},
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-3, "lr_schedule": "cosine",
                     "warmup": 0.1, "eval_every": 6, "checkpoint_every": 6, "sample_every": 6,
                     "packing": False, "sample_max_new_tokens": 16},
    })


def commented_yaml(cfg: RunConfig, comments: dict[str, str] = COMMENTS) -> str:
    """The config as YAML with a comment above every field."""
    lines = ["# sftkit run config. Train it with:  sftkit train THIS.yaml",
             "# Every field is optional; a missing one takes its default.", ""]
    for key, value in cfg.to_dict().items():
        if key in comments:
            lines.append(f"# {comments[key]}")
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, v in value.items():
                c = comments.get(f"{key}.{sub}")
                if c:
                    lines.append(f"  # {c}")
                dumped = yaml.safe_dump({sub: v}, default_flow_style=True, width=1000, allow_unicode=True).strip()
                lines.append("  " + dumped[1:-1] if dumped.startswith("{") else "  " + dumped)
        else:
            lines.append(yaml.safe_dump({key: value}, default_flow_style=False, allow_unicode=True).strip())
        lines.append("")
    return "\n".join(lines)


def example_config_yaml() -> str:
    return commented_yaml(example_config())

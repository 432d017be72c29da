"""The example run: the default model learns the ``dates`` teaching task in about a minute on a CPU."""

from __future__ import annotations

import yaml

from .fields import comment_of
from .runconfig import RunConfig, RunConfigError, config_fields


def field_comments() -> dict[str, str]:
    """The comment above each field of the example config, from the field's declaration: its help,
    then what it allows (``rows per device per forward pass. Allowed: an integer from 1 to 4096``)."""
    comments = {name: comment_of(f) for name, f in config_fields(sections=True)}
    return {name: c for name, c in comments.items() if c}  # one without: commented_yaml names it


COMMENTS = field_comments()


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
                     "sample_max_new_tokens": 16},
    })


def commented_yaml(cfg: RunConfig, comments: dict[str, str] = COMMENTS) -> str:
    """The config as YAML with a comment above every field (a field of the config without one is an error;
    the template's own fields are commented when ``comments`` has them)."""
    missing = [name for name, _ in config_fields(sections=True) if not comments.get(name)]
    if missing:
        raise RunConfigError(f"no comment for {', '.join(missing)}: declare its help with setting(help=...)")
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

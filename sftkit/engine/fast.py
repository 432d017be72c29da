"""The fast path of a training step: less work for the same loss.

Three measures, each checked against the standard computation in tests:

- ``trained_positions_loss``: the LM head and the cross-entropy only where a label is trained. A
  completion-only template trains a small share of the tokens (the answer), and the head
  (hidden x vocabulary) is a fifth of a small model's compute while its full-vocabulary logits
  dominate memory. The model's own forward does the slicing (``logits_to_keep`` with a boolean
  mask), so model-specific head code (soft-capping, scaling) still runs.
- ``packed`` attention: a packed batch is one sequence holding several rows. PyTorch's fused
  attention then works on the whole sequence under a block mask (cost ~ total length squared);
  this attention runs each row's block on its own (cost ~ the sum of the rows' squares) and
  hands everything else (padded batches, generation) to the standard sdpa attention.
- ``padding_share``: how much of a padded batch would be padding for these rows, which decides
  ``training.packing: auto``.
"""

from __future__ import annotations

import inspect
import random
from typing import Sequence

PACKED_ATTENTION = "sftkit_packed"
AUTO_PACKING_THRESHOLD = 0.15  # pack when padding would be more than this share of a padded batch


# ---- when to pack ----------------------------------------------------------------------------------
def padding_share(lengths: Sequence[int], batch_size: int, *, samples: int = 200, seed: int = 0) -> float:
    """Expected share of padding in randomly drawn padded batches of ``batch_size`` rows (each batch is
    padded to its longest row), estimated from ``samples`` seeded draws."""
    lengths = [int(n) for n in lengths if n > 0]
    if not lengths or batch_size <= 1:
        return 0.0
    rng = random.Random(seed)
    real = padded = 0
    k = min(batch_size, len(lengths))
    for _ in range(samples):
        batch = rng.sample(lengths, k)
        real += sum(batch)
        padded += max(batch) * k
    return 1.0 - real / padded if padded else 0.0


def choose_packing(setting, lengths: Sequence[int], batch_size: int) -> tuple[bool, float, str]:
    """``training.packing`` (``auto``, True or False) and the rows -> (pack?, expected padding share, why)."""
    share = padding_share(lengths, batch_size)
    if setting is True:
        return True, share, "packing: on (training.packing: on)"
    if setting is False:
        return False, share, "packing: off (training.packing: off)"
    if share > AUTO_PACKING_THRESHOLD:
        return True, share, (f"packing: on (auto): padded batches of these rows would be {share:.0%} padding "
                             f"(packing pays above {AUTO_PACKING_THRESHOLD:.0%})")
    return False, share, (f"packing: off (auto): padded batches of these rows would be only {share:.0%} padding "
                          f"(packing pays above {AUTO_PACKING_THRESHOLD:.0%})")


# ---- packed attention --------------------------------------------------------------------------------
# what the per-row branch has done (tests and the run's probe read it), and the last batch's rows: the
# boundaries are read from the device once per forward, not once per layer
PACKED_CALLS = {"per_row": 0, "standard": 0}
_LAST_SEGMENTS: list = [None, None]  # [position_ids tensor, its segments]

# attention settings the per-row branch does not implement: with any of them, sdpa decides
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask")


def _segments(position_ids) -> list[tuple[int, int]] | None:
    """(start, end) of each row in a packed sequence (positions restart at 0), or None for one row."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    if _LAST_SEGMENTS[0] is position_ids:
        return _LAST_SEGMENTS[1]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    segments = None
    if len(starts) >= 2 and starts[0] == 0:
        segments = list(zip(starts, starts[1:] + [position_ids.shape[1]]))
    _LAST_SEGMENTS[0], _LAST_SEGMENTS[1] = position_ids, segments
    return segments


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Causal attention per row of a packed sequence; anything else goes to the standard sdpa attention.
    Shapes as transformers' attention functions: q/k/v (batch, heads, length, head_dim) in, output
    (batch, length, heads, head_dim)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    segments = None
    if (query.shape[0] == 1 and query.shape[2] == key.shape[2] and query.shape[2] > 1
            and not any(kwargs.get(k) is not None for k in _UNSUPPORTED) and (dropout or 0.0) == 0.0):
        segments = _segments(kwargs.get("position_ids"))
    if segments is None:
        PACKED_CALLS["standard"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    PACKED_CALLS["per_row"] += 1
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True)
        for s, e in segments]
    out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make ``PACKED_ATTENTION`` a name transformers models accept (``model.set_attn_implementation``);
    its masks are sdpa's, so padded batches keep their padding mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def use_packed_attention(model) -> bool:
    """Switch an sdpa model to the packed attention (eager and flash kernels are left alone), if a probe
    (two 3-token rows packed) shows its per-row branch really runs for this model: models that do not
    hand position ids to their attention, or use settings it does not implement (sliding windows,
    soft-capping, sinks), stay on sdpa."""
    import torch

    base = _base_model(model)
    if getattr(base.config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    register_packed_attention()
    base.set_attn_implementation(PACKED_ATTENTION)
    before = dict(PACKED_CALLS)
    device = next(base.parameters()).device
    probe = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    was_training = base.training
    try:
        base.eval()
        with torch.no_grad():
            base(input_ids=torch.ones_like(probe), position_ids=probe, use_cache=False)
    finally:
        base.train(was_training)
    if PACKED_CALLS["per_row"] == before["per_row"] or PACKED_CALLS["standard"] != before["standard"]:
        base.set_attn_implementation("sdpa")  # some layer would not run per row: sdpa's block mask is right
        return False
    return True


def restore_attention(model) -> None:
    """Back to sdpa (before saving a model whose config names its attention)."""
    base = _base_model(model)
    if getattr(base.config, "_attn_implementation", None) == PACKED_ATTENTION:
        base.set_attn_implementation("sdpa")


# ---- the loss on trained positions only ----------------------------------------------------------
def _base_model(model):
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def supports_trained_positions_loss(model) -> tuple[bool, str]:
    """Whether ``trained_positions_loss`` computes this model's loss (and if not, why)."""
    peft_config = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return False, "prompt-learning adapters put virtual tokens in front of the rows"
    base = _base_model(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False, "the model's forward has no readable signature"
    if "logits_to_keep" not in params:
        return False, f"{type(base).__name__}.forward has no logits_to_keep"
    return True, ""


def trained_positions(labels):
    """Boolean (batch, length): True where the NEXT token is trained (the logits a loss needs)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None):
    """Cross-entropy summed over the trained tokens, divided by ``num_items_in_batch`` (the trained
    tokens of the whole accumulated batch, as the Trainer counts them) or, without it, their mean.
    Equal to the model's own causal-LM loss; the head runs on the trained positions only."""
    import torch

    labels = inputs["labels"]
    keep = trained_positions(labels)
    target = labels[:, 1:][keep[:, :-1]]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**rest, logits_to_keep=keep)
    logits = outputs.logits.float().reshape(-1, outputs.logits.shape[-1])
    from .precision import kept_as_is

    with kept_as_is():  # the loss's saved log-softmax stays fp32 where a run keeps bf16 activations
        loss = torch.nn.functional.cross_entropy(logits, target.to(logits.device), reduction="sum")
    if num_items_in_batch is None:
        return loss / max(int(target.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ---- passes of at most N tokens ----------------------------------------------------------------------
def split_batch(inputs: dict, max_tokens: int | None) -> list[dict]:
    """A batch cut into passes of whole rows holding at most ``max_tokens`` real tokens each (a longer
    row is a pass of its own), so the activations of one pass, not of the whole batch, bound the memory.
    Packed batches (one sequence, positions restarting at 0) are cut at row starts; padded batches into
    groups of rows, each group's padding cut to its own longest row. The gradient of the passes summed
    equals the batch's when each pass's loss is normalised by the whole batch's trained tokens."""
    import torch

    if not max_tokens or "labels" not in inputs:
        return [inputs]
    ids = inputs["input_ids"]
    if ids.shape[0] == 1 and "position_ids" in inputs and "attention_mask" not in inputs:
        segments = _segments(inputs["position_ids"]) or [(0, ids.shape[1])]
        if ids.shape[1] <= max_tokens:
            return [inputs]
        cuts, start, end = [], segments[0][0], segments[0][0]
        for s, e in segments:
            if e - start > max_tokens and end > start:
                cuts.append((start, end))
                start = s
            end = e
        cuts.append((start, end))
        return [{k: (v[:, a:b] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == ids.shape[1] else v)
                 for k, v in inputs.items()} for a, b in cuts]
    mask = inputs.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    if len(lengths) * max(lengths) <= max_tokens:
        return [inputs]
    # rows by length (the summed gradient does not depend on the order); a group costs its rows times its
    # longest row, padding included, so no pass holds more than max_tokens (a longer row goes alone)
    groups, current, width = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        n = lengths[i]
        if current and (len(current) + 1) * max(width, n) > max_tokens:
            groups.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    groups.append(current)
    right_padded = mask is None or bool((mask[:, 0] == 1).all())
    if not right_padded and "position_ids" not in inputs:  # cutting left padding must not move positions
        inputs = {**inputs, "position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
    out = []
    for rows in groups:
        width = max(lengths[i] for i in rows)
        index = torch.tensor(rows)
        part = {}
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == ids.shape[0]:
                v = v[index]
                if v.dim() == 2 and v.shape[1] == ids.shape[1]:
                    v = v[:, :width] if right_padded else v[:, v.shape[1] - width:]
            part[k] = v
        out.append(part)
    return out

"""Training memory estimate from model sizes: weights, gradients, optimizer, activations.

Pure arithmetic, so the layer picker can update it on every click.

Activations follow what autograd saves in a decoder block, measured on SmolLM2-135M with
saved-tensor hooks (fp32, batch 2-4, 64-128 tokens; benchmarks/RESULTS.md):
per token and trained-through block about 9*hidden + 4*intermediate values (9*hidden +
2*intermediate when only norms and biases train), plus the
input of every LoRA-adapted projection, plus heads*seq_len with eager attention; the
logits add one vocab-sized row per token (per TRAINED token when the head runs at trained positions
only, as sftkit's runs do). A batch run as passes of at most N tokens keeps one pass's
activations at a time. Backward stops at the lowest trained block, so
only the blocks from there up keep activations. With gradient checkpointing each block
keeps only its input, and one block's activations are rebuilt at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "4bit", "8bit")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, an fp32 per 256 absmax blocks
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_PARAM = 1.0


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward at the end of the forward pass
    recompute: int  # extra peak while gradient checkpointing rebuilds one block
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.recompute

    @property
    def weights_grads_optimizer(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("activations", self.activations + self.recompute), ("total", self.total)]

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in self.rows())


def estimate_memory(sizes: dict, *, trainable: int, batch_size: int, seq_len: int, weights: str = "float32",
                    compute: str | None = None, gradient_checkpointing: bool = False, attention: str = "sdpa",
                    lora_input_features: int = 0, lowest_trained_block: int = 0,
                    trainable_dtype: str | None = None, adapters: bool = False,
                    projections_trained: bool = True, trained_per_row: int | None = None,
                    pass_tokens: int | None = None, frozen: str | None = None) -> MemoryEstimate:
    """Estimate training memory in bytes.

    sizes: total_params, linear_params (the block projections, the part 4/8-bit applies to),
        n_blocks, hidden, intermediate, vocab, heads.
    weights: storage of the weights: float32 | bfloat16 | float16 | 4bit | 8bit.
    compute: activation dtype (default: the weights' dtype; float32 for 4bit/8bit).
    lora_input_features: sum over the LoRA-adapted projections of one block of their input size
        (average block); their inputs are kept for the adapters' backward.
    lowest_trained_block: backward stops there; blocks below keep no activations.
    trainable_dtype: dtype of the trained parameters (LoRA adapters are float32).
    adapters: the trained parameters are new tensors next to the frozen weights (LoRA and
        peft's trained module copies) rather than the weights themselves.
    projections_trained: False when no projection weight trains (BitFit: norms and biases);
        then the projections' inputs are not kept and a block keeps about 9*h + 2*i values.
    trained_per_row: tokens of each row that train (the answer); the head's logits are kept for
        those only (sftkit's runs). None: logits for every token (the model's own loss).
    pass_tokens: the batch runs as passes of at most this many tokens (``training.max_pass_tokens``):
        activations are one pass's.
    frozen: storage of the frozen weights when a run keeps them apart from ``weights`` (bfloat16 on CPUs
        with native bf16, engine/precision.py); the weights that train in place stay ``weights``. The
        norms, a few thousand values that stay fp32, are counted as frozen. Such a run also keeps what
        backward needs (the activations, the logits) in ``frozen`` (precision.saved_in).
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be >= 1")
    compute = compute or (weights if weights in _BYTES else "float32")
    apart = bool(frozen) and frozen != weights and weights in _BYTES
    act_bytes = _BYTES[frozen] if apart else _BYTES[compute]
    other = sizes["total_params"] - sizes["linear_params"]
    if weights == "4bit":
        w = sizes["linear_params"] * NF4_BYTES_PER_PARAM + other * act_bytes
    elif weights == "8bit":
        w = sizes["linear_params"] * INT8_BYTES_PER_PARAM + other * act_bytes
    elif apart:
        if frozen not in _BYTES:
            raise ValueError(f"frozen={frozen!r}; allowed: {', '.join(_BYTES)}")
        in_place = 0 if adapters else trainable
        w = (sizes["total_params"] - in_place) * _BYTES[frozen] + in_place * _BYTES[weights]
    else:
        w = sizes["total_params"] * _BYTES[weights]
    t_bytes = _BYTES[trainable_dtype or ("float32" if adapters or weights in ("4bit", "8bit") else weights)]
    # adapters live next to the base weights; full training updates the weights in place
    extra_weights = trainable * t_bytes if adapters else 0
    grads = trainable * t_bytes
    optim = trainable * 2 * t_bytes  # AdamW: exp_avg and exp_avg_sq in the parameter's dtype

    L, h, i, V = sizes["n_blocks"], sizes["hidden"], sizes["intermediate"], sizes["vocab"]
    tokens = batch_size * seq_len
    if pass_tokens:
        rows_per_pass = max(1, min(batch_size, pass_tokens // seq_len))  # whole rows; a longer row alone
        tokens = rows_per_pass * seq_len
    else:
        rows_per_pass = batch_size
    per_block = 9 * h + (4 if projections_trained else 2) * i + lora_input_features
    if attention == "eager":
        per_block += sizes["heads"] * seq_len
    active = max(0, min(L, L - lowest_trained_block))
    logit_rows = tokens if trained_per_row is None else rows_per_pass * min(trained_per_row, seq_len)
    logits = logit_rows * V * (act_bytes if apart else 4)  # the loss works on fp32 logits
    notes = []
    if gradient_checkpointing:
        acts = tokens * (active + 1) * h * act_bytes + logits
        recompute = tokens * per_block * act_bytes
        notes.append("gradient checkpointing: each block keeps its input; one block is rebuilt at a time")
    else:
        acts = tokens * (active * per_block + h) * act_bytes + logits
        recompute = 0
    if weights == "4bit":
        notes.append("4-bit NF4 with double quantization for the block projections")
    elif apart:
        notes.append(f"frozen weights stored in {frozen}, trained ones in {weights}; backward keeps {frozen} "
                     "activations")
    if pass_tokens and rows_per_pass < batch_size:
        notes.append(f"the batch runs as passes of {rows_per_pass} row(s): activations are one pass's")
    return MemoryEstimate(int(w + extra_weights), int(grads), int(optim), int(acts), int(recompute), tuple(notes))

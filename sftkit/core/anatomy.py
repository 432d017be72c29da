"""The anatomy record: a causal LM as embeddings, repeated blocks and the modules inside them.

Plain data, no torch: ``sftkit.engine.anatomy.inspect_model`` fills it in from a loaded model,
and everything that reasons about what trains (``sftkit.core.plan.FreezePlan``, the memory
estimate, the layer picker's state) reads only this record.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearInfo:
    name: str  # full module name (relative to the base model)
    block: int | None
    column: str  # path inside the block, e.g. "self_attn.q_proj"
    kind: str  # "attention" | "mlp" | "other"
    in_features: int
    out_features: int
    n_params: int
    quantized: bool
    conv1d: bool = False  # GPT-2 style Conv1D: weight stored (in, out)


@dataclass(frozen=True)
class ParamInfo:
    name: str  # parameter name relative to the base model
    module: str
    numel: int  # logical count (4-bit weights counted unpacked)
    nbytes: int  # bytes as stored now
    block: int | None
    column: str | None  # module path inside its block
    kind: str  # "attention" | "mlp" | "norm" | "embedding" | "head" | "other"
    is_bias: bool
    quantized: bool


@dataclass
class Anatomy:
    model_type: str
    block_path: str  # e.g. "model.layers"
    n_blocks: int
    attention_columns: list[str]
    mlp_columns: list[str]
    other_columns: list[str]
    norm_columns: list[str]  # norm module paths inside a block
    linear: dict[tuple[int, str], LinearInfo]
    params: dict[str, ParamInfo]
    embedding_modules: list[str]
    head_module: str | None
    tied: bool
    final_norms: list[str]
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    module_params: dict[str, list[str]] = field(default_factory=dict)
    head_dim: int | None = None  # the config's head_dim where it sets one (Qwen3, Gemma: not hidden / heads)

    @property
    def attention_head_dim(self) -> int:
        """Values per attention head: the config's head_dim, else hidden / heads."""
        return self.head_dim or self.hidden_size // max(1, self.n_heads)

    @property
    def layers_pattern(self) -> str:
        return self.block_path.rsplit(".", 1)[-1]

    @property
    def linear_columns(self) -> list[str]:
        return self.attention_columns + self.mlp_columns + self.other_columns

    @property
    def total_params(self) -> int:
        return sum(p.numel for p in self.params.values())

    def linear_by_name(self, name: str) -> LinearInfo:
        if not hasattr(self, "_by_name"):
            self._by_name = {li.name: li for li in self.linear.values()}
        return self._by_name[name]

    def module_name(self, block: int, column: str) -> str:
        return f"{self.block_path}.{block}.{column}"

    def params_of_module(self, module: str) -> list[str]:
        return self.module_params.get(module, [])

    def column_kind(self, column: str) -> str:
        if column in self.attention_columns:
            return "attention"
        if column in self.mlp_columns:
            return "mlp"
        if column in self.norm_columns:
            return "norm"
        return "other"

    def describe(self) -> str:
        return (f"{self.model_type}: {self.n_blocks} blocks under {self.block_path}; attention "
                f"{', '.join(self.attention_columns)}; MLP {', '.join(self.mlp_columns)}; norms "
                f"{', '.join(self.norm_columns)}; embeddings {', '.join(self.embedding_modules)}; head "
                f"{self.head_module}{' (tied to the embeddings)' if self.tied else ''}; "
                f"{self.total_params / 1e6:.1f}M parameters")

    def numbers(self) -> dict:
        """The model sizes the memory estimate needs, as plain numbers."""
        return {
            "total_params": self.total_params,
            "linear_params": sum(li.n_params for li in self.linear.values()),  # what 4-bit quantizes
            "n_blocks": self.n_blocks,
            "hidden": self.hidden_size,
            "intermediate": self.intermediate_size,
            "vocab": self.vocab_size,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
        }


def anatomy_numbers(anatomy: Anatomy) -> dict:
    """The model sizes the memory estimate needs, as plain numbers (``Anatomy.numbers``)."""
    return anatomy.numbers()

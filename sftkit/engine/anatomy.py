"""Model anatomy by introspection: embeddings, the repeated blocks and what is inside them.

Works from the module tree and parameter names of any causal LM (Llama/SmolLM, Qwen2,
Mistral, GPT-2, Phi-style), full precision, 4-bit or already wrapped by peft. No table
of model types: the blocks are the largest ModuleList of identical modules; inside a
block, linear-like modules (nn.Linear, bitsandbytes layers, GPT-2's Conv1D) are the
columns, grouped as attention or MLP by their path; norms are found by class name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

_PEFT_INNER = (".base_layer", ".lora_", ".lora_dropout", ".lora_magnitude", ".modules_to_save", ".original_module",
               ".lora_embedding")


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


def base_model_of(model) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _linear_shape(mod: nn.Module) -> tuple[int, int]:
    if hasattr(mod, "base_layer"):
        mod = mod.base_layer
    if type(mod).__name__ == "Conv1D":
        return int(mod.weight.shape[0]), int(mod.nf)
    return int(mod.in_features), int(mod.out_features)


def logical_numel(p: torch.Tensor) -> int:
    """Parameter count as the model sees it: 4-bit packed weights counted unpacked."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(math.prod(qs.shape))
    return int(p.numel())


def _normalize(name: str) -> str | None:
    """A peft-wrapped name mapped back to the base model's name; None for adapter params."""
    if ".lora_" in name or ".modules_to_save." in name or name.startswith("lora_"):
        return None
    return name.replace(".base_layer", "").replace(".original_module", "")


def _kind_from_path(path: str) -> str:
    p = path.lower()
    if "attn" in p or "attention" in p:
        return "attention"
    if "mlp" in p or "ffn" in p or "feed_forward" in p or "fc" in p.split(".")[0]:
        return "mlp"
    return "other"


def find_blocks(base: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(f"no repeated blocks (a ModuleList of identical modules) in {type(base).__name__}")
    return best[1], best[2]


def _config_int(cfg, *names, default=0) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def inspect_model(model) -> Anatomy:
    """Discover the anatomy of a loaded causal LM (peft-wrapped or 4-bit too)."""
    base = base_model_of(model)
    block_path, blocks = find_blocks(base)
    modules = dict(base.named_modules())
    in_emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    # a peft modules_to_save wrapper stands where the head was
    head_name = None
    emb_names: list[str] = []
    for name, mod in modules.items():
        if any(t in name for t in _PEFT_INNER):
            continue
        target = getattr(mod, "original_module", mod)
        if out_emb is not None and (target is out_emb or mod is out_emb):
            head_name = name
        if isinstance(target, nn.Embedding) and not name.startswith(block_path + "."):
            emb_names.append(name)
    tied = False
    if in_emb is not None and out_emb is not None:
        w_out = getattr(getattr(out_emb, "original_module", out_emb), "weight", None)
        tied = w_out is not None and w_out is getattr(in_emb, "weight", None)
        tied = tied or bool(getattr(base.config, "tie_word_embeddings", False) and head_name and
                            not any(n.startswith(head_name + ".") for n, _ in base.named_parameters()))

    attention, mlp, other, norms = [], [], [], []
    linear: dict[tuple[int, str], LinearInfo] = {}
    for name, mod in modules.items():
        if not name.startswith(block_path + ".") or any(t in name for t in _PEFT_INNER):
            continue
        rest = name[len(block_path) + 1:]
        idx, _, column = rest.partition(".")
        if not column or not idx.isdigit():
            continue
        block = int(idx)
        if _is_linear(mod) or (hasattr(mod, "base_layer") and _is_linear(mod.base_layer)):
            fin, fout = _linear_shape(mod)
            w = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight
            kind = _kind_from_path(column)
            bucket = {"attention": attention, "mlp": mlp}.get(kind, other)
            if column not in bucket:
                bucket.append(column)
            bias = getattr(mod.base_layer if hasattr(mod, "base_layer") else mod, "bias", None)
            inner = mod.base_layer if hasattr(mod, "base_layer") else mod
            linear[(block, column)] = LinearInfo(
                name, block, column, kind, fin, fout,
                logical_numel(w) + (bias.numel() if bias is not None else 0),
                quantized=getattr(w, "quant_state", None) is not None or w.dtype in (torch.uint8, torch.int8),
                conv1d=type(inner).__name__ == "Conv1D")
        elif "norm" in type(mod).__name__.lower() and column not in norms:
            norms.append(column)
    final_norms = [n for n, m in modules.items()
                   if "norm" in type(m).__name__.lower() and not n.startswith(block_path + ".")
                   and not any(t in n for t in _PEFT_INNER)]

    params: dict[str, ParamInfo] = {}
    module_params: dict[str, list[str]] = {}
    for raw, p in base.named_parameters():
        name = _normalize(raw)
        if name is None or name in params:
            continue
        module, _, leaf = name.rpartition(".")
        block = column = None
        if name.startswith(block_path + "."):
            idx, _, rest = name[len(block_path) + 1:].partition(".")
            if idx.isdigit():
                block, column = int(idx), rest.rpartition(".")[0]
        if block is not None:
            if column in norms:
                kind = "norm"
            else:
                kind = _kind_from_path(column)
        elif module in emb_names:
            kind = "embedding"
        elif module == head_name:
            kind = "head"
        elif module in final_norms:
            kind = "norm"
        else:
            kind = "other"
        params[name] = ParamInfo(
            name=name, module=module, numel=logical_numel(p), nbytes=p.numel() * p.element_size(),
            block=block, column=column, kind=kind, is_bias=leaf == "bias",
            quantized=getattr(p, "quant_state", None) is not None)
        module_params.setdefault(module, []).append(name)

    cfg = base.config
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _config_int(cfg, "num_attention_heads", "n_head")
    return Anatomy(
        model_type=getattr(cfg, "model_type", type(base).__name__),
        block_path=block_path,
        n_blocks=len(blocks),
        attention_columns=attention,
        mlp_columns=mlp,
        other_columns=other,
        norm_columns=norms,
        linear=linear,
        params=params,
        embedding_modules=emb_names,
        head_module=head_name,
        tied=tied,
        final_norms=final_norms,
        hidden_size=hidden,
        intermediate_size=_config_int(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab_size=_config_int(cfg, "vocab_size"),
        n_heads=heads,
        n_kv_heads=_config_int(cfg, "num_key_value_heads", default=heads),
        module_params=module_params,
    )

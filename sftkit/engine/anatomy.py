"""Model anatomy by introspection: embeddings, the repeated blocks and what is inside them.

``inspect_model`` reads a loaded torch model and returns the plain record
``sftkit.core.anatomy.Anatomy`` (re-exported here with ``LinearInfo`` and ``ParamInfo``).

Works from the module tree and parameter names of any causal LM (Llama/SmolLM, Qwen2,
Mistral, GPT-2, Phi-style), full precision, 4-bit or already wrapped by peft. No table
of model types: the blocks are the largest ModuleList of identical modules; inside a
block, linear-like modules (nn.Linear, bitsandbytes layers, GPT-2's Conv1D) are the
columns, grouped as attention or MLP by their path; norms are found by class name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.anatomy import Anatomy, LinearInfo, ParamInfo, anatomy_numbers

__all__ = ["Anatomy", "LinearInfo", "ParamInfo", "anatomy_numbers", "base_model_of", "find_blocks", "inspect_model",
           "logical_numel", "weights_format"]

_PEFT_INNER = (".base_layer", ".lora_", ".lora_dropout", ".lora_magnitude", ".modules_to_save", ".original_module",
               ".lora_embedding")


def base_model_of(model) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def weights_format(model, anatomy: Anatomy | None = None) -> str:
    """How the model's weights are stored, in ``core.memory.WEIGHT_FORMATS`` terms."""
    anatomy = anatomy or inspect_model(model)
    if any(li.quantized for li in anatomy.linear.values()):
        return "4bit" if any(getattr(q, "quant_state", None) is not None for q in model.parameters()) else "8bit"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


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
    emb_names, head_name, tied = _embeddings_and_head(base, modules, block_path)
    columns, linear = _block_modules(modules, block_path)
    final_norms = [n for n, m in modules.items()
                   if "norm" in type(m).__name__.lower() and not n.startswith(block_path + ".")
                   and not any(t in n for t in _PEFT_INNER)]
    params, module_params = _params(base, block_path, columns["norm"], emb_names, head_name, final_norms)
    cfg = base.config
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _config_int(cfg, "num_attention_heads", "n_head")
    return Anatomy(
        model_type=getattr(cfg, "model_type", type(base).__name__),
        block_path=block_path,
        n_blocks=len(blocks),
        attention_columns=columns["attention"],
        mlp_columns=columns["mlp"],
        other_columns=columns["other"],
        norm_columns=columns["norm"],
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
        # peft sizes a prefix from these too (utils.other._prepare_prompt_learning_config): the widest head
        head_dim=_config_int(cfg, "global_head_dim", "head_dim", default=None),
    )


def _embeddings_and_head(base: nn.Module, modules: dict, block_path: str) -> tuple[list[str], str | None, bool]:
    """Embedding module names, the output head's name and whether the head is the embedding matrix."""
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
    return emb_names, head_name, tied


def _block_modules(modules: dict, block_path: str) -> tuple[dict[str, list[str]], dict[tuple[int, str], LinearInfo]]:
    """The columns inside a block by kind ("attention", "mlp", "other", "norm") and every block's linears."""
    columns: dict[str, list[str]] = {"attention": [], "mlp": [], "other": [], "norm": []}
    linear: dict[tuple[int, str], LinearInfo] = {}
    for name, mod in modules.items():
        if not name.startswith(block_path + ".") or any(t in name for t in _PEFT_INNER):
            continue
        idx, _, column = name[len(block_path) + 1:].partition(".")
        if not column or not idx.isdigit():
            continue
        inner = mod.base_layer if hasattr(mod, "base_layer") else mod
        if _is_linear(mod) or (inner is not mod and _is_linear(inner)):
            fin, fout = _linear_shape(mod)
            w = inner.weight
            kind = _kind_from_path(column)
            bucket = columns[kind]
            if column not in bucket:
                bucket.append(column)
            bias = getattr(inner, "bias", None)
            linear[(int(idx), column)] = LinearInfo(
                name, int(idx), column, kind, fin, fout,
                logical_numel(w) + (bias.numel() if bias is not None else 0),
                quantized=getattr(w, "quant_state", None) is not None or w.dtype in (torch.uint8, torch.int8),
                conv1d=type(inner).__name__ == "Conv1D")
        elif "norm" in type(mod).__name__.lower() and column not in columns["norm"]:
            columns["norm"].append(column)
    return columns, linear


def _params(base: nn.Module, block_path: str, norms: list[str], emb_names: list[str], head_name: str | None,
            final_norms: list[str]) -> tuple[dict[str, ParamInfo], dict[str, list[str]]]:
    """Every base-model parameter (adapter parameters left out) and the parameter names of each module."""
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
            kind = "norm" if column in norms else _kind_from_path(column)
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
    return params, module_params

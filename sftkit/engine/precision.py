"""Frozen weights in bf16, everything else in fp32: the CPU training path on CPUs with native bf16.

On a CPU with AVX512-BF16 or AMX, a bf16 matmul runs about twice as fast as an fp32 one
(benchmarks/matmul_dtypes.py), and a frozen weight stored in bf16 takes half the memory. Turning the
whole model to bf16 would also put the residual stream, the norms and the adapters in bf16, where an
adapter's small early change is rounded away (measured: the loss fell about half as fast over the first
steps). So only the matmuls of frozen weights run in bf16: each frozen ``nn.Linear`` (and ``nn.Embedding``)
(and transformers' ``Conv1D``) keeps its weight in bf16, casts its input to bf16 and its output back to
fp32. Adapters, norms, attention and the loss stay fp32, and the loss curve follows the fp32 one
(tests/test_precision.py). Runs use it for adapter plans only: a plan that trains weights in place saves
the whole model, whose frozen weights must leave the run unrounded.

What backward keeps of an SFT step (the activations) is stored in bf16 too (``saved_in``): the forward
itself stays fp32, each saved fp32 tensor is kept as a bf16 copy and read back as fp32 when backward needs
it; the loss's own saved tensors (log-softmax at the trained positions) stay fp32 (``kept_as_is``). On the
default model it cut a 2,128-token pass's peak RSS from 4.8 to 3.3 GiB for about 12% more step time
(measured). DPO/KTO runs (TRL's trainer) keep fp32 activations.
"""

from __future__ import annotations

FROZEN_MARK = "_sftkit_frozen_dtype"


def _to_weight_dtype(module, args, kwargs):
    x = args[0]
    if x.is_floating_point() and x.dtype != module.weight.dtype:
        x = x.to(module.weight.dtype)
    return (x, *args[1:]), kwargs


def _to_activation_dtype(module, args, output):
    return output.to(getattr(module, FROZEN_MARK + "_out"))


def _matmul_types() -> tuple:
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (nn.Linear, nn.Embedding)
    return (nn.Linear, nn.Embedding, Conv1D)


def frozen_matmul_modules(model):
    """The ``nn.Linear``, ``Conv1D`` and ``nn.Embedding`` modules none of whose own parameters train."""
    types = _matmul_types()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                found.append((name, module))
    return found


def store_frozen_in(model, dtype: str = "bfloat16", activations: str = "float32") -> int:
    """Store each frozen linear and embedding weight of ``model`` in ``dtype``, computing those matmuls in
    ``dtype`` with ``activations`` in and out. Call it after the adapter or plan has set what trains.
    Returns how many modules changed; a module already changed is left as it is.

    A weight shared by two modules (a head tied to the embeddings) changes once and stays shared."""
    import torch

    weight_dtype = getattr(torch, dtype)
    out_dtype = getattr(torch, activations)
    changed = 0
    for _, module in frozen_matmul_modules(model):
        if getattr(module, FROZEN_MARK, None) is not None:
            continue
        module.to(weight_dtype)
        setattr(module, FROZEN_MARK, dtype)
        setattr(module, FROZEN_MARK + "_out", out_dtype)
        if not isinstance(module, torch.nn.Embedding):  # an embedding's input is token ids
            module.register_forward_pre_hook(_to_weight_dtype, with_kwargs=True)
        module.register_forward_hook(_to_activation_dtype)
        changed += 1
    if changed:
        setattr(model, FROZEN_MARK, dtype)
        _own_the_rest(model, weight_dtype)
    return changed


def _own_the_rest(model, converted) -> None:
    """Copy the parameters and buffers left as they were (norms, adapters, weights trained in place) into
    memory of their own. A model is loaded as views of its memory-mapped weights file, and one view alive
    keeps the whole mapping, whose pages the conversion read, resident: 0.5 GB more RSS on the default
    model until this copy (measured). Call before an optimizer holds the parameters."""
    seen: set[int] = set()
    copies: dict[int, object] = {}  # a buffer shared by several modules gets one copy, shared again
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen and param.dtype != converted:
                seen.add(id(param))
                param.data = param.data.clone()
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                if id(buffer) not in copies:
                    copies[id(buffer)] = (buffer, buffer.clone())  # the original kept: its id stays unique
                module._buffers[name] = copies[id(buffer)][1]


SMALLEST_SAVED = 4096  # values: smaller saved tensors are kept as they are (the copy would cost more)


class saved_in:
    """Context for one forward (and its backward): autograd keeps each saved fp32 activation of ``model``'s
    forward as a ``dtype`` copy, read back as fp32 by backward. Parameters, integer tensors and small
    tensors are kept as they are. A tensor saved by several operations (a norm's output read by the q, k
    and v adapters) is copied once: the copy is found again while that very tensor is alive and unchanged."""

    def __init__(self, model, dtype: str = "bfloat16"):
        import torch

        self.dtype = getattr(torch, dtype)
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)
        self._copies: dict = {}

    def pack(self, tensor):
        import weakref

        import torch

        if (tensor.dtype != torch.float32 or tensor.numel() < SMALLEST_SAVED
                or tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size()  # broadcast
                or tensor.untyped_storage().data_ptr() in self.params):
            return tensor
        key = id(tensor)
        found = self._copies.get(key)
        if found is not None and found[0]() is tensor and found[1] == tensor._version:
            packed = found[2]()
            if packed is not None:
                return packed
        packed = _Packed(tensor.detach().to(self.dtype), tensor.dtype)
        # weak on both sides: the cache never keeps a copy autograd has let go of during backward
        self._copies[key] = (weakref.ref(tensor), tensor._version, weakref.ref(packed))
        return packed

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._copies.clear()
        return self.hooks.__exit__(*exc)


class _Packed:
    __slots__ = ("tensor", "dtype", "__weakref__")

    def __init__(self, tensor, dtype):
        self.tensor, self.dtype = tensor, dtype


def unpack(saved):
    """A saved tensor as backward reads it (``saved_in``'s copies back in their own dtype)."""
    return saved.tensor.to(saved.dtype) if isinstance(saved, _Packed) else saved


def kept_as_is():
    """Context inside ``saved_in`` where autograd keeps saved tensors as they are (the loss's log-softmax)."""
    import torch

    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def _same(tensor):
    return tensor


def frozen_dtype_of(model) -> str | None:
    """The dtype ``store_frozen_in`` gave ``model``'s frozen matmuls, or None."""
    return getattr(model, FROZEN_MARK, None)


__all__ = ["store_frozen_in", "frozen_matmul_modules", "frozen_dtype_of", "saved_in", "kept_as_is", "unpack"]

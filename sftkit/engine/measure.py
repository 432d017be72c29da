"""Measure the memory of one real training step, to check an estimate against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeasuredMemory:
    weights: int  # bytes of all parameters as stored
    gradients: int
    optimizer: int  # AdamW state tensors
    activations: int  # distinct non-parameter storages autograd saved in the forward pass


def measure_training_step(model, batch_size: int, seq_len: int, *, vocab_limit: int | None = None,
                          seed: int = 0, trained_per_row: int | None = None,
                          saved_dtype: str | None = None) -> MeasuredMemory:
    """Run forward, backward and one AdamW step on random token ids and count tensor bytes.

    Activations are what autograd keeps for backward (saved-tensor hooks), each storage
    counted once and parameters left out, and only what is still kept when the forward ends (a graph
    built and dropped inside the forward, as DoRA's detached weight norm, keeps nothing): the quantity an
    activation estimate predicts.
    trained_per_row: only the last this-many tokens of each row train, and the loss is sftkit's
    (the head at trained positions only); None: every token trains, the model's own loss.
    saved_dtype: backward's activations kept in this dtype as a run does (``precision.saved_in``); the
    bytes counted are the kept copies.
    """
    import weakref

    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list = []  # (a weak reference to what autograd holds, its storage's address and size)

    from .precision import saved_in, unpack

    keep = saved_in(model, saved_dtype) if saved_dtype else None

    def pack(t):
        kept = keep.pack(t) if keep is not None else t
        st = (kept if torch.is_tensor(kept) else kept.tensor).untyped_storage()
        if st.data_ptr() not in params:
            saved.append((weakref.ref(kept), st.data_ptr(), st.nbytes()))
        return kept

    vocab = vocab_limit or model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if trained_per_row is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            from .fast import trained_positions_loss

            labels = ids.clone()
            labels[:, : max(seq_len - trained_per_row, 0)] = -100
            loss = trained_positions_loss(model, {"input_ids": ids, "labels": labels, "use_cache": False})
    kept_now = {(ptr, nbytes) for ref, ptr, nbytes in saved if ref() is not None}  # still held for backward
    loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0)
    opt.zero_grad(set_to_none=True)
    return MeasuredMemory(weights, grads, states, sum(nbytes for _, nbytes in kept_now))

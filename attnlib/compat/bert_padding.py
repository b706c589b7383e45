"""flash_attn.bert_padding's helpers, which code calling the varlen functions imports beside them
(transformers' flash-attention path among others): padded (batch, seqlen, ...) tensors to packed
(total_tokens, ...) ones with the index and cu_seqlens that flash_attn_varlen_func takes, and back.

Signatures and return values as flash_attn 2.6: unpad_input returns five values (the last, the
tokens of each row that attention_mask alone selects). Gradients flow through every function;
the gathers use index_select / index_copy, whose backward adds to each destination once (the
indices are unique), so it is deterministic on every device.
"""
from __future__ import annotations

import torch


def _check_indices(indices) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be a 1-D int32/int64 tensor, got {getattr(indices, 'shape', type(indices))}")


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[indices] along the first axis: (first_axis, ...) -> (len(indices), ...)."""
    _check_indices(indices)
    return torch.index_select(x, 0, indices.long())


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A (first_axis_dim, ...) tensor of zeros with values at rows indices."""
    _check_indices(indices)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows for {indices.shape[0]} indices")
    out = values.new_zeros(first_axis_dim, *values.shape[1:])
    return out.index_copy(0, indices.long(), values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen), nonzero where a token is
    real. unused_mask (optional, same shape): tokens packed too but not counted as used.
    Returns (packed (total, ...), indices into batch * seqlen (int64), cu_seqlens (batch + 1,)
    int32, max_seqlen (int), used_seqlens (batch,) int32)."""
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    kept = attention_mask.bool()
    if unused_mask is not None:
        if tuple(unused_mask.shape) != tuple(attention_mask.shape):
            raise ValueError(f"unused_mask must have attention_mask's shape {tuple(attention_mask.shape)}, "
                             f"got {tuple(unused_mask.shape)}")
        kept = kept | unused_mask.bool()
    lengths = kept.sum(dim=1, dtype=torch.int32)
    used = attention_mask.bool().sum(dim=1, dtype=torch.int32)
    indices = kept.flatten().nonzero().flatten()
    cu_seqlens = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: packed (total, ...) -> (batch, seqlen, ...), zeros at the
    positions indices does not name."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])


__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input"]

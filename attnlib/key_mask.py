"""Key masks for method flash: which keys every query of a batch element (and head) may see (a
text prompt's padding, as HunyuanVideo's joint attention or LTX-Video's cross-attention pass it),
or a per-key additive bias.

A key mask is a tensor of shape (B or 1, Sk), the same for every head, or (B or 1, Hq or 1, Sk),
one per query head (torch SDPA's attn_mask of shape (B, Hq, 1, Sk); with GQA the heads are the
query heads): bool (True = attend, as torch SDPA's bool attn_mask) or floating point (added to
scale * q . k before the softmax, as SDPA's float attn_mask; -inf masks a key). It is the same for
every query row. The kernels read it as ``key_bias``: float32 (B or 1, Hq or 1, Sk) contiguous,
0 / -inf for a bool mask. A query row that sees no key (every key masked) gives output 0 and lse
-inf, as rows with no visible key do under causal masking, and no gradient (torch 2.13's SDPA gives
0 there too). A large bias shared by all of a row's visible keys (-1e4 on every key of a row, as
LTX-Video's additive mask gives an all-padding prompt) moves that row's lse by as much: kernels
that re-form P from the saved lse in the backward (flash-triton, in base 2) then carry about
|bias| * 2^-23 relative error in P (fp32: ~1e-3 at 1e4; below fp16/bf16 rounding).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .inputs import AttentionInputs


def check_key_mask(mask: Any, inp: AttentionInputs) -> Optional[torch.Tensor]:
    """The option's validation: None, or a (B or 1, Sk) / (B or 1, Hq or 1, Sk) bool / floating
    tensor on the inputs' device that needs no gradient (no gradient flows into it)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"key_mask must be bool (True = attend) or floating point (added to the scores), "
                        f"got {mask.dtype}")
    b, h, sk = inp.batch, inp.heads_q, inp.seq_k
    ok = (mask.dim() in (2, 3) and mask.shape[-1] == sk and mask.shape[0] in (1, b)
          and (mask.dim() == 2 or mask.shape[1] in (1, h)))
    if not ok:
        raise ValueError(f"key_mask must have shape ({b} or 1, {sk}) (batch, keys) or ({b} or 1, {h} or 1, {sk}) "
                         f"(batch, query heads, keys), got {tuple(mask.shape)}")
    if mask.device != inp.device:
        raise ValueError(f"key_mask must be on {inp.device}, got {mask.device}")
    refuse_mask_gradient(mask)
    return mask


def refuse_mask_gradient(mask: Any) -> None:
    """A ValueError for a key mask that requires grad where autograd records: attnlib gives it no
    gradient, which a learned bias would silently miss. Asked by the public call before anything
    runs (check_key_mask runs again inside attnlib's op, where grad mode is off)."""
    if isinstance(mask, torch.Tensor) and mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("key_mask must not require grad: attnlib gives no gradient for it (detach it, or use "
                         "torch's scaled_dot_product_attention for a learned bias)")


def per_head(mask: torch.Tensor) -> torch.Tensor:
    """A key mask as a (B or 1, Hq or 1, Sk) view (a 2-D one is the same for every head)."""
    return mask[:, None, :] if mask.dim() == 2 else mask


def key_bias(inp: AttentionInputs) -> Optional[torch.Tensor]:
    """The call's key mask as the kernels read it: float32 (B or 1, Hq or 1, Sk) contiguous, added
    to scale * q . k (natural-log units: kernels working in exp2 multiply it by log2(e)); None
    without a mask."""
    mask = inp.options.get("key_mask")
    return None if mask is None else bias_from_mask(per_head(mask))


def bias_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A key mask as float32 scores to add, of its shape, with row-major strides (size-1 dims
    too: torch counts a tensor with any stride there as contiguous, and the kernels step by
    them): 0 / -inf for bool, the values for floating."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        bias = torch.where(mask, zero, torch.full_like(zero, float("-inf")))
    else:
        bias = mask.detach().to(torch.float32)
    if bias.stride() != _row_major(bias.shape):
        bias = bias.clone(memory_format=torch.contiguous_format)
    return bias


def _row_major(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def key_only_mask(attn_mask: torch.Tensor, batch: int, heads: int, seq_k: int) -> Optional[torch.Tensor]:
    """torch SDPA's attn_mask (broadcast to (B, Hq, Sq, Sk)) as a key mask when it is one: the
    same for every query row (size 1 there); (B or 1, Sk) when also the same for every head,
    else (B or 1, Hq, Sk). None for any other mask, which attnlib does not serve."""
    if attn_mask.dim() > 4 or attn_mask.dim() < 2 or attn_mask.shape[-1] != seq_k:  # torch refuses 0-D / 1-D
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[2] != 1 or shape[0] not in (1, batch) or shape[1] not in (1, heads):
        return None
    mask = attn_mask.reshape(shape[0], shape[1], seq_k)
    return mask[:, 0] if shape[1] == 1 else mask

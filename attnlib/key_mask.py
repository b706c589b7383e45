"""Key masks for method flash: which keys every query of a batch element may see (a text prompt's
padding, as HunyuanVideo's joint attention passes it), or a per-key additive bias.

A key mask is a tensor of shape (B or 1, Sk): bool (True = attend, as torch SDPA's bool
attn_mask) or floating point (added to scale * q . k before the softmax, as SDPA's float
attn_mask; -inf masks a key). It is the same for every head and every query row. The kernels
read it as ``key_bias``: float32 (B or 1, Sk) contiguous, 0 / -inf for a bool mask. A query row
that sees no key (every key masked) gives output 0 and lse -inf, as rows with no visible key do
under causal masking, and no gradient (torch 2.13's SDPA gives 0 there too).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .inputs import AttentionInputs


def check_key_mask(mask: Any, inp: AttentionInputs) -> Optional[torch.Tensor]:
    """The option's validation: None, or a (B or 1, Sk) bool / floating tensor on the inputs'
    device that needs no gradient (no gradient flows into it)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"key_mask must be bool (True = attend) or floating point (added to the scores), "
                        f"got {mask.dtype}")
    want = f"({inp.batch} or 1, {inp.seq_k})"
    if mask.dim() != 2 or mask.shape[1] != inp.seq_k or mask.shape[0] not in (1, inp.batch):
        raise ValueError(f"key_mask must have shape {want} (batch, keys), got {tuple(mask.shape)}")
    if mask.device != inp.device:
        raise ValueError(f"key_mask must be on {inp.device}, got {mask.device}")
    if mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("key_mask must not require grad: attnlib gives no gradient for it (detach it, or use "
                         "torch's scaled_dot_product_attention for a learned bias)")
    return mask


def key_bias(inp: AttentionInputs) -> Optional[torch.Tensor]:
    """The call's key mask as the kernels read it: float32 (B or 1, Sk) contiguous, added to
    scale * q . k (natural-log units: kernels working in exp2 multiply it by log2(e)); None
    without a mask."""
    mask = inp.options.get("key_mask")
    return None if mask is None else bias_from_mask(mask)


def bias_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A key mask as float32 scores to add: 0 / -inf for bool, the values for floating."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        return torch.where(mask, zero, torch.full_like(zero, float("-inf"))).contiguous()
    return mask.detach().to(torch.float32).contiguous()


def key_only_mask(attn_mask: torch.Tensor, batch: int, seq_k: int) -> Optional[torch.Tensor]:
    """torch SDPA's attn_mask (broadcast to (B, H, Sq, Sk)) as a key mask (B or 1, Sk) when it is
    one: the same for every head and query row (sizes 1 there). None for any other mask, which
    attnlib does not serve."""
    if attn_mask.dim() > 4 or attn_mask.dim() < 2 or attn_mask.shape[-1] != seq_k:  # torch refuses 0-D / 1-D
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch):
        return None
    return attn_mask.reshape(shape[0], seq_k)

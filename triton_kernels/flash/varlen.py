"""Varlen flash on the same Triton kernels: packed (total, heads, head_dim) tensors are viewed
as (1, heads, total, head_dim) and each program finds its sequence through cu_seqlens."""
from __future__ import annotations

import torch

from .autograd import flash_attn_func
from .common import Varlen


def packed_to_bhsd(x: torch.Tensor) -> torch.Tensor:
    """(total, heads, d) -> (1, heads, total, d) view, no copy."""
    return x.unsqueeze(0).transpose(1, 2)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, Hq, Dv), lse (Hq, total_q) float32); inputs already validated."""
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))

    def new_output() -> torch.Tensor:
        return packed_to_bhsd(torch.empty(q.shape[:2] + (v.shape[2],), dtype=q.dtype, device=q.device))

    out, lse = flash_attn_func(packed_to_bhsd(q), packed_to_bhsd(k), packed_to_bhsd(v), causal=causal,
                               scale=scale, new_output=new_output, varlen=varlen)
    return out.transpose(1, 2).squeeze(0), lse

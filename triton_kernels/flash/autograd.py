"""torch.autograd.Function over the Triton flash kernels (dense bhsd and packed varlen).

Saves q, k, v, o and lse only (nothing N x N). lse is differentiable too: its gradient folds
into the backward's delta term at no extra cost. An optional key bias (float32 (B or 1, Sk), or
(B or 1, Hq or 1, Sk) per query head, added to scale * q . k) is saved too and gets no gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .backward import flash_bwd
from .common import Varlen
from .forward import flash_fwd


def lse_like(q: torch.Tensor, varlen: Optional[Varlen]) -> torch.Tensor:
    """float32 lse: (B, Hq, Sq) dense, (Hq, total_q) varlen (q is then the (1, Hq, total_q, D) view)."""
    if varlen is not None:
        return torch.empty(q.shape[1], q.shape[2], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, new_output: Callable[[], torch.Tensor],
                varlen: Optional[Varlen], key_bias: Optional[torch.Tensor]):
        out = new_output()
        lse = lse_like(q, varlen)
        flash_fwd(q, k, v, out, lse, causal=causal, scale=scale, varlen=varlen, key_bias=key_bias)
        ctx.save_for_backward(q, k, v, out, lse, key_bias)
        ctx.causal, ctx.scale, ctx.varlen = causal, scale, varlen
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, key_bias = ctx.saved_tensors
        dq, dk, dv = flash_bwd(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale, varlen=ctx.varlen,
                               dlse=dlse, key_bias=key_bias)
        return dq, dk, dv, None, None, None, None, None


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                    new_output: Optional[Callable[[], torch.Tensor]] = None,
                    varlen: Optional[Varlen] = None,
                    key_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for bhsd views q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); differentiable in q, k, v.

    new_output allocates the bhsd output view (default: contiguous bhsd like q). key_bias (dense
    only): float32 (B or 1, Sk), added to scale * q . k for every head and query row, or
    (B or 1, Hq or 1, Sk), query head h's bias added to that head's every row (natural-log units,
    as torch SDPA's float attn_mask of shape (B, Hq, 1, Sk)); a dimension of 1 is broadcast, and
    a row whose keys are all -inf gives 0 and lse -inf.
    """
    if new_output is None:
        def new_output():
            return torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    return FlashAttnFunction.apply(q, k, v, causal, scale, new_output, varlen, key_bias)

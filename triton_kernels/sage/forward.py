"""SageAttention forward orchestration on Triton: quantize K (its token mean from block sums,
subtracted inside the quantization), Q (scale and log2(e) folded in, lse correction fused) and,
for fp8 PV, V (its channel max likewise); then the attention kernel. Launches and traffic per
token: quant.py's docstring."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .attention import sage_fwd
from .quant import quantize_k, quantize_q, quantize_v_fp8

LOG2E = math.log2(math.e)


def sage_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                 smooth_k: bool, pv: str, q_block: int, k_block: int, return_lse: bool,
                 new_output: Optional[Callable[[], torch.Tensor]] = None):
    """q, k, v bhsd views (last stride 1). Returns (out bhsd in q's dtype, lse (B, Hq, Sq) fp32
    natural log for the unsmoothed scores, or None). The caller's tensors are only read."""
    batch, heads_q, seq_q, _ = q.shape
    out = new_output() if new_output is not None else torch.empty(
        batch, heads_q, seq_q, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0 and lse is None:
        return out, lse
    if k.shape[2] == 0:  # no keys: every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    k_int8, delta_k, k_mean = quantize_k(k, k_block, smooth_k)
    want_shift = return_lse and smooth_k
    q_int8, delta_q, shift = quantize_q(q, q_block, scale * LOG2E, k_mean if want_shift else None, scale)
    v_in, delta_v = quantize_v_fp8(v) if pv == "fp8" else (v, None)
    sage_fwd(q_int8, k_int8, v_in, delta_q, delta_k, out, causal=causal, q_block=q_block, k_block=k_block,
             pv=pv, delta_v=delta_v, lse=lse, lse_shift=shift)
    return out, lse

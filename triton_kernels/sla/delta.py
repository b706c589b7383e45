"""The SLA backward's delta = rowsum(dO * O_s) from the saved output, without re-walking the
critical blocks.

The op returns out = O_s + O_l W^T + b, so O_s = out - O_l W^T - b and, with G = dO W,
  delta_r = dO_r . out_r - G_r . O_l,r - dO_r . b,
where G_r . O_l,r comes per row from the linear branch's dq kernel (sla_linear_dq).
FlashAttention-2 forms delta from its saved (16-bit) output the same way; here the saved output
also carries the linear branch and the bias, which are subtracted again in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import row_tile
from .classify import padded
from ..hostmath import cdiv


@triton.jit(do_not_specialize=["seq_q"])
def sla_delta_kernel(
    DO, OUT, GOL, BIAS, DELTA,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    seq_q,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_GOL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid (query tiles, query heads, batch). DO, OUT: bhsd strides, any float dtype; GOL
    (B, Hq, Sq) fp32 = G . O_l per row (read with HAS_GOL); BIAS (D,) contiguous (read with HAS_BIAS);
    DELTA (B, Hq, Sq) fp32 contiguous."""
    pid_m = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(1)
    start_m = pid_m * BLOCK_M
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_i
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    tile_mask = m_ok[:, None] & d_ok[None, :]
    b_do = tl.load(row_tile(DO + b64 * stride_dob + h64 * stride_doh, start_m, offs_i, offs_d, stride_dom, stride_dod),
                   mask=tile_mask, other=0.0).to(tl.float32)
    b_out = tl.load(row_tile(OUT + b64 * stride_ob + h64 * stride_oh, start_m, offs_i, offs_d, stride_om, stride_od),
                    mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_out -= tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    delta = tl.sum(b_do * b_out, 1)
    rows = (b64 * heads + h64) * seq_q + offs_m
    if HAS_GOL:
        delta -= tl.load(GOL + rows, mask=m_ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=m_ok)


def sla_delta(dout: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor],
              gol: Optional[torch.Tensor] = None) -> torch.Tensor:
    """delta (B, Hq, Sq) fp32 for bhsd views dout, out (unit last stride); gol = G . O_l per row
    (fp32 (B, Hq, Sq)) with the linear branch, else None; bias (D,) of any stride, or None."""
    batch, heads, seq_q, d = out.shape
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    d_pad = padded(d)
    block_m = max(16, min(128, 8192 // d_pad))
    sla_delta_kernel[(cdiv(seq_q, block_m), heads, batch)](
        dout, out, gol if gol is not None else delta, bias.contiguous() if bias is not None else out, delta,
        *dout.stride(), *out.stride(), seq_q,
        HEAD_DIM=d, D_PAD=d_pad, HAS_GOL=gol is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        num_warps=4)
    return delta

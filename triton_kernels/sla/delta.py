"""The SLA backward's delta = rowsum(dO * O_s) from the saved output, without re-walking the
critical blocks.

The op returns out = O_s + O_l W^T + b, so O_s = out - O_l W^T - b and, with G = dO W,
  delta_r = dO_r . out_r - G_r . O_l,r - dO_r . b,
where G_r . O_l,r comes per row from the linear branch's dq kernel (sla_linear_dq).
FlashAttention-2 forms delta from its saved (16-bit) output the same way; here the saved output
also carries the linear branch and the bias, which are subtracted again in fp32. Where those
outweigh O_s, the 16-bit output's rounding (relative to |out|, not |O_s|) is what is left of
O_s: in fp16 with |b| ~ 100 against |O_s| ~ 1, dq and dk came out 60x less accurate than the
float64 reference's formula in fp16 (a review's probe). So for a 16-bit output the kernel also
flags each row whose rounding costs delta more than RECOMPUTE_RATIO times what O_s's own would
(sum |dO| |out| > RECOMPUTE_RATIO * sum |dO| |O_s|, with O_s = out - O_l W^T - b), and the
backward re-walks the critical blocks of the query tiles holding a flagged row for their exact
delta (attention.py; forward.sla_fwd with redo). With a projection of the usual size nothing is
flagged and that launch walks no block.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import row_tile
from .classify import padded
from ..hostmath import cdiv

# a row's delta is re-formed from the critical blocks where the output's rounding costs it more
# than this many times O_s's own rounding (the error FlashAttention-2's delta has). In fp16 the
# gradients met tests/test_sla_triton.py's rule without re-forming up to max |b| ~ 7 (GQA case,
# |O_s| well under 1) and failed at max |b| ~ 23; at 4 instead of 8, b ~ N(0, 1) against mean
# |out| ~ 0.2 (hd64, 256 tokens) flagged half the rows, so nearly every tile walked again
RECOMPUTE_RATIO = 8.0


@triton.jit(do_not_specialize=["seq_q"])
def sla_delta_kernel(
    DO, OUT, GOL, BIAS, DELTA, OL, W, REDO,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    seq_q, ratio,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_GOL: tl.constexpr, HAS_BIAS: tl.constexpr,
    FLAG: tl.constexpr, HAS_OL: tl.constexpr, HC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (query tiles, query heads, batch). DO, OUT: bhsd strides, any float dtype; GOL
    (B, Hq, Sq) fp32 = G . O_l per row (read with HAS_GOL); BIAS (D,) contiguous (read with HAS_BIAS);
    DELTA (B, Hq, Sq) fp32 contiguous. FLAG: REDO (B, Hq, Sq) int8 contiguous gets 1 where
    sum |dO| |out| > ratio * sum |dO| |O_s| (O_s = out - b, less O_l W^T with HAS_OL: OL
    (B, Hq, Sq, D) fp32 contiguous, W (D, D) contiguous, any float dtype), else 0."""
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
    do_base = DO + b64 * stride_dob + h64 * stride_doh
    out_base = OUT + b64 * stride_ob + h64 * stride_oh
    b_do = tl.load(row_tile(do_base, start_m, offs_i, offs_d, stride_dom, stride_dod),
                   mask=tile_mask, other=0.0).to(tl.float32)
    b_out = tl.load(row_tile(out_base, start_m, offs_i, offs_d, stride_om, stride_od),
                    mask=tile_mask, other=0.0).to(tl.float32)
    if FLAG:
        size_out = tl.sum(tl.abs(b_do) * tl.abs(b_out), 1)
    if HAS_BIAS:
        b_out -= tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    delta = tl.sum(b_do * b_out, 1)
    rows = (b64 * heads + h64) * seq_q + offs_m
    if HAS_GOL:
        delta -= tl.load(GOL + rows, mask=m_ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=m_ok)
    if FLAG:
        if HAS_OL:
            # O_s = out - b - O_l W^T, HC output columns at a time (W's rows cols)
            b_ol = tl.load(OL + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask, other=0.0)
            offs_c = tl.arange(0, HC)
            size_s = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in tl.static_range(0, D_PAD, HC):
                cols = c0 + offs_c
                c_ok = cols < HEAD_DIM
                w_c = tl.load(W + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                              other=0.0).to(tl.float32)
                c_mask = m_ok[:, None] & c_ok[None, :]
                do_c = tl.load(row_tile(do_base, start_m, offs_i, cols, stride_dom, stride_dod),
                               mask=c_mask, other=0.0).to(tl.float32)
                os_c = tl.load(row_tile(out_base, start_m, offs_i, cols, stride_om, stride_od),
                               mask=c_mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    os_c -= tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                os_c -= tl.dot(b_ol, tl.trans(w_c))
                size_s += tl.sum(tl.abs(do_c) * tl.abs(os_c), 1)
        else:
            size_s = tl.sum(tl.abs(b_do) * tl.abs(b_out), 1)
        tl.store(REDO + rows, (size_out > ratio * size_s).to(tl.int8), mask=m_ok)


def sla_delta(dout: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor],
              gol: Optional[torch.Tensor] = None, *, redo: Optional[torch.Tensor] = None,
              o_l: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """delta (B, Hq, Sq) fp32 for bhsd views dout, out (unit last stride); gol = G . O_l per row
    (fp32 (B, Hq, Sq)) with the linear branch, else None; bias (D,) of any stride, or None.
    redo (B, Hq, Sq) int8 contiguous, or None: gets 1 on the rows whose delta the output's rounding
    spoils (see the module's docstring), for which O_s needs o_l (fp32 (B, Hq, Sq, D) contiguous)
    and weight (D, D) with the linear branch."""
    batch, heads, seq_q, d = out.shape
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    if (o_l is None) != (weight is None) or (o_l is not None and redo is None):
        raise ValueError("sla_delta: o_l and weight go together, and only with redo")
    d_pad = padded(d)
    block_m = max(16, min(128, 8192 // d_pad))
    if o_l is not None:  # O_l's tile and a chunk of W besides dO and out
        block_m = min(block_m, 32)
    sla_delta_kernel[(cdiv(seq_q, block_m), heads, batch)](
        dout, out, gol if gol is not None else delta, bias.contiguous() if bias is not None else out, delta,
        o_l if o_l is not None else delta, weight.contiguous() if weight is not None else delta,
        redo if redo is not None else delta,
        *dout.stride(), *out.stride(), seq_q, RECOMPUTE_RATIO,
        HEAD_DIM=d, D_PAD=d_pad, HAS_GOL=gol is not None, HAS_BIAS=bias is not None, FLAG=redo is not None,
        HAS_OL=o_l is not None, HC=min(d_pad, 32), BLOCK_M=block_m, num_warps=4)
    return delta

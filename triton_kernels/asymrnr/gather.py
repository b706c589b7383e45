"""Row gathers and merges of AsymRnR reduce/restore in Triton.

gather_rows: out[b, h, i] = x[b, h, idx[b, h, i]] (reduce "replace", restore).
merge_rows:  out[b, h, j] = mean of x[b, h, i] over idx[b, h, i] == j (reduce "mean"), summed in
float32 with atomics and divided by the slot counts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..switches import interpreting
from ..hostmath import cdiv, next_power_of_2


@triton.jit(do_not_specialize=["n_rows"])
def gather_rows_kernel(
    X, IDX, OUT,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ib, stride_ih, stride_is,
    stride_ob, stride_oh, stride_os, stride_od,
    n_rows, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (row tiles, batch * heads)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = tl.load(IDX + b * stride_ib + h * stride_ih + offs_m * stride_is, mask=offs_m < n_rows, other=0)
    # rows are int64 (idx is). OUT's tile start in int64, int32 offsets inside the tile:
    # offs_m * stride_os passes 2**31 for a caller's out of bshd strides at long sequences
    # (int64 rows instead took 56 registers, not 48, on sm_90)
    b_x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                  mask=mask)
    m64 = (pid_m * BLOCK_M).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    tl.store(OUT + b * stride_ob + h * stride_oh + m64 * stride_os
             + (offs_i[:, None] * stride_os + offs_d[None, :] * stride_od), b_x.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def scatter_add_rows_kernel(
    X, IDX, ACC,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ib, stride_ih, stride_is,
    stride_ab, stride_ah, stride_as,
    n_rows, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """ACC[b, h, IDX[b, h, i]] += X[b, h, i] in float32; ACC is contiguous in its last dim."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < n_rows
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    slots = tl.load(IDX + b * stride_ib + h * stride_ih + offs_m * stride_is, mask=m_ok, other=0)
    # int64 rows: offs_m * stride_xs passes 2**31 for a bshd x at long sequences (an int64 tile
    # start with int32 offsets inside the tile took 96 registers, not 89, on sm_90)
    b_x = tl.load(X + b * stride_xb + h * stride_xh + offs_m[:, None].to(tl.int64) * stride_xs
                  + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(ACC + b * stride_ab + h * stride_ah + slots[:, None] * stride_as + offs_d[None, :], b_x,
                  mask=mask)


def _block_m(d_pad: int) -> int:
    if interpreting():
        return 16
    return max(8, min(64, 8192 // d_pad))


def gather_rows(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, S, D) any strides; idx (B, H, R) int64 with values < S. Returns out (B, H, R, D),
    allocated contiguous when not given."""
    B, H, _, D = x.shape
    R = idx.shape[2]
    if out is None:
        out = torch.empty(B, H, R, D, dtype=x.dtype, device=x.device)
    if B * H * R == 0 or D == 0:
        return out
    d_pad = next_power_of_2(D)
    block_m = _block_m(d_pad)
    grid = (cdiv(R, block_m), B * H)
    gather_rows_kernel[grid](x, idx, out, *x.stride(), *idx.stride(), *out.stride(), R, H,
                             HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m)
    return out


def merge_rows(x: torch.Tensor, idx: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Mean of the rows of x (B, H, S, D) sharing a slot idx (B, H, S) -> (B, H, n_slots, D) in x's dtype."""
    B, H, S, D = x.shape
    acc = torch.zeros(B, H, n_slots, D, dtype=torch.float32, device=x.device)
    counts = torch.zeros(B, H, n_slots, dtype=torch.float32, device=x.device)
    counts.scatter_add_(2, idx, torch.ones(idx.shape, dtype=torch.float32, device=x.device))
    if B * H * S > 0 and D > 0:
        d_pad = next_power_of_2(D)
        block_m = _block_m(d_pad)
        grid = (cdiv(S, block_m), B * H)
        scatter_add_rows_kernel[grid](x, idx, acc, *x.stride(), *idx.stride(), *acc.stride()[:3], S, H,
                                      HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m)
    return (acc / counts.unsqueeze(-1)).to(x.dtype)

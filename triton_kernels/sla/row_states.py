"""Every query block's marginal state at once, as one matrix product per head (opt-in,
ATTNLIB_SLA_ROW_STATES=1).

The fused kernels form H_i = sum of h_j over row i's marginal blocks per query tile, by the
"total minus" pre-aggregation: a tile reads min(marginal, non-marginal) D x D fp32 states. At the
Wan2.1-1.3B shape (512 x 512 blocks of 64, hd128, critical 0.05, negligible 0.10) that is 77 x 64 KB
= 4.9 MB per tile, about 30 GB per forward, several times the critical blocks' K/V traffic. Here
instead H = [classes == 0] @ h per (batch, query head): (Mq x Mk) 0/1 times (Mk x D*D) on the
tensor cores, written once (B * Hq * Mq * (D*D + D) * 4 bytes) and read once per tile. The 0/1
factor is exact in tf32, so the product has the kernels' own state precision (tf32 for 16-bit
inputs, tf32x3 for fp32). Which way is faster is the GPU benchmark's call (bench/bench_sla.py,
variant "row-states"); the default stays the issue's pre-aggregation.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .classify import interpreting


def row_states_enabled() -> bool:
    return os.environ.get("ATTNLIB_SLA_ROW_STATES", "0") == "1"


@triton.jit(do_not_specialize=["num_qb", "num_kb", "width"])
def row_states_kernel(
    CLS, S, OUT, num_qb, num_kb, width, group,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (query-block tiles, state-column tiles, batch * query heads). CLS (B, Hq, Mq, Mk)
    int8 contiguous; S (B, Hkv, Mk, width) fp32 contiguous; OUT (B, Hq, Mq, width) fp32:
    OUT[b, h, i] = sum over j with CLS[b, h, i, j] == 0 of S[b, h // group, j]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # b * Hq + h
    kv_row = bh // group  # = b * Hkv + h // group, as Hq = Hkv * group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < num_qb
    n_ok = offs_n < width
    cls_rows = CLS + (bh * num_qb + offs_m[:, None]) * num_kb
    s_base = S + kv_row * num_kb * width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, num_kb, BLOCK_K):
        cols = k0 + offs_k
        k_ok = cols < num_kb
        c = tl.load(cls_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=1)
        a = tl.where(c == 0, 1.0, 0.0)
        s = tl.load(s_base + cols[:, None] * width + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, s, acc, input_precision=PREC)
    tl.store(OUT + (bh * num_qb + offs_m[:, None]) * width + offs_n[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def _launch(classes: torch.Tensor, states: torch.Tensor, prec: str) -> torch.Tensor:
    batch, heads_q, mq, mk = classes.shape
    heads_kv = states.shape[1]
    width = states.shape[-1]
    out = torch.empty(batch, heads_q, mq, width, dtype=torch.float32, device=states.device)
    if out.numel() == 0:
        return out
    if interpreting():
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3)
    grid = (triton.cdiv(mq, cfg["BLOCK_M"]), triton.cdiv(width, cfg["BLOCK_N"]), batch * heads_q)
    row_states_kernel[grid](classes, states, out, mq, mk, width, heads_q // heads_kv, PREC=prec, **cfg)
    return out


def row_states(classes: torch.Tensor, h: torch.Tensor, z: torch.Tensor, prec: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H (B, Hq, Mq, D, D), Z (B, Hq, Mq, D)) fp32: each query block's sums of the key-block
    states h (B, Hkv, Mk, D, D) and z (B, Hkv, Mk, D) over its marginal blocks."""
    classes = classes.contiguous()
    batch, heads_q, mq, _ = classes.shape
    d = z.shape[-1]
    big = _launch(classes, h.reshape(*h.shape[:3], d * d).contiguous(), prec)
    small = _launch(classes, z.contiguous(), prec)
    return big.view(batch, heads_q, mq, d, d), small

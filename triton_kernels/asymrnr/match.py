"""AsymRnR matching in Triton: each program holds a tile of source rows and streams the
destination rows tile by tile, keeping a running best similarity and its index, so the
(sources x destinations) similarity matrix never reaches HBM. Rows are gathered through the
partition's index lists, so x is read in place (any strides, either layout)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

METRIC_IDS = {"euclidean": 0, "cosine": 1, "dot": 2}
COSINE_EPS = 1e-12  # as the reference's clamp on the norms


@triton.jit
def _load_rows(base, rows, stride_s, stride_d, offs_d, r_ok, d_ok):
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)


# sequence lengths vary per call: one compiled kernel for all
@triton.jit(do_not_specialize=["n_src", "n_dst"])
def match_kernel(
    X, SRC, DST, DNORM, NODE, SCORE,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_nb, stride_nh,
    stride_ob, stride_oh, stride_os,
    n_src, n_dst, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, METRIC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (source tiles, batch * heads). METRIC 0 euclidean, 1 cosine, 2 dot. DNORM holds per
    destination |d|^2 (euclidean) or 1 / |d| (cosine), computed once outside (unused for dot)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    x_base = X + b * stride_xb + h * stride_xh
    n_base = DNORM + b * stride_nb + h * stride_nh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < n_src
    d_ok = offs_d < HEAD_DIM

    src_rows = tl.load(SRC + offs_m, mask=m_ok, other=0)
    b_s = _load_rows(x_base, src_rows, stride_xs, stride_xd, offs_d, m_ok, d_ok)
    s32 = b_s.to(tl.float32)
    s_sq = tl.sum(s32 * s32, 1)
    if METRIC == 1:
        inv_s = 1.0 / tl.maximum(tl.sqrt(s_sq), 1e-12)

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(0, n_dst, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < n_dst
        dst_rows = tl.load(DST + cols, mask=n_ok, other=0)
        b_d = _load_rows(x_base, dst_rows, stride_xs, stride_xd, offs_d, n_ok, d_ok)
        dot = tl.dot(b_s, tl.trans(b_d), input_precision=PREC)
        if METRIC == 0:
            # |s|^2 is the same for every destination of a row: added back once at the end
            d_sq = tl.load(n_base + cols, mask=n_ok, other=0.0)
            sim = 2.0 * dot - d_sq[None, :]
        elif METRIC == 1:
            inv_d = tl.load(n_base + cols, mask=n_ok, other=0.0)
            sim = dot * inv_s[:, None] * inv_d[None, :]
        else:
            sim = dot
        sim = tl.where(n_ok[None, :], sim, float("-inf"))
        # one reduction for the value and its (leftmost) index, not a max and an argmax
        tile_best, tile_i = tl.max(sim, 1, return_indices=True, return_indices_tie_break_left=True)
        tile_i = tile_i.to(tl.int32) + start_n
        # strictly greater: an earlier tile wins ties, as torch's max/argmax does
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_i = tl.where(better, tile_i, best_i)
    if METRIC == 0:
        best = best - s_sq
    o_off = b * stride_ob + h * stride_oh + offs_m * stride_os
    tl.store(NODE + o_off, best_i.to(tl.int64), mask=m_ok)
    tl.store(SCORE + o_off, best, mask=m_ok)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32-level products (three tf32 passes), as the flash kernels do
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _config(head_dim_pad: int) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_M=16, BLOCK_N=16)
    # not tuned on hardware yet: tiles sized like the flash forward's for the same head dim
    if head_dim_pad <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _destination_norms(x: torch.Tensor, dst: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, H, n_dst) float32: |d|^2 for euclidean, 1 / max(|d|, eps) for cosine; a placeholder for
    dot. Once per call instead of once per (program, destination tile)."""
    if metric == "dot":
        return torch.empty(1, 1, 1, dtype=torch.float32, device=x.device)
    sq = x.index_select(2, dst).float().square().sum(-1)
    return sq if metric == "euclidean" else 1.0 / sq.sqrt().clamp_min(COSINE_EPS)


def match_fwd(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, metric: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x bhsd (last stride 1 not needed); src/dst int64 positions. Returns (node int64, score
    float32), both (B, H, n_src): the best destination index (into dst) and its similarity."""
    B, H, _, D = x.shape
    n_src, n_dst = src.numel(), dst.numel()
    node = torch.empty(B, H, n_src, dtype=torch.int64, device=x.device)
    score = torch.empty(B, H, n_src, dtype=torch.float32, device=x.device)
    if n_src == 0 or B * H == 0:
        return node, score
    if x.dtype == torch.float64:
        raise TypeError("the Triton matching kernel takes fp16, bf16 or fp32; use backend='torch' for fp64")
    d_pad = max(16, triton.next_power_of_2(D))
    cfg = _config(d_pad)
    dnorm = _destination_norms(x, dst, metric)
    grid = (triton.cdiv(n_src, cfg["BLOCK_M"]), B * H)
    match_kernel[grid](
        x, src.contiguous(), dst.contiguous(), dnorm, node, score,
        *x.stride(), dnorm.stride(0), dnorm.stride(1), *node.stride(),
        n_src, n_dst, H,
        HEAD_DIM=D, D_PAD=d_pad, METRIC=METRIC_IDS[metric], PREC=_dot_precision(x.dtype), **cfg,
    )
    return node, score

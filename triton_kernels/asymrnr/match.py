"""AsymRnR matching in Triton: each program holds a tile of source rows and streams the
destination rows tile by tile, keeping a running best similarity and its index, so the
(sources x destinations) similarity matrix never reaches HBM. Source rows are read in place
through the partition's index list (any strides, either layout); the destinations (an eighth of
the tokens at stride 2 x 2 x 2) are gathered once into a contiguous buffer that the loop streams."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import dot_precision
from ..switches import autotune_enabled, interpreting
from ..hostmath import cdiv, next_power_of_2
from ..stage_fallback import launch_fitting

METRIC_IDS = {"euclidean": 0, "cosine": 1, "dot": 2}
COSINE_EPS = 1e-12  # as the reference's clamp on the norms


@triton.jit
def _load_rows(base, rows, stride_s, stride_d, offs_d, r_ok, d_ok):
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)


# sequence lengths vary per call: one compiled kernel for all
@triton.jit(do_not_specialize=["n_src", "n_dst"])
def match_kernel(
    X, SRC, XD, DNORM, NODE, SCORE,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_db, stride_dh,
    stride_nb, stride_nh,
    stride_ob, stride_oh, stride_os,
    n_src, n_dst, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, METRIC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUNNING: tl.constexpr,
):
    """Grid (source tiles, batch * heads). METRIC 0 euclidean, 1 cosine, 2 dot. XD holds the
    destination rows gathered once (B, H, n_dst, HEAD_DIM), rows contiguous: the loop's loads are
    then affine, so the pipeliner keeps num_stages - 1 tiles in flight. With the gather inside the
    loop (an index load, then the rows it names), Triton 3.6 waited for every copy at the top of
    each iteration and issued the next tile's only after the dot: its latency was never hidden.
    DNORM holds per destination |d|^2 (euclidean) or 1 / |d| (cosine), computed once outside
    (unused for dot).

    RUNNING 0: each tile's row maximum and its index by one cross-thread reduction per tile.
    RUNNING 1: a running maximum per (row, column slot) kept elementwise in the accumulator's
    layout (no shuffles inside the loop), reduced once at the end; two more BLOCK_M x BLOCK_N
    register tiles. Both give the first destination of the row's maximum; the autotuner picks
    the faster on the GPU."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    x_base = X + b * stride_xb + h * stride_xh
    d_base = XD + b * stride_db + h * stride_dh
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
    if RUNNING:
        slot_best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        slot_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start_n in range(0, n_dst, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < n_dst
        b_d = tl.load(d_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                      other=0.0)
        if METRIC != 2:
            # loaded before the dot: after it, the wait on the tensor cores would expose its latency
            d_norm = tl.load(n_base + cols, mask=n_ok, other=0.0)
        dot = tl.dot(b_s, tl.trans(b_d), input_precision=PREC)
        if METRIC == 0:
            # |s|^2 is the same for every destination of a row: added back once at the end
            sim = 2.0 * dot - d_norm[None, :]
        elif METRIC == 1:
            sim = dot * inv_s[:, None] * d_norm[None, :]
        else:
            sim = dot
        sim = tl.where(n_ok[None, :], sim, float("-inf"))
        if RUNNING:
            # strictly greater: a slot keeps the earliest column of its maximum
            better = sim > slot_best
            slot_best = tl.where(better, sim, slot_best)
            slot_i = tl.where(better, cols[None, :], slot_i)
        else:
            # one reduction for the value and its (leftmost) index, not a max and an argmax
            tile_best, tile_i = tl.max(sim, 1, return_indices=True, return_indices_tie_break_left=True)
            tile_i = tile_i.to(tl.int32) + start_n
            # strictly greater: an earlier tile wins ties, as torch's max/argmax does
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_i = tl.where(better, tile_i, best_i)
    if RUNNING:
        best = tl.max(slot_best, 1)
        # the first column holding the maximum: the smallest index among the slots that reach it
        best_i = tl.min(tl.where(slot_best == best[:, None], slot_i, 2147483647), 1)
    if METRIC == 0:
        best = best - s_sq
    o_off = b * stride_ob + h * stride_oh + offs_m * stride_os
    tl.store(NODE + o_off, best_i.to(tl.int64), mask=m_ok)
    tl.store(SCORE + o_off, best, mask=m_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, RUNNING) for 16-bit inputs up to head dim 128, the
# first the default. Each compiles for sm_90 without spills (tests/triton_sm90.py); which is
# fastest is the GPU autotuner's call, keyed on head dim, metric and dtype.
CANDIDATES_16BIT = [(128, 64, 8, 3, 0), (128, 64, 8, 3, 1), (128, 128, 8, 3, 0), (128, 64, 8, 4, 1),
                    (64, 128, 4, 3, 0), (128, 128, 8, 3, 1)]
WIDE_OR_FP32 = (64, 32, 4, 2, 0)  # head dims above 128 and fp32 inputs: served for reach, not speed
INTERPRET = (16, 16, 1, 1, 0)
AUTOTUNE_KEY = ["HEAD_DIM", "D_PAD", "METRIC", "PREC"]


def _as_config(c: tuple) -> triton.Config:
    bm, bn, warps, stages, running = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "RUNNING": running}, num_warps=warps, num_stages=stages)


def candidates(d_pad: int, element_size: int) -> list[tuple]:
    if d_pad > 128 or element_size == 4:
        return [WIDE_OR_FP32]
    return list(CANDIDATES_16BIT)


def _prune(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
    wanted = candidates(d_pad, named_args["X"].element_size())
    by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["RUNNING"]): c
              for c in configs}
    return [by_key[w] for w in wanted]


def _all_configs() -> list[triton.Config]:
    if interpreting():
        return [_as_config(INTERPRET)]
    return [_as_config(c) for c in CANDIDATES_16BIT + [WIDE_OR_FP32]]


match_kernel_tuned = triton.autotune(configs=_all_configs(), key=AUTOTUNE_KEY,
                                     prune_configs_by={"early_config_prune": _prune})(match_kernel)


def _destination_norms(xd: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, H, n_dst) float32 of the gathered destinations: |d|^2 for euclidean, 1 / max(|d|, eps)
    for cosine; a placeholder for dot. Once per call instead of once per (program, destination tile)."""
    if metric == "dot":
        return torch.empty(1, 1, 1, dtype=torch.float32, device=xd.device)
    sq = xd.float().square().sum(-1)
    return sq if metric == "euclidean" else 1.0 / sq.sqrt().clamp_min(COSINE_EPS)


def match_fwd(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, metric: str, *,
              config: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    d_pad = max(16, next_power_of_2(D))
    # (B, H, n_dst, D) contiguous (the kernel walks its rows at stride D): an eighth of x at stride (2, 2, 2)
    xd = x.index_select(2, dst).contiguous()
    dnorm = _destination_norms(xd, metric)
    args = (x, src.contiguous(), xd, dnorm, node, score,
            *x.stride(), xd.stride(0), xd.stride(1), dnorm.stride(0), dnorm.stride(1), *node.stride(),
            n_src, n_dst, H)
    meta = dict(HEAD_DIM=D, D_PAD=d_pad, METRIC=METRIC_IDS[metric], PREC=dot_precision(x.dtype))
    named = config is not None
    if config is None and not autotune_enabled("asymrnr"):
        config = INTERPRET if interpreting() else candidates(d_pad, x.element_size())[0]
    if config is not None:  # one config: BLOCK_M, BLOCK_N, num_warps, num_stages, RUNNING
        bm, bn, warps, stages, running = config
        launch_fitting(match_kernel, (cdiv(n_src, bm), B * H), *args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                       RUNNING=running, num_warps=warps, num_stages=stages, stages_fixed=named)
    else:
        match_kernel_tuned[lambda m: (cdiv(n_src, m["BLOCK_M"]), B * H)](*args, **meta)
    return node, score

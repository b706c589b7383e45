"""Every query block's marginal state at once, as one matrix product per head, and the
backward's transpose (the default; ATTNLIB_SLA_ROW_STATES=0 pre-aggregates per tile instead).

The fused kernels form H_i = sum of h_j over row i's marginal blocks per query tile, by the
"total minus" pre-aggregation: a tile reads min(marginal, non-marginal) D x D fp32 states. At the
Wan2.1-1.3B shape (512 x 512 blocks of 64, hd128, critical 0.05, negligible 0.10) that is 77 x 64 KB
= 4.9 MB per tile, about 30 GB per forward, several times the critical blocks' K/V traffic. Here
instead H = [classes == 0] @ h per (batch, query head): (Mq x Mk) 0/1 times (Mk x D*D) on the
tensor cores, written once (B * Hq * Mq * (D*D + D) * 4 bytes) and read once per tile. The 0/1
factor is exact in bf16 and the fp32 states are split into bf16 pieces (split_dot), so the product
is at least as fine as the kernels' own state precision (tf32 for 16-bit inputs, tf32x3 for fp32).

The backward's dk/dv likewise folds, per key tile, phi(Q_i)^T dN_i over min(marginal,
non-marginal) query blocks (a D x BLOCK_M x D product each, ~1 TFLOP per backward at Wan). Here
instead dH_i = phi(Q_i)^T dN_i is formed once per query block and dh_j = sum over the marginal
(query head of the group, query block) pairs of dH_i is the transposed product
(column_states). This is the default (aggregation.py says when): on an H100 the per-tile
pre-aggregation (bench/bench_sla.py, variant "per-tile") took 1.40x the forward's time and 4.05x
the backward's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..switches import autotune_enabled, interpreting
from ..hostmath import cdiv
from ..stage_fallback import launch_fitting


@triton.jit
def split_dot(a, b, acc, TERMS: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b for a 0/1 matrix a and fp32 b, on 16-bit tensor cores: b is split into TERMS
    bf16 pieces (b = hi + lo (+ lo2) up to rounding: 2 terms keep 16 significant bits, finer than
    tf32's 11; 3 terms keep fp32's 24) and a (exact in bf16) multiplies each with fp32
    accumulation. EMULATE (the interpreter, whose bf16 tl.dot is wrong): the same pieces multiplied
    in fp32, which is exact for 0/1 times bf16. classify.split_product is its twin (why two:
    there)."""
    rest = b
    for _ in tl.static_range(TERMS):
        piece = rest.to(tl.bfloat16)
        rest = rest - piece.to(tl.float32)
        if EMULATE:
            acc = tl.dot(a.to(tl.float32), piece.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, piece, acc)
    return acc


@triton.jit(do_not_specialize=["rows", "inner"])
def masked_sum_kernel(
    CLS, S, OUT, rows, inner, width, group, cls_head, cls_sm, cls_sk, s_head,
    TERMS: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (row tiles, state-column tiles, output heads). For output head o (a flat batch-head
    index): OUT[o, m] = sum over k < inner of [CLS[o*cls_head + m*cls_sm + k*cls_sk] == 0] *
    S[(o // group)*s_head + k*width]. CLS int8, S fp32 (rows of width), OUT (heads, rows, width)
    fp32 contiguous. Forward: rows = query blocks, k = key blocks; backward: rows = key blocks,
    k = (query head of the group, query block).

    The products run as split_dot's bf16 pieces, not tf32: Hopper's tf32 wgmma takes only K-major
    operands, so a tf32 S tile (width-contiguous, N-major) was copied into shared memory 4 bytes
    at a time, transposed (sm_90 PTX, 2026-11-27); 16-bit operands may be N-major, so the tiles
    copy in 16-byte vectors. width is specialised (its divisibility by 16 lets the copies
    vectorise)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    o = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < rows
    n_ok = offs_n < width
    cls_rows = CLS + o * cls_head + offs_m[:, None].to(tl.int64) * cls_sm
    s_base = S + (o // group) * s_head
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < inner
        c = tl.load(cls_rows + ks[None, :].to(tl.int64) * cls_sk, mask=m_ok[:, None] & k_ok[None, :], other=1)
        b_s = tl.load(s_base + ks[:, None].to(tl.int64) * width + offs_n[None, :],
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = split_dot(tl.where(c == 0, 1.0, 0.0).to(tl.bfloat16), b_s, acc, TERMS, EMULATE)
    tl.store(OUT + (o * rows + offs_m[:, None]) * width + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), the first the earlier fixed choice. At
# Wan2.1-1.3B the forward's product took 1.8 ms on an H100 (2026-11-27) for about 0.1 TFLOP of
# tf32 work, its state tiles copied 4 bytes at a time (see masked_sum_kernel); wider row tiles read
# each state column fewer times, deeper K tiles halve the loop trips. With split_dot's bf16 pieces
# each compiles for sm_90 without spills or serialized wgmma, copying 16-byte vectors
# (tests/triton_sm90.py; (64, 256, 32, 8, 3) and (64, 128, 64, 4, 3) spilled and were replaced by
# (128, 256, 32, 8, 3) and (128, 128, 32, 8, 4)); the GPU autotuner picks, per output width
# (D * D or D), inner length and number of pieces.
MASKED_SUM_CANDIDATES = [(64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 256, 32, 8, 3), (128, 128, 32, 8, 4),
                         (128, 128, 64, 8, 3), (128, 64, 64, 8, 3)]

# inner: key blocks (forward) or query blocks x group (backward), so the two directions tune apart
masked_sum_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in MASKED_SUM_CANDIDATES],
    key=["width", "inner", "TERMS"])(masked_sum_kernel)


# bf16 pieces per fp32 state in split_dot, by the kernels' state precision: "tf32" (16-bit
# inputs) -> 2 (16 significant bits, finer than tf32), "tf32x3" (fp32 inputs) -> 3 (fp32's 24)
SPLIT_TERMS = {"tf32": 2, "tf32x3": 3}


def _masked_sum(classes: torch.Tensor, states: torch.Tensor, prec: str, heads_kv: int, *,
                transpose: bool, config: Optional[tuple] = None) -> torch.Tensor:
    """classes (B, Hq, Mq, Mk) int8 contiguous. transpose=False: states (B, Hkv, Mk, width) ->
    (B, Hq, Mq, width), each query block's sum over its marginal key blocks. transpose=True:
    states (B, Hq, Mq, width) -> (B, Hkv, Mk, width), each key block's sum over the (query head
    of its group, query block) pairs for which it is marginal. On a GPU the kernel is autotuned
    (MASKED_SUM_CANDIDATES); config names one instead (tests)."""
    batch, heads_q, mq, mk = classes.shape
    group = heads_q // heads_kv
    width = states.shape[-1]
    if transpose:
        out_heads, rows, inner = heads_kv, mk, group * mq
        strides = dict(group=1, cls_head=group * mq * mk, cls_sm=1, cls_sk=mk, s_head=group * mq * width)
    else:
        out_heads, rows, inner = heads_q, mq, mk
        strides = dict(group=group, cls_head=mq * mk, cls_sm=mk, cls_sk=1, s_head=mk * width)
    out = torch.empty(batch, out_heads, rows, width, dtype=torch.float32, device=states.device)
    if out.numel() == 0:
        return out
    if inner == 0:
        return out.zero_()
    args = (classes, states.contiguous(), out, rows, inner, width)
    split = dict(TERMS=SPLIT_TERMS[prec], EMULATE=interpreting())
    if config is None and not interpreting() and autotune_enabled("sla"):
        masked_sum_kernel_tuned[lambda m: (cdiv(rows, m["BLOCK_M"]), cdiv(width, m["BLOCK_N"]),
                                           batch * out_heads)](*args, **strides, **split)
        return out
    bm, bn, bk, warps, stages = config or ((16, 32, 16, 1, 1) if interpreting() else MASKED_SUM_CANDIDATES[0])
    launch_fitting(masked_sum_kernel, (cdiv(rows, bm), cdiv(width, bn), batch * out_heads),
                   *args, **strides, **split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                   num_stages=stages, stages_fixed=config is not None)
    return out


def row_states(classes: torch.Tensor, h: torch.Tensor, z: torch.Tensor, prec: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H (B, Hq, Mq, D, D), Z (B, Hq, Mq, D)) fp32: each query block's sums of the key-block
    states h (B, Hkv, Mk, D, D) and z (B, Hkv, Mk, D) over its marginal blocks."""
    classes = classes.contiguous()
    batch, heads_q, mq, _ = classes.shape
    heads_kv, d = z.shape[1], z.shape[-1]
    big = _masked_sum(classes, h.reshape(*h.shape[:3], d * d), prec, heads_kv, transpose=False)
    small = _masked_sum(classes, z, prec, heads_kv, transpose=False)
    return big.view(batch, heads_q, mq, d, d), small


def column_states(classes: torch.Tensor, dh: torch.Tensor, dz: torch.Tensor, heads_kv: int, prec: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's transpose: (dh (B, Hkv, Mk, D, D), dz (B, Hkv, Mk, D)) fp32, each key
    block's sums of the query blocks' dH_i (B, Hq, Mq, D, D) and dZ_i (B, Hq, Mq, D) over the
    query blocks (of every query head sharing its kv head) for which it is marginal."""
    classes = classes.contiguous()
    batch, _, _, mk = classes.shape
    d = dz.shape[-1]
    big = _masked_sum(classes, dh.reshape(*dh.shape[:3], d * d), prec, heads_kv, transpose=True)
    small = _masked_sum(classes, dz, prec, heads_kv, transpose=True)
    return big.view(batch, heads_kv, mk, d, d), small

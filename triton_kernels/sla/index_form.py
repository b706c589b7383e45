"""The class-ordered index form of an SLA block map, in one Triton pass per row.

classify.class_index_reference says what it computes (a stable sort of each row by class, with
torch): per row, the critical blocks ascending, then the marginal, then the negligible, and the
row's critical and marginal counts. Here each program walks one row twice: the first pass counts
the classes, the second places every block at (its class's start in the row) + (blocks of its
class before it in the row: a running prefix sum). One launch and no sort, in place of about ten
torch kernels and a segmented sort per map (three maps per SLA forward and backward). Works on any
strides, so the backward's column form (the map transposed) needs no copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ..hostmath import next_power_of_2


@triton.jit(do_not_specialize=["rows_per_head", "length"])
def class_index_kernel(CLS, N_CRIT, N_MARG, IDX, heads, rows_per_head, length,
                       stride_b, stride_h, stride_r, stride_c, CHUNK: tl.constexpr):
    """Grid (rows, heads, batch). CLS int8 (B, H, R, L) with the given strides; N_CRIT, N_MARG
    (B, H, R) int32 and IDX (B, H, R, L) int32, contiguous."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    base = CLS + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + r.to(tl.int64) * stride_r
    row = (b.to(tl.int64) * heads + h) * rows_per_head + r
    offs = tl.arange(0, CHUNK)

    n_crit = tl.zeros([CHUNK], dtype=tl.int32)
    n_marg = tl.zeros([CHUNK], dtype=tl.int32)
    for c0 in range(0, length, CHUNK):
        cols = c0 + offs
        c = tl.load(base + cols.to(tl.int64) * stride_c, mask=cols < length, other=2)
        n_crit += (c == 1).to(tl.int32)
        n_marg += (c == 0).to(tl.int32)
    total_crit = tl.sum(n_crit, 0)
    total_marg = tl.sum(n_marg, 0)
    tl.store(N_CRIT + row, total_crit)
    tl.store(N_MARG + row, total_marg)

    seen_crit = total_crit * 0
    seen_marg = total_crit * 0
    seen_neg = total_crit * 0
    out = IDX + row * length
    for c0 in range(0, length, CHUNK):
        cols = c0 + offs
        ok = cols < length
        c = tl.load(base + cols.to(tl.int64) * stride_c, mask=ok, other=2)
        is_crit = (c == 1).to(tl.int32)
        is_marg = (c == 0).to(tl.int32)
        is_neg = (c == -1).to(tl.int32)
        # exclusive prefix counts inside the chunk
        before_crit = tl.cumsum(is_crit, 0) - is_crit
        before_marg = tl.cumsum(is_marg, 0) - is_marg
        before_neg = tl.cumsum(is_neg, 0) - is_neg
        pos = tl.where(is_crit == 1, seen_crit + before_crit,
                       tl.where(is_marg == 1, total_crit + seen_marg + before_marg,
                                total_crit + total_marg + seen_neg + before_neg))
        tl.store(out + pos, cols, mask=ok)
        seen_crit += tl.sum(is_crit, 0)
        seen_marg += tl.sum(is_marg, 0)
        seen_neg += tl.sum(is_neg, 0)


def class_index_triton(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n_crit, n_marg, idx) of an int8 (B, H, R, L) map holding only 1, 0 and -1 (any strides)."""
    batch, heads, rows, length = classes.shape
    n_crit = torch.empty(batch, heads, rows, dtype=torch.int32, device=classes.device)
    n_marg = torch.empty_like(n_crit)
    idx = torch.empty(batch, heads, rows, length, dtype=torch.int32, device=classes.device)
    if n_crit.numel() == 0 or length == 0:
        return n_crit.zero_(), n_marg.zero_(), idx
    chunk = min(1024, max(16, next_power_of_2(length)))
    class_index_kernel[(rows, heads, batch)](
        classes, n_crit, n_marg, idx, heads, rows, length, *classes.stride(), CHUNK=chunk,
        num_warps=1 if chunk <= 128 else 4)
    return n_crit, n_marg, idx

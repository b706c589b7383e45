"""Launch settings for the block-sparse kernels (also the SLA kernels' critical branch).

The mask's block (bq, bk: any power of two from 16 to 128) fixes which keys a query block may
see; the kernels' tile can be that block or a power-of-two part of it (a program covers
BLOCK_M rows of one mask row, and visits each listed key block as bk / BLOCK_N tiles). fp16 and
bf16 run the mask's block (the fast path); fp32 runs 32 x 32 tiles, which is what fits: compiled
for sm_90 here (tests/triton_sm90.py), fp32 at hd128 with the mask's 64 x 64 block takes 256 KB
(forward, 3 stages) and 192 KB even with one stage (backward), and 128 x 64 takes up to 320 KB;
H100 allows 227 KB per block. The dK/dV kernel at hd128 streams 16-row query slices.
"""
from __future__ import annotations

from typing import NamedTuple

from ..switches import interpreting
from ..hostmath import next_power_of_2

MIN_BLOCK = 16
MAX_BLOCK = 128
FP32_TILE = 32  # fp32 serves accuracy, not speed: 32 x 32 tiles, 4 warps, one stage


class Launch(NamedTuple):
    block_m: int  # the tile's rows (queries), a power-of-two part of bq
    block_n: int  # the tile's columns (keys), a power-of-two part of bk
    num_warps: int
    num_stages: int


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def block_size_ok(b: int) -> bool:
    return MIN_BLOCK <= b <= MAX_BLOCK and (b & (b - 1)) == 0


def launch_config(bm: int, bn: int, head_dim: int, which: str, elem_size: int = 2) -> Launch:
    """Tile, warps and stages for mask block (bm, bn). which: "fwd" (query rows resident, keys
    streamed; "sla_fwd" for SLA's), "dq" (likewise) or "dkdv" (keys resident, queries streamed); SLA's linear-branch
    kernels: "linear" (query rows) and "linear_k" (key rows, query slices streamed).

    fp16/bf16 run the mask's block except the dK/dV kernel at hd128 (see below); shared memory
    and registers measured on sm_90 are in the commit message and the sm_90 compile test."""
    if interpreting():
        # fp32 tiles of 16 under the interpreter, so CPU tests cover a mask block split in tiles
        return Launch(min(bm, 16), min(bn, 16), 1, 1) if elem_size == 4 else Launch(bm, bn, 1, 1)
    d = padded_head_dim(head_dim)
    if which == "linear":  # SLA's linear-branch dq and totals: query rows, D x D state chunks
        return Launch(min(bm, FP32_TILE) if elem_size == 4 else bm, bn, 8 if d >= 128 else 4, 1)
    if which == "linear_k":  # SLA's linear-branch dk/dv: key rows resident, query slices streamed
        return Launch(min(bm, FP32_TILE), min(bn, FP32_TILE) if elem_size == 4 else bn, 8 if d >= 128 else 4, 1)
    if elem_size == 4:
        return Launch(min(bm, FP32_TILE), min(bn, FP32_TILE), 4, 1)
    big = max(bm, bn) * d
    if which in ("fwd", "sla_fwd"):
        # SLA's forward also holds phi(Q) and a D x 64 state chunk: 8 warps from hd128 (4 spill)
        wide = bm * d >= (64 if which == "sla_fwd" else 128) * 128
        return Launch(bm, bn, 8 if wide else 4, 3 if d <= 128 else 2)
    if which == "dkdv" and d >= 128:
        # queries stream in 16-row slices: with the mask's 64 rows the causal kernel spills
        # (8 warps: 44 B at 2 stages, 136 B at 1; 4 warps: 428 B)
        return Launch(min(bm, 16), bn, 8, 3)
    return Launch(bm, bn, 8 if big >= 64 * 128 else 4, 3)

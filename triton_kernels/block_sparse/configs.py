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

from typing import NamedTuple, Optional

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


def fit_stages(launch: Launch, resident_rows: int, streamed_rows: int, d_pad: int, elem_size: int,
               smem_limit: Optional[int]) -> Launch:
    """launch with fewer pipeline stages where the device's shared memory per block (smem_limit;
    None: no limit known) is below the estimate resident tile + stages x two streamed tiles (an
    upper bound of what Triton allocates for these kernels, compiled for sm_89 at stop 22). The
    stages were chosen on an H100 (227 KB), which every such launch fits; a 99 KB sm_86 / sm_89
    card did not (the hd128 dQ kernel took 104 KB at 3 stages, the 128-row forward more)."""
    stages = launch.num_stages
    while smem_limit is not None and stages > 1 and \
            (resident_rows + 2 * streamed_rows * stages) * d_pad * elem_size > smem_limit:
        stages -= 1
    return launch._replace(num_stages=stages)


def launch_config(bm: int, bn: int, head_dim: int, which: str, elem_size: int = 2,
                  smem_limit: Optional[int] = None) -> Launch:
    """Tile, warps and stages for mask block (bm, bn). which: "fwd" (query rows resident, keys
    streamed; "sla_fwd" for SLA's), "dq" (likewise) or "dkdv" (keys resident, queries streamed); SLA's linear-branch
    kernels: "linear" (query rows) and "linear_k" (key rows, query slices streamed).

    fp16/bf16 run the mask's block except the dK/dV kernel at hd128 (see below); shared memory
    and registers measured on sm_90 are in the commit message and the sm_90 compile test.
    smem_limit: the device's opt-in shared memory per block, for fit_stages (fwd, dq, dkdv)."""
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
        launch = Launch(bm, bn, 8 if wide else 4, 3 if d <= 128 else 2)
        return fit_stages(launch, bm, bn, d, elem_size, smem_limit) if which == "fwd" else launch
    if which == "dkdv" and d >= 128:
        # queries stream in 16-row slices: with the mask's 64 rows the causal kernel spills
        # (8 warps: 44 B at 2 stages, 136 B at 1; 4 warps: 428 B)
        return fit_stages(Launch(min(bm, 16), bn, 8, 3), 2 * bn, min(bm, 16), d, elem_size, smem_limit)
    launch = Launch(bm, bn, 8 if big >= 64 * 128 else 4, 3)
    if which == "dkdv":  # K and V resident, Q and dO streamed
        return fit_stages(launch, 2 * bn, bm, d, elem_size, smem_limit)
    return fit_stages(launch, 2 * bm, bn, d, elem_size, smem_limit)  # dq: Q and dO resident, K and V streamed

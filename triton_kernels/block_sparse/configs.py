"""Launch settings for the block-sparse kernels. The tile is the mask's block: BLOCK_M = bq and
BLOCK_N = bk (any power of two from 16 to 128), so only warps and pipeline stages are chosen here."""
from __future__ import annotations

import os

import triton

MIN_BLOCK = 16
MAX_BLOCK = 128


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def block_size_ok(b: int) -> bool:
    return MIN_BLOCK <= b <= MAX_BLOCK and (b & (b - 1)) == 0


def launch_config(bm: int, bn: int, head_dim: int, which: str) -> tuple[int, int]:
    """(num_warps, num_stages). H100 reasoning as in flash/configs.py: a 128-row tile at hd128
    needs 8 warps to hold its fp32 accumulator(s); the backward keeps two accumulators."""
    if interpreting():
        return 1, 1
    d = padded_head_dim(head_dim)
    big = max(bm, bn) * d
    if which == "fwd":
        warps = 8 if big >= 128 * 128 else 4
        stages = 3 if d <= 128 else 2
    else:
        warps = 8 if big >= 64 * 128 else 4
        stages = 2 if d <= 128 else 1
    return warps, stages

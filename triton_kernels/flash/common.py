"""Pieces shared by the flash forward and backward kernels: sequence bounds (dense or varlen),
masked tile loads/stores, and the host-side geometry (strides, grid sizes) of a call."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Varlen:
    """Packed sequences: sequence b holds rows cu_seqlens[b]:cu_seqlens[b+1] of the packed tensor."""

    cu_seqlens_q: torch.Tensor  # int32 (batch + 1,)
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def strides4(t: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides of a bhsd view; packed varlen tensors have no batch stride."""
    sb, sh, ss, sd = t.stride()
    return (0 if varlen is not None else sb), sh, ss, sd


def strides3(t: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int]:
    """(batch, head, seq) strides of lse-like tensors: (B, H, S) dense or (H, total) varlen."""
    if varlen is not None:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def geometry(q: torch.Tensor, k: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int]:
    """(batch, max seq_q, max seq_k) of a call; q, k are bhsd views (packed: batch dim 1)."""
    if varlen is None:
        return q.shape[0], q.shape[2], k.shape[2]
    return varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k


def cu_pointers(q: torch.Tensor, varlen: Optional[Varlen]) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens for the kernel; dense calls pass q as a never-read placeholder."""
    if varlen is None:
        return q, q
    return varlen.cu_seqlens_q, varlen.cu_seqlens_k


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (the accuracy contract is fp32 PyTorch's), but
    # "ieee" lowers to unrolled FMA loops that take ptxas minutes at these tile sizes; tf32x3
    # (three tensor-core passes, hi/lo split) keeps fp32-level error on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def seq_bounds(CU, b, seq_len, VARLEN: tl.constexpr):
    """(first packed row as int64, length) of sequence b."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = tl.zeros((), dtype=tl.int64)
        length = seq_len
    return start, length


@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the edges that can run past the tensor."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, rows_ok, cols_ok, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, x, mask=rows_ok[:, None] & cols_ok[None, :])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None])


@triton.jit
def query_key_range(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Key range a query block visits: [0, full_end) needs no mask, [full_end, hi) does.

    Causal is bottom-right aligned: query i sees key j iff j <= i + seq_k - seq_q. Key blocks
    past the last visible key are never visited.
    """
    if CAUSAL:
        diag = seq_k - seq_q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
        # keys every row of the block sees: j <= start_m + diag
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
    else:
        hi = seq_k
        full = seq_k
    full_end = (full // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def key_query_range(start_n, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Query range a key block is seen by, split as [lo, mid) masked, [mid, end) unmasked,
    [end, hi) masked (sequence tail); all bounds are multiples of BLOCK_M."""
    hi = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag = seq_k - seq_q
        # first query that sees key start_n, and first that sees the block's last key
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, hi)
        mid = tl.minimum(mid, hi)
    else:
        lo = 0
        mid = 0
    end = tl.maximum((seq_q // BLOCK_M) * BLOCK_M, mid)
    return lo, mid, end, hi

"""Method sage in plain PyTorch, memory-bounded: the reference's INT8 simulation run over chunks of
query rows (and of heads, where one Q block of every head is over budget), so no (Sq, Sk) score
matrix is ever held whole.

The torch-backend kernel for fp16/bf16/fp32 wherever sage's Triton/CUDA kernels do not run (CPU,
above all). The reference it ranks above (sage-torch-reference, still the ground truth and the
fp64 kernel) forms the full (B, H, Sq, Sk) scores: 48 GiB of float32 at 32k tokens x 12 heads.
Here K is smoothed and quantized once over all keys (reference.sage.prepare_keys) and each chunk
runs reference.sage.attend_rows, the very function the reference runs on all rows at once. Chunks
start on Q quantization blocks (128 rows per_block, 32 per_warp), so every Q scale is the
reference's; causal chunks stop at their last row's diagonal key.

Memory: a chunk is one or more (batch, head) pairs and a block of rows of each. It holds its
float32 scores, which become P in place (rounding P adds a half-size copy), and its heads' K and V
as the dots and the PV product read them (K's INT8 values in float32, V rounded to fp16 and held
in float32: (D + Dv) x 4 bytes a key), converted once for all the rows of those heads; scores and
K and V together stay under flash-torch-chunked's SCORE_BUDGET_BYTES (one Q block of one head runs
whatever the budget). Before the chunks, K in float32 and one kv head's quantization temporaries;
pv="fp8" keeps V's e4m3 values in float32 throughout. The peak is thus about 1.5x the budget plus
that one float32 copy of K (or of K and V).

Exactness: one chunk (the default budget at small shapes) is the reference bit for bit. Several
chunks give the same quantized scores bit for bit (the INT8 dots are exact in any order), but
PyTorch's float32 exp2 and matmul are not row-independent: exp2 takes SLEEF's vector path or
libm's scalar one by an element's place in the loop over the tensor (the two differ in the last
bit for some inputs), and BLAS orders a matmul's sums by the matrix shape (P V, and lse's
smoothing shift q . mean_k). So out and lse may differ from the reference by float32 ulps, and
in a rare row P's fp16 (or e4m3) rounding flips; tests/test_sage_torch_chunked.py holds them to that.
"""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..options import NO_LSE
from ..reference._common import compute_dtype
from ..reference.sage import K_BLOCK, attend_rows, exact_dot_dtype, prepare_keys, q_block_size
from .flash_torch_chunked import rows_per_chunk


def chunk_shape(batch: int, heads_q: int, seq_q: int, seq_k: int, q_block: int, budget: int | None = None,
                key_bytes: int = 0) -> tuple[int, int, int]:
    """(batches, heads, rows) of one chunk, rows in whole Q blocks. Each (batch, head) pair of a
    chunk holds rows x seq_k float32 scores and key_bytes per key (its K and V); together within
    flash-torch-chunked's score budget: as many pairs as hold one Q block (or the whole sequence,
    if shorter) each, at least one, and as many Q blocks of them as fit."""
    kv_rows = -(-key_bytes // 4)  # a pair's K and V, counted as rows of float32 scores
    rows = min(seq_q, q_block)
    # rows_per_chunk counting other units: (batch, head) pairs of (rows + kv_rows) x seq_k scores
    pairs = rows_per_chunk(1, 1, batch * heads_q, (rows + kv_rows) * seq_k, budget)
    if pairs >= batch * heads_q:
        nb, nh = batch, heads_q
    else:
        nb, nh = (pairs // heads_q, heads_q) if pairs >= heads_q else (1, pairs)
    fit = rows_per_chunk(nb, nh, seq_q + kv_rows, seq_k, budget) - kv_rows
    return nb, nh, (max(seq_q, 1) if fit >= seq_q else max(rows, fit - fit % q_block))


def key_bytes(inp: AttentionInputs) -> int:
    """Bytes a key of one (batch, head) pair of a chunk holds: K's INT8 values in the dtype of
    their exact dots and V in the compute dtype (SageKeys.in_dot_dtype)."""
    ct = compute_dtype(inp.dtype)
    return exact_dot_dtype(inp.head_dim, ct).itemsize * inp.head_dim + ct.itemsize * inp.head_dim_v


def chunked_forward(inp: AttentionInputs, budget: int | None = None):
    """(out in q's dtype via inp.new_output, lse float32 (B, Hq, Sq) or None without
    inp.return_lse); rows that see no key give 0 and -inf."""
    o = inp.options
    b, hq, sq = inp.batch, inp.heads_q, inp.seq_q
    q_block = q_block_size(o.get("qk_granularity", "per_block"))
    keys = prepare_keys(inp.k, inp.v, scale=inp.scale, causal=inp.causal, smooth_k=o.get("smooth_k", True),
                        q_block=q_block, k_block=K_BLOCK, pv=o.get("pv", "fp16"), ct=compute_dtype(inp.dtype))
    out = inp.new_output()
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=inp.device) if inp.return_lse else None
    if out.numel() == 0:  # no batch, head or query row
        return out, lse
    group = hq // inp.heads_kv
    nb, nh, rows = chunk_shape(b, hq, sq, inp.seq_k, q_block, budget, key_bytes(inp))
    # heads outside, rows inside: a chunk's K and V are converted once for all its rows
    for b0 in range(0, b, nb):
        bs = slice(b0, min(b, b0 + nb))
        for h0 in range(0, hq, nh):
            hs = slice(h0, min(hq, h0 + nh))
            chunk_keys = keys.select(bs, hs, group).in_dot_dtype()
            for r0 in range(0, sq, rows):
                r1 = min(sq, r0 + rows)
                o_c, lse_c = attend_rows(chunk_keys, inp.q[bs, hs, r0:r1], r0, sq, inp.return_lse)
                out[bs, hs, r0:r1] = o_c
                if lse is not None:
                    lse[bs, hs, r0:r1] = lse_c
                del o_c, lse_c
            del chunk_keys  # before the next heads' K and V, or two chunks' live at once
    return out, lse


class SageTorchChunked(Kernel):
    name = "sage-torch-chunked"
    method = "sage"
    backend = "torch"
    # above sage-torch-reference (0), which it replaces as the fallback; below the Triton and
    # CUDA kernels. fp16/bf16/fp32; fp64 stays on the reference
    priority = 5
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # as the reference: SageAttention is an inference method (INT8 rounding has no useful gradient)
    supports_backward = False
    supports_lse = "sage" not in NO_LSE
    options = ("smooth_k", "qk_granularity", "pv")

    def forward(self, inp: AttentionInputs):
        out, lse = chunked_forward(inp)
        return (out, lse) if inp.return_lse else out


register(SageTorchChunked())

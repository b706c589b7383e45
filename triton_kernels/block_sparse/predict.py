"""Triton pooling and scoring for attnlib.predict_block_mask (SpargeAttn's mean-pool predictor):
one pass over Q (or K) writing the per-block token means, and the block probabilities: per query
block the softmax of pool(Q) pool(K)^T * scale over the key blocks it can see (causal), in one
kernel (the torch softmax took about nine kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ..hostmath import cdiv, next_power_of_2


@triton.jit(do_not_specialize=["seq"])
def mean_pool_kernel(X, P, stride_xb, stride_xh, stride_xs, stride_xd, heads, num_blocks, seq,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PAD: tl.constexpr):
    """Grid (blocks, heads, batch): P[b, h, i] = mean of rows [i*BLOCK, min((i+1)*BLOCK, seq)).
    BLOCK may be any size: rows run over the power of two BLOCK_PAD >= BLOCK, masked to BLOCK."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_PAD)
    rows = i * BLOCK + offs_r
    offs_d = tl.arange(0, D_PAD)
    ok = ((offs_r < BLOCK) & (rows < seq))[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + rows[:, None].to(tl.int64) * stride_xs
                + offs_d[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    count = tl.minimum(seq - i * BLOCK, BLOCK).to(tl.float32)
    out = P + ((b * heads + h) * num_blocks + i).to(tl.int64) * HEAD_DIM
    tl.store(out + offs_d, tl.sum(x, 0) / count, mask=offs_d < HEAD_DIM)


@triton.jit
def block_scores_kernel(PQ, PK, S, heads_q, group, mq, mk, seq_q, seq_k, scale,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                        CAUSAL: tl.constexpr, TILE: tl.constexpr):
    """Grid (query-block tiles, query heads, batch): S[b, h, i, :] = softmax over key blocks j of
    pq_i . pk_j * scale, 0 where causal hides the whole key block j from query block i (a row
    that sees no key block is all 0). Pass 1 writes the scores and keeps each row's running max
    and sum of exponentials; pass 2 turns the written scores into probabilities."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_i = t * TILE + tl.arange(0, TILE)
    offs_d = tl.arange(0, D_PAD)
    i_ok = offs_i < mq
    d_ok = offs_d < HEAD_DIM
    pq = tl.load(PQ + ((b * heads_q + h) * mq + offs_i[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                 mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    kvh = h // group
    heads_kv = heads_q // group
    s_rows = S + ((b * heads_q + h) * mq + offs_i[:, None]).to(tl.int64) * mk
    # last query of each query block, and the key it may see
    last_q = tl.minimum((offs_i + 1) * BQ, seq_q) - 1
    m_i = tl.full([TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE], dtype=tl.float32)
    for j0 in range(0, mk, TILE):
        offs_j = j0 + tl.arange(0, TILE)
        j_ok = offs_j < mk
        pk = tl.load(PK + ((b * heads_kv + kvh) * mk + offs_j[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        # fp32 FMA products ("ieee"): the broadcast product's TILE x TILE x D_PAD temporary spilled
        # 132 B at hd128 on sm_90 (255 registers)
        s = tl.dot(pq, tl.trans(pk), input_precision="ieee") * scale
        keep = j_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_j[None, :] * BK <= last_q[:, None] + seq_k - seq_q)
        s = tl.where(keep, s, float("-inf"))
        tl.store(s_rows + offs_j[None, :], s, mask=i_ok[:, None] & j_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.debug_barrier()  # pass 2 reads what other threads of this program wrote
    for j0 in range(0, mk, TILE):
        offs_j = j0 + tl.arange(0, TILE)
        ok = i_ok[:, None] & (offs_j < mk)[None, :]
        s = tl.load(s_rows + offs_j[None, :], mask=ok, other=float("-inf"))
        tl.store(s_rows + offs_j[None, :], tl.exp(s - m_safe[:, None]) / l_safe[:, None], mask=ok)


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) bhsd view -> (B, H, ceil(S/block), D) float32 block means."""
    b, h, s, d = x.shape
    m = cdiv(s, block)
    out = torch.empty(b, h, m, d, dtype=torch.float32, device=x.device)
    if out.numel():
        mean_pool_kernel[(m, h, b)](x, out, *x.stride(), h, m, s, HEAD_DIM=d, D_PAD=max(16, next_power_of_2(d)),
                                    BLOCK=block, BLOCK_PAD=next_power_of_2(block))
    return out


def block_probabilities(pq: torch.Tensor, pk: torch.Tensor, *, block_size: tuple[int, int], seq_q: int,
                        seq_k: int, scale: float, causal: bool) -> torch.Tensor:
    """(B, Hq, Mq, Mk) float32: per query block the softmax over key blocks of the pooled scores,
    from pooled q (B, Hq, Mq, D) and pooled k (B, Hkv, Mk, D); 0 on causally hidden blocks."""
    b, hq, mq, d = pq.shape
    mk = pk.shape[2]
    out = torch.empty(b, hq, mq, mk, dtype=torch.float32, device=pq.device)
    tile = 16
    if out.numel():
        block_scores_kernel[(cdiv(mq, tile), hq, b)](
            pq.contiguous(), pk.contiguous(), out, hq, hq // pk.shape[1], mq, mk, seq_q, seq_k, scale,
            HEAD_DIM=d, D_PAD=max(16, next_power_of_2(d)), BQ=block_size[0], BK=block_size[1],
            CAUSAL=causal, TILE=tile)
    return out

"""Block-mask prediction for method block_sparse: SpargeAttn's mean-pool predictor (Zhang et al.,
arXiv 2502.18137 §3.2), returning the canonical bool block mask.

Per head: smooth K by its token mean, mean-pool Q and K per block, P = softmax(pool(Q) pool(K)^T
* scale) over key blocks per query block, then keep the ``topk`` fraction of (visible) key blocks
of each query block, or the fewest whose cumulative P reaches ``cdf_threshold``. Pooling and
scoring run in Triton for CUDA tensors (and under TRITON_INTERPRET=1 on CPU), in torch otherwise;
selection is torch (a sort per row of the small (Mq, Mk) score matrix).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .inputs import check_block_size, check_fraction, check_layout, check_scale, validate_qkv
from .reference._common import num_blocks
from .triton_kernels.device_constants import device_constant
from .triton_kernels.hostmath import next_power_of_2


def _mean_pool_torch(x: torch.Tensor, block: int) -> torch.Tensor:
    b, h, s, d = x.shape
    m = num_blocks(s, block)
    padded = x.new_zeros(b, h, m * block, d, dtype=torch.float32)
    padded[:, :, :s] = x.float()
    return padded.view(b, h, m, block, d).sum(3) / _block_counts(m, s, block, x.device)[:, None]


@device_constant
def _block_counts(n_blocks: int, seq: int, block: int, device) -> torch.Tensor:
    """(n_blocks,) float32: tokens in each block (the last may be short)."""
    return torch.clamp(seq - torch.arange(n_blocks, device=device) * block, max=block).to(torch.float32)


@device_constant
def _visible_blocks(mq: int, mk: int, block_size: tuple[int, int], seq_q: int, seq_k: int, causal: bool,
                    device) -> torch.Tensor:
    """(Mq, Mk) bool: key block j is seen by some query of block i. Shared: read only."""
    if not causal:
        return torch.ones(mq, mk, dtype=torch.bool, device=device)
    bq, bk = block_size
    last_q = torch.clamp((torch.arange(mq, device=device) + 1) * bq, max=seq_q) - 1
    return torch.arange(mk, device=device)[None, :] * bk <= last_q[:, None] + seq_k - seq_q


@device_constant
def _diagonal_blocks(mq: int, mk: int, block_size: tuple[int, int], seq_q: int, seq_k: int,
                     device) -> torch.Tensor:
    """(Mq, Mk) bool: key blocks crossed by the bottom-right diagonal j = i + Sk - Sq within query
    block i. Shared: read only."""
    bq, bk = block_size
    first = torch.arange(mq, device=device) * bq + seq_k - seq_q
    last = torch.clamp((torch.arange(mq, device=device) + 1) * bq, max=seq_q) - 1 + seq_k - seq_q
    lo, hi = torch.clamp(first, min=0), torch.clamp(last, max=seq_k - 1)
    j = torch.arange(mk, device=device)[None, :]
    return (j >= (lo // bk)[:, None]) & (j <= (hi // bk)[:, None]) & (hi >= lo)[:, None]


@device_constant
def _topk_ranks(mq: int, mk: int, block_size: tuple[int, int], seq_q: int, seq_k: int, causal: bool,
                topk: float, device) -> torch.Tensor:
    """(Mq, Mk) bool: rank r of query block i's sorted key blocks is kept, r < ceil(topk * visible)."""
    vis = _visible_blocks(mq, mk, block_size, seq_q, seq_k, causal, device)
    n_keep = torch.ceil(topk * vis.sum(-1).to(torch.float64) - 1e-9).to(torch.long)  # (Mq,)
    return torch.arange(mk, device=device) < n_keep[:, None]


def _use_triton(q: torch.Tensor) -> bool:
    from .dispatch import installed

    if not installed("triton"):
        return False
    return q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


# elements of the Triton pooling kernel's one (block, head_dim) tile, both padded to powers of two:
# Triton refuses tiles past 2**20 elements (a (8193, 128) block), and far below that the tile no
# longer fits registers; larger blocks pool with torch
_POOL_TILE_MAX = 1 << 16


def _pool_tile_fits(block: int, head_dim: int) -> bool:
    return next_power_of_2(block) * max(16, next_power_of_2(head_dim)) <= _POOL_TILE_MAX


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: tuple[int, int], scale: float, causal: bool,
                 use_triton: Optional[bool] = None) -> torch.Tensor:
    """Block-level probabilities P (B, Hq, Mq, Mk) float32 from bhsd q, k (K smoothed by its mean)."""
    bq, bk = block_size
    sq, sk = q.shape[2], k.shape[2]
    use_triton = _use_triton(q) if use_triton is None else use_triton
    if use_triton:
        from .triton_kernels.block_sparse.predict import block_probabilities, mean_pool

        pq, pk = (mean_pool(x, b) if _pool_tile_fits(b, x.shape[3]) else _mean_pool_torch(x, b)
                  for x, b in ((q, bq), (k, bk)))
    else:
        pq, pk = _mean_pool_torch(q, bq), _mean_pool_torch(k, bk)
    # SpargeAttn: subtract K's token mean (per head). Each row's scores shift by one constant, so P is
    # unchanged in exact arithmetic; it keeps the scores' range small.
    counts = _block_counts(pk.shape[2], sk, bk, k.device)
    pk = pk - (pk * counts[:, None]).sum(2, keepdim=True) / sk
    if use_triton:  # the kernel's softmax, as below
        return block_probabilities(pq, pk, block_size=block_size, seq_q=sq, seq_k=sk, scale=scale, causal=causal)
    group = q.shape[1] // k.shape[1]
    s = (pq @ pk.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    vis = _visible_blocks(pq.shape[2], pk.shape[2], tuple(block_size), sq, sk, causal, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _check_q_k(q, k, layout: str) -> None:
    """validate_qkv's checks across q and k, in terms of q and k: called as (q, k, k), its own
    messages for these name v ("batch sizes differ: q=1, k=2, v=2")."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return  # validate_qkv names the argument
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype, got q={q.dtype}, k={k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got q={q.device}, k={k.device}")
    if q.dim() != 4 or k.dim() != 4 or q.is_nested or k.is_nested:
        return  # validate_qkv says which
    (qb, qh), (kb, kh) = ((t.shape[0], t.shape[1 if layout == "bhsd" else 2]) for t in (q, k))
    if qb != kb:
        raise ValueError(f"q and k must have one batch size, got q={qb}, k={kb}")
    if kh == 0:
        raise ValueError(f"k must have at least one head, got {tuple(k.shape)} for layout={layout!r}")
    if qh % kh != 0:
        raise ValueError(f"query heads ({qh}) must be a multiple of key heads ({kh}) for GQA/MQA")


def predict_block_mask(q, k, *, block_size=(64, 64), topk: Optional[float] = None,
                       cdf_threshold: Optional[float] = None, causal: bool = False, keep_sink: bool = False,
                       keep_diagonal: bool = False, layout: str = "bhsd", scale: Optional[float] = None
                       ) -> torch.Tensor:
    """The bool block mask (B, Hq, ceil(Sq/bq), ceil(Sk/bk)) SpargeAttn's mean-pool predictor keeps.

    Exactly one of ``topk`` (fraction in [0, 1] of the visible key blocks kept per query block,
    rounded up) and ``cdf_threshold`` (in [0, 1]: the fewest blocks, most probable first, whose
    cumulative P reaches it) selects. ``causal`` never keeps a block no query of the block can
    see (bottom-right); ``keep_sink`` adds key block 0 and ``keep_diagonal`` the key blocks on
    the diagonal (where visible). q, k: (B, H, S, D) for layout "bhsd", (B, S, H, D) for "bshd".
    """
    check_layout(layout)
    _check_q_k(q, k, layout)
    qb, kb, _ = validate_qkv(q, k, k, layout)  # the rest; its messages that name v cannot fire now
    bq, bk = check_block_size(block_size)
    if (topk is None) == (cdf_threshold is None):
        raise ValueError("give exactly one of topk and cdf_threshold")
    if topk is not None:
        topk = check_fraction("topk", topk)
    else:
        cdf_threshold = check_fraction("cdf_threshold", cdf_threshold)
    for name, val in (("causal", causal), ("keep_sink", keep_sink), ("keep_diagonal", keep_diagonal)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool, got {type(val).__name__}")
    scale = check_scale(scale, qb.shape[-1])  # the same rule as attention()'s scale
    sq, sk = qb.shape[2], kb.shape[2]
    mq, mk = num_blocks(sq, bq), num_blocks(sk, bk)
    if mq == 0 or mk == 0:  # an empty sequence has no block pair to keep
        return torch.zeros(qb.shape[0], qb.shape[1], mq, mk, dtype=torch.bool, device=qb.device)
    p = block_scores(qb, kb, (bq, bk), scale, causal)
    vis = _visible_blocks(mq, mk, (bq, bk), sq, sk, causal, qb.device)
    order = torch.sort(p, dim=-1, descending=True, stable=True)
    if topk is not None:
        rank_ok = _topk_ranks(mq, mk, (bq, bk), sq, sk, causal, topk, qb.device)
    elif cdf_threshold >= 1.0:
        # every visible block has P > 0 in exact arithmetic, so all are needed to reach 1; the
        # float32 sum saturates first (blocks under ~1e-7 of the mass would be dropped)
        rank_ok = torch.ones_like(p, dtype=torch.bool)
    elif cdf_threshold > 0:
        before = torch.cumsum(order.values, dim=-1) - order.values  # mass of the blocks ranked above
        rank_ok = before < cdf_threshold - 1e-7
        rank_ok[..., 0] = True  # any positive threshold needs the most probable block
    else:
        rank_ok = torch.zeros_like(p, dtype=torch.bool)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order.indices, rank_ok.expand_as(p))
    if keep_sink:
        keep[..., 0] = True
    if keep_diagonal:
        keep |= _diagonal_blocks(mq, mk, (bq, bk), sq, sk, qb.device)
    return keep & vis


__all__ = ["predict_block_mask"]

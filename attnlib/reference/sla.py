"""SLA, sparse-linear attention (Zhang et al., arXiv 2509.24006): the ground truth for method sla.

Blocks of the attention map are classified from mean-pooled Q and K (SLA §3):
critical (1) computed exactly by block-sparse softmax attention, marginal (0) by linear
attention, negligible (-1) skipped. Output = O_sparse + O_linear W^T + b; W and b default to
zero (the paper's zero-initialised projection), so by default the output is O_sparse.

Causal (bottom-right): key blocks no query of the block can see are negligible and key blocks
crossing the diagonal are forced critical (so the linear branch never reads the future); the
fractions apply to the fully visible ("eligible") blocks of each row.
"""
from __future__ import annotations

import math

import torch

from ._common import (block_mask_to_tokens, causal_mask, compute_dtype, expand_kv, masked_softmax_attention,
                      num_blocks, safe_divide)
from .linear import feature_map_fn

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1
LINEAR_EPS = 1e-6
# slack for fraction * n landing a hair above/below an integer (0.1 * 30 = 3.0000000000000004)
_COUNT_SLACK = 1e-9


def sla_block_counts(n: int, critical: float, negligible: float) -> tuple[int, int]:
    """(critical, negligible) block counts for a row of n eligible blocks: ceil(critical * n) and
    floor(negligible * n), the latter capped so the two never exceed n."""
    n_crit = min(n, math.ceil(critical * n - _COUNT_SLACK))
    n_neg = min(n - n_crit, math.floor(negligible * n + _COUNT_SLACK))
    return max(n_crit, 0), max(n_neg, 0)


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, ceil(S/block), D); a ragged last block averages its real tokens."""
    s, d = x.shape[-2], x.shape[-1]
    nb = num_blocks(s, block)
    pad = nb * block - s
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, d)], dim=-2)
    sums = x.reshape(*x.shape[:-2], nb, block, d).sum(dim=-2)
    counts = torch.full((nb, 1), float(block), dtype=x.dtype, device=x.device)
    if nb:  # S == 0 pools to no block
        counts[-1] = block - pad
    return sums / counts


def _causal_block_structure(seq_q: int, seq_k: int, block_size: tuple[int, int], device):
    """(Mq, Mk) bool masks (fully visible, partially visible) for the bottom-right causal mask;
    blocks in neither are invisible to every query of the block."""
    bq, bk = block_size
    mq, mk = num_blocks(seq_q, bq), num_blocks(seq_k, bk)
    offset = seq_k - seq_q
    q_first = torch.arange(mq, device=device) * bq
    q_last = torch.clamp(q_first + bq, max=seq_q) - 1
    k_first = torch.arange(mk, device=device) * bk
    k_last = torch.clamp(k_first + bk, max=seq_k) - 1
    full = k_last[None, :] <= q_first[:, None] + offset   # every query sees every key
    some = k_first[None, :] <= q_last[:, None] + offset   # the last query sees the first key
    return full, some & ~full


def _eligible_counts(seq_q: int, seq_k: int, block_size: tuple[int, int], causal: bool) -> list[int]:
    """Per query-block row, how many key blocks are eligible (fully visible under the bottom-right
    causal mask; all of them without it): _causal_block_structure's first mask summed over a row,
    computed from the shapes alone, so no tensor is read on the host (torch 2.8's functorch refuses
    .tolist() inside the vjp that recomputes the reference)."""
    bq, bk = block_size
    mq, mk = num_blocks(seq_q, bq), num_blocks(seq_k, bk)
    if not causal:
        return [mk] * mq
    counts = []
    for i in range(mq):
        # key block j is fully visible iff its last key, min((j+1) bk, Sk) - 1, is at most the
        # block's first query position plus Sk - Sq
        reach = i * bq + seq_k - seq_q + 1
        counts.append(mk if reach >= seq_k else max(0, reach // bk))
    return counts


@torch.no_grad()
def sla_block_classes(q: torch.Tensor, k: torch.Tensor, *, critical: float = 0.05, negligible: float = 0.10,
                      block_size: tuple[int, int] = (64, 64), scale: float | None = None,
                      causal: bool = False) -> torch.Tensor:
    """int8 (B, Hq, Mq, Mk): 1 critical, 0 marginal, -1 negligible (SLA §3).

    P_c = softmax(pool(Q) pool(K)^T * scale) over each query-block row. Of a row's n eligible key
    blocks, ranked by P_c descending with ties to the lower block index, the first
    ceil(critical * n) are critical and the last floor(negligible * n) negligible (see
    :func:`sla_block_counts`); the rest marginal. Non-differentiable (runs under no_grad)."""
    ct = compute_dtype(q.dtype)
    bq, bk = block_size
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pooled_q = _mean_pool(q.to(ct), bq)
    pooled_k = expand_kv(_mean_pool(k.to(ct), bk), hq)
    mq, mk = pooled_q.shape[-2], pooled_k.shape[-2]

    if causal:
        eligible, crossing = _causal_block_structure(sq, sk, block_size, q.device)
    else:
        eligible = torch.ones(mq, mk, dtype=torch.bool, device=q.device)
        crossing = torch.zeros_like(eligible)
    scores = (pooled_q @ pooled_k.transpose(-1, -2)) * scale
    p_c = torch.softmax(scores.masked_fill(~eligible, float("-inf")), dim=-1)
    p_c = torch.nan_to_num(p_c, nan=0.0)  # rows with no eligible block
    # one total order per row: eligible by P_c descending (stable: ties to the lower index),
    # ineligible last
    key = torch.where(eligible, p_c, torch.full_like(p_c, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(mk, device=q.device).expand_as(order).contiguous())

    row_counts = _eligible_counts(sq, sk, block_size, causal)  # eligible.sum(-1), from the shapes
    n = torch.tensor(row_counts, dtype=torch.long, device=q.device)  # (Mq,)
    counts = [sla_block_counts(x, critical, negligible) for x in row_counts]
    n_crit = torch.tensor([c for c, _ in counts], device=q.device)[:, None]
    n_neg = torch.tensor([g for _, g in counts], device=q.device)[:, None]
    is_crit = eligible & (rank < n_crit)
    is_neg = eligible & (rank >= n[:, None] - n_neg)

    classes = torch.full(rank.shape, MARGINAL, dtype=torch.int8, device=q.device)
    classes[is_crit] = CRITICAL
    classes[is_neg] = NEGLIGIBLE
    invisible = ~eligible & ~crossing
    classes = torch.where(crossing, torch.tensor(CRITICAL, dtype=torch.int8, device=q.device), classes)
    classes = torch.where(invisible, torch.tensor(NEGLIGIBLE, dtype=torch.int8, device=q.device), classes)
    return classes


def sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor | None = None,
                  proj_bias: torch.Tensor | None = None, *, critical: float = 0.05, negligible: float = 0.10,
                  block_size: tuple[int, int] = (64, 64), feature_map: str = "softmax",
                  scale: float | None = None, causal: bool = False):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) bhsd; proj_weight (Dv, Dv), proj_bias (Dv,) or None
    (zeros). Output in q's dtype, computed in float32 (float64 for float64 inputs); autograd flows
    to q, k, v, proj_weight and proj_bias (not through the block classification).

    O_sparse: softmax attention over critical blocks (causal token mask inside them); rows with
    no critical key give 0. O_linear_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j
    phi(k_j) + 1e-6) over the keys j of row i's marginal blocks; 0 where there are none (or where
    that denominator is exactly 0)."""
    ct = compute_dtype(q.dtype)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    classes = sla_block_classes(q, k, critical=critical, negligible=negligible, block_size=block_size,
                                scale=scale, causal=causal)
    qc, kc, vc = q.to(ct), expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)

    sparse_mask = block_mask_to_tokens(classes == CRITICAL, block_size, sq, sk)
    if causal:
        sparse_mask = sparse_mask & causal_mask(sq, sk, q.device)
    out, _ = masked_softmax_attention((qc @ kc.transpose(-1, -2)) * scale, vc, sparse_mask)

    if proj_weight is None and proj_bias is None:
        return out.to(q.dtype)  # zero projection: the linear branch contributes nothing

    # marginal blocks are fully visible under causal, so no token mask is needed inside them
    marginal = block_mask_to_tokens(classes == MARGINAL, block_size, sq, sk).to(ct)
    phi = feature_map_fn(feature_map)
    a = (phi(qc) @ phi(kc).transpose(-1, -2)) * marginal  # phi(q_i) . phi(k_j) on marginal keys
    o_linear = safe_divide(a @ vc, a.sum(dim=-1, keepdim=True) + LINEAR_EPS)
    if proj_weight is not None:
        out = out + o_linear @ proj_weight.to(ct).transpose(0, 1)
    if proj_bias is not None:
        out = out + proj_bias.to(ct)
    return out.to(q.dtype)

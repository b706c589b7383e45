"""Softmax attention over the (query block, key block) pairs a bool block mask allows: the
ground truth for method block_sparse (and its fp64 kernel; the CPU fallback for other dtypes is
the memory-bounded kernels/block_sparse_torch_chunked.py)."""
from __future__ import annotations

import torch

from ._common import (block_mask_to_tokens, causal_mask, check_block_mask_shape, compute_dtype, expand_kv,
                      masked_softmax_attention)


def _check_mask(block_mask, batch: int, heads_q: int, seq_q: int, seq_k: int, block_size) -> None:
    """The ground truth checks its mask as attention() does (any device: it is moved to q's):
    a bool mask with one query block too many was cut to Sq tokens, a float or int one cast to
    bool (0.5 or -inf meaning "on"), so a wrong mask gave a plausible answer to compare against."""
    check_block_mask_shape(block_mask, batch, heads_q, seq_q, seq_k, block_size)


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                           block_size: tuple[int, int] = (64, 64), causal: bool = False,
                           scale: float | None = None, return_lse: bool = False):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) bhsd; block_mask bool (B or 1, Hq or 1,
    ceil(Sq/bq), ceil(Sk/bk)), True = the block pair is computed; the last blocks may be ragged.
    causal (bottom-right) further masks tokens inside the allowed blocks. Rows with nothing
    allowed give 0 and lse -inf (gradients finite). Output in q's dtype; lse float32 (float64 for
    float64 inputs), natural log, (B, Hq, Sq)."""
    ct = compute_dtype(q.dtype)
    b, hq, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    _check_mask(block_mask, b, hq, sq, sk, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(ct), expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
    mask = block_mask_to_tokens(block_mask.to(device=q.device, dtype=torch.bool), block_size, sq, sk)
    if causal:
        mask = mask & causal_mask(sq, sk, q.device)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    out, lse = masked_softmax_attention(scores, vc, mask)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if ct == torch.float64 else torch.float32)

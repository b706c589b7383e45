"""Exact softmax attention: the ground truth for method flash (and its fp64 kernel; the CPU
fallback for other dtypes is the memory-bounded kernels/flash_torch_chunked.py)."""
from __future__ import annotations

import torch

from ..key_mask import per_head
from ._common import causal_mask, compute_dtype, expand_kv, masked_softmax_attention


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False, key_mask: torch.Tensor | None = None):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) in bhsd. Output in q's dtype; lse float32
    (float64 for float64 inputs), natural log, shape (B, Hq, Sq). key_mask (B or 1, Sk) or
    (B or 1, Hq or 1, Sk): bool (True = attend) or floating (added to the scores), the same for
    every query row (attnlib/key_mask.py)."""
    ct = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(ct), expand_kv(k.to(ct), q.shape[1]), expand_kv(v.to(ct), q.shape[1])
    scores = (qc @ kc.transpose(-1, -2)) * scale
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    if key_mask is not None:
        keys = per_head(key_mask)[:, :, None, :]
        if keys.dtype == torch.bool:
            mask = keys if mask is None else mask & keys
        else:
            scores = scores + keys.to(ct)
    out, lse = masked_softmax_attention(scores, vc, mask)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if ct == torch.float64 else torch.float32)

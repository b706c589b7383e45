"""AsymRnR (arXiv 2412.11706) in plain PyTorch: similarity, matching, and the row gathers/merges of
reduce and restore. Ground truth for the Triton kernels and the torch backend of attnlib.asymrnr.

Tensors are bhsd (B, H, S, D); index tensors are int64. Similarities are computed in float32
(float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from ._common import compute_dtype

# bound the (B, H, sources, destinations) similarity block held at once
_CHUNK_ELEMENTS = 1 << 26
_COSINE_EPS = 1e-12


def asymrnr_similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., Na, D) x (..., Nb, D) -> (..., Na, Nb), larger = more similar.

    euclidean: minus the squared distance in matmul form, -(|a|^2 - 2 a.b + |b|^2);
    cosine: a.b / (|a| |b|); dot: a.b.
    """
    ct = compute_dtype(a.dtype)
    a, b = a.to(ct), b.to(ct)
    if metric == "euclidean":
        a2 = (a * a).sum(-1, keepdim=True)
        b2 = (b * b).sum(-1).unsqueeze(-2)
        return -(a2 - 2.0 * (a @ b.transpose(-1, -2)) + b2)
    if metric == "cosine":
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        return a @ b.transpose(-1, -2)
    if metric == "dot":
        return a @ b.transpose(-1, -2)
    raise ValueError(f"metric must be one of ('euclidean', 'cosine', 'dot'), got {metric!r}")


def asymrnr_match_reference(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, metric: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source token, its most similar destination: (node (B, H, n_src) int64 index into
    dst, score (B, H, n_src) its similarity). Ties go to the lowest destination index."""
    B, H = x.shape[:2]
    xd = x.index_select(2, dst)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * dst.numel()))
    nodes, scores = [], []
    for i in range(0, src.numel(), chunk):
        sim = asymrnr_similarity(x.index_select(2, src[i:i + chunk]), xd, metric)
        score, node = sim.max(dim=-1)
        nodes.append(node)
        scores.append(score)
    if not nodes:
        empty = x.new_empty(B, H, 0, dtype=compute_dtype(x.dtype))
        return empty.to(torch.int64), empty
    return torch.cat(nodes, -1), torch.cat(scores, -1)


def asymrnr_gather_reference(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, h, i] = x[b, h, idx[b, h, i]] (reduce "replace", and restore)."""
    res = x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
    if out is None:
        return res
    return out.copy_(res)


def asymrnr_merge_reference(x: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Mean of the tokens sharing a slot: out[b, h, j] = mean of x[b, h, i] over slot[b, h, i] == j
    (reduce "mean": a removed source is averaged into its destination). Every slot needs a token."""
    ct = compute_dtype(x.dtype)
    B, H, _, D = x.shape
    acc = torch.zeros(B, H, n_slots, D, dtype=ct, device=x.device)
    acc.scatter_add_(2, slot.unsqueeze(-1).expand(*slot.shape, D), x.to(ct))
    counts = torch.zeros(B, H, n_slots, dtype=ct, device=x.device)
    counts.scatter_add_(2, slot, torch.ones(slot.shape, dtype=ct, device=x.device))
    return (acc / counts.unsqueeze(-1)).to(x.dtype)

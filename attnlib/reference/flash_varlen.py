"""Exact softmax attention on packed variable-length sequences: the ground truth for
flash_attention_varlen (and its torch backend in float64; fp16/bf16/fp32 run flash-torch-chunked's
memory-bounded functions). Loops over sequences calling flash_reference."""
from __future__ import annotations

import torch

from .flash import flash_reference


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # (s, h, d) -> (1, h, s, d)


def _one_sequence(q, k, v, causal: bool, scale: float):
    """(out (s_q, Hq, Dv), lse (Hq, s_q)) of one sequence; no keys gives 0 and -inf."""
    out, lse = flash_reference(_bhsd(q), _bhsd(k), _bhsd(v), causal=causal, scale=scale, return_lse=True)
    return out[0].transpose(0, 1), lse[0]


def flash_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                           return_lse: bool = False):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D[v]); sequence b is rows cu[b]:cu[b+1].
    Output (total_q, Hq, Dv) in q's dtype; lse (Hq, total_q), float32 (float64 for float64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, lse = _one_sequence(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal, scale)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=1)

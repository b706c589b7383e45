"""Exact softmax attention on packed variable-length sequences: the ground truth for
flash_attention_varlen (and its torch backend in float64; fp16/bf16/fp32 run flash-torch-chunked's
memory-bounded functions). Loops over sequences calling flash_reference."""
from __future__ import annotations

import torch

from .flash import flash_reference


def per_sequence(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor):
    """A dense attention fn(q, k, v) -> (out, lse) on (1, H, s, d) views run over packed varlen
    sequences (flash_attention_varlen's layout): (out (total_q, H, Dv), lse (H, total_q)); rows
    past cu_seqlens_q[-1] (padding) give 0 and -inf. cu_seqlens may also come as lists (read
    before a torch.func transform: torch 2.8's functorch refuses .tolist() inside one)."""
    outs, lses = [], []
    cq, ck = (list(c.tolist() if isinstance(c, torch.Tensor) else c) for c in (cu_seqlens_q, cu_seqlens_k))
    for b in range(len(cq) - 1):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in
                      (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]))
        o, lse = fn(qs, ks, vs)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    pad = q.shape[0] - cq[-1]
    if pad:
        outs.append(q.new_zeros(pad, q.shape[1], v.shape[2], dtype=outs[0].dtype))
        lses.append(torch.full((q.shape[1], pad), float("-inf"), dtype=lses[0].dtype, device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=1)


def flash_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                           return_lse: bool = False):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D[v]); sequence b is rows cu[b]:cu[b+1] (cu_seqlens
    as int tensors or lists); a sequence with no keys gives 0 and -inf. Output (total_q, Hq, Dv)
    in q's dtype; lse (Hq, total_q), float32 (float64 for float64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if len(cu_seqlens_q) < 2:  # no sequence
        out = q.new_zeros(0, q.shape[1], v.shape[2])
        return (out, q.new_zeros(q.shape[1], 0, dtype=torch.float32)) if return_lse else out
    out, lse = per_sequence(lambda *qkv: flash_reference(*qkv, causal=causal, scale=scale, return_lse=True),
                            q, k, v, cu_seqlens_q, cu_seqlens_k)
    return (out, lse) if return_lse else out

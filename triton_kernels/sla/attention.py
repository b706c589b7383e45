"""SLA forward and backward orchestration: classification, key-block preprocess, the fused
forward, the projection epilogue (out = O_s + O_l W^T + b, a torch matmul after the kernel), and
the backward (recompute of the forward's intermediates, block_sparse's backward for the
critical branch, the linear-branch kernels, and dW = sum G^T O_l, db = sum G)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..block_sparse.backward import block_sparse_bwd
from . import classify as cls_mod
from .backward import sla_linear_bwd
from .forward import sla_fwd


@dataclass
class SLAForward:
    """What the backward needs from a forward (recomputed there, not stored by the op)."""

    classes: torch.Tensor          # int8 (B, Hq, Mq, Mk)
    rows: cls_mod.BlockIndex
    out_sparse: torch.Tensor       # (B, Hq, Sq, D)
    lse: Optional[torch.Tensor]    # (B, Hq, Sq) fp32
    o_l: Optional[torch.Tensor]    # (B, Hq, Mq * bq, D) fp32, or None without the linear branch
    h: Optional[torch.Tensor]
    z: Optional[torch.Tensor]


def sla_forward_parts(q, k, v, *, linear: bool, critical: float, negligible: float, block_size, feature: str,
                      scale: float, causal: bool, out_sparse: torch.Tensor, with_lse: bool) -> SLAForward:
    """Run classification, preprocess and the fused kernel on bhsd views; writes out_sparse."""
    pooled_k, h, z = cls_mod.key_blocks(k, v, block_n=block_size[1], feature=feature, linear=linear)
    classes = cls_mod.classify(q, pooled_k, seq_k=k.shape[2], block_size=block_size, critical=critical,
                               negligible=negligible, scale=scale, causal=causal)
    rows = cls_mod.class_index(classes)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if with_lse else None
    o_l = sla_fwd(q, k, v, out_sparse, rows, block_size=block_size, causal=causal, scale=scale, feature=feature,
                  h=h, z=z, lse=lse)
    return SLAForward(classes, rows, out_sparse, lse, o_l, h, z)


def sla_forward(q, k, v, out: torch.Tensor, proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
                *, critical: float, negligible: float, block_size, feature: str, scale: float,
                causal: bool) -> torch.Tensor:
    """out (bhsd view, q's dtype) = O_s + O_l W^T + b; the linear branch runs only with a weight."""
    seq_q = q.shape[2]
    linear = proj_weight is not None
    if not linear and proj_bias is None:
        sla_forward_parts(q, k, v, linear=False, critical=critical, negligible=negligible, block_size=block_size,
                          feature=feature, scale=scale, causal=causal, out_sparse=out, with_lse=False)
        return out
    o_s = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    parts = sla_forward_parts(q, k, v, linear=linear, critical=critical, negligible=negligible,
                              block_size=block_size, feature=feature, scale=scale, causal=causal, out_sparse=o_s,
                              with_lse=False)
    res = o_s
    if linear:
        res = res + parts.o_l[:, :, :seq_q] @ proj_weight.float().transpose(0, 1)
    if proj_bias is not None:
        res = res + proj_bias.float()
    out.copy_(res)
    return out


def sla_backward(dout, q, k, v, proj_weight, proj_bias, *, critical: float, negligible: float, block_size,
                 feature: str, scale: float, causal: bool):
    """(dq, dk, dv, d proj_weight, d proj_bias) for bhsd views; None for an absent projection."""
    seq_q, seq_k = q.shape[2], k.shape[2]
    linear = proj_weight is not None
    o_s = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    parts = sla_forward_parts(q, k, v, linear=linear, critical=critical, negligible=negligible,
                              block_size=block_size, feature=feature, scale=scale, causal=causal, out_sparse=o_s,
                              with_lse=True)
    cols = cls_mod.class_index(parts.classes.transpose(-1, -2))
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = block_sparse_bwd(dout, q, k, v, o_s, parts.lse, parts.rows.row_form, cols.row_form,
                                  block_size=block_size, causal=causal, scale=scale)
    g = dout.float()
    d_bias = g.sum(dim=(0, 1, 2)).to(proj_bias.dtype) if proj_bias is not None else None
    if not linear:
        return dq, dk, dv, None, d_bias
    w = proj_weight.float()
    o_l = parts.o_l[:, :, :seq_q]
    d_weight = (g.reshape(-1, g.shape[-1]).transpose(0, 1) @ o_l.reshape(-1, o_l.shape[-1])).to(proj_weight.dtype)
    dol = torch.zeros_like(parts.o_l)
    dol[:, :, :seq_q] = g @ w
    dql, dkl, dvl = sla_linear_bwd(q, k, v, dol, parts.o_l, parts.h, parts.z, parts.rows, cols,
                                   block_size=block_size, feature=feature)
    dq = (dq.float() + dql[:, :, :seq_q]).to(q.dtype)
    dk = (dk.float() + dkl[:, :, :seq_k]).to(k.dtype)
    dv = (dv.float() + dvl[:, :, :seq_k]).to(v.dtype)
    return dq, dk, dv, d_weight, d_bias

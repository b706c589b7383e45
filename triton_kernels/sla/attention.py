"""SLA forward and backward orchestration: classification, key-block preprocess, the fused
forward, the projection epilogue (out = O_s + O_l W^T + b, a torch matmul after the kernel), and
the backward (the block map and key-block states re-formed, one recompute pass over the
critical blocks for lse and delta, block_sparse's backward for the critical branch, the
linear-branch kernels adding into its dq, dk, dv, and dW = sum dO^T O_l, db = sum dO)."""
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
    o_l: Optional[torch.Tensor]    # (B, Hq, Sq, D) fp32, or None without the linear branch
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
        res = res + parts.o_l @ proj_weight.float().transpose(0, 1)
    if proj_bias is not None:
        res = res + proj_bias.float()
    out.copy_(res)
    return out


def sla_backward(dout, q, k, v, proj_weight, proj_bias, *, critical: float, negligible: float, block_size,
                 feature: str, scale: float, causal: bool):
    """(dq, dk, dv, d proj_weight, d proj_bias) for bhsd views; None for an absent projection.

    The op saves no SLA intermediates, so this re-forms what is cheap (the key-block states h, z
    and the block map: no N x N work) and re-walks the critical blocks once for lse and
    delta = rowsum(dO * O_s) (O_s in fp32, never stored) and, with the linear branch, O_l for dW.
    Nothing D x D is kept per query block. Memory it allocates beyond dq, dk, dv, dW, db, in bytes,
    with Mq = ceil(Sq/bq), Mk = ceil(Sk/bk) and P = backward.TOTAL_SPLITS:
      classification  B*Hkv*Mk*4*D (pooled K) + B*Hq*Mq*Mk*(4 + 1 + 2 * 4) (scores, map, row and
                      column index forms) + the sort's temporaries (B*Hq*Mq*Mk*8, transient)
      states          B*Hkv*Mk*4*(D*D + D) (h, z) + B*Hkv*4*(D*D + D) (their sums)
      lse, delta      2 * B*Hq*Sq*4
      linear branch   B*Hq*Sq*D*4 (O_l, freed after dW) + B*Hq*Sq*D*4 (dO in fp32, freed after G)
                      + B*Hq*Sq*D*4 (G = dO W, then dN in place) + B*Hq*Sq*4 (dd)
                      + B*Hq*(P + 1)*4*(D*D + D) (totals); at most two of the three N x D
                      buffers are alive at once
    At Wan2.1-1.3B (B=1, H=12, D=128, S=32760, 64 x 64 blocks): h 403 MB + 2 * 201 MB of
    N x D fp32 at peak + about 45 MB of maps and index forms: about 0.85 GB."""
    seq_k = k.shape[2]
    linear = proj_weight is not None
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    pooled_k, h, z = cls_mod.key_blocks(k, v, block_n=block_size[1], feature=feature, linear=linear)
    classes = cls_mod.classify(q, pooled_k, seq_k=seq_k, block_size=block_size, critical=critical,
                               negligible=negligible, scale=scale, causal=causal)
    del pooled_k
    rows = cls_mod.class_index(classes)
    cols = cls_mod.class_index(classes.transpose(-1, -2))
    del classes
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    o_l = sla_fwd(q, k, v, None, rows, block_size=block_size, causal=causal, scale=scale, feature=feature,
                  h=h, z=z, lse=lse, dout=dout, delta=delta)
    dq, dk, dv = block_sparse_bwd(dout, q, k, v, None, lse, rows.row_form, cols.row_form,
                                  block_size=block_size, causal=causal, scale=scale, delta=delta)
    del lse, delta
    d_bias = dout.sum(dim=(0, 1, 2), dtype=torch.float32).to(proj_bias.dtype) if proj_bias is not None else None
    if not linear:
        return dq, dk, dv, None, d_bias
    g = dout.float()
    d_weight = (g.reshape(-1, g.shape[-1]).transpose(0, 1) @ o_l.reshape(-1, o_l.shape[-1])).to(proj_weight.dtype)
    del o_l
    dn = g @ proj_weight.float()  # G = dO_l; the linear dq kernel turns it into dN in place
    del g
    sla_linear_bwd(q, k, v, dn, h, z, rows, cols, dq, dk, dv, block_size=block_size, feature=feature)
    return dq, dk, dv, d_weight, d_bias

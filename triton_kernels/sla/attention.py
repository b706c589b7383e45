"""SLA forward and backward orchestration: classification, key-block preprocess, the fused
forward with its projection epilogue (out = O_s + O_l W^T + b written once by the kernel), and
the backward (the block map and key-block states re-formed; the linear-branch dq kernel first,
writing O_l and G . O_l; delta from the saved output, re-formed from the critical blocks for the
tiles of rows where a 16-bit output's rounding spoiled it (delta.py); block_sparse's backward
for the critical branch with the critical blocks' lse kept by the forward, adding to that dq;
the linear-branch dk/dv kernels; dW = sum dO^T O_l, db = sum dO). When no block can be marginal the linear branch
is skipped in both directions (_runs_linear)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..block_sparse.backward import block_sparse_bwd
from . import classify as cls_mod
from .backward import sla_linear_bwd, sla_linear_dkdv, sla_linear_dq
from .delta import sla_delta
from .forward import sla_fwd, state_precision
from .aggregation import row_states_enabled
from .row_states import row_states


@dataclass
class SLAForward:
    """What one forward produced (of it, the op keeps only lse, for the backward)."""

    classes: torch.Tensor          # int8 (B, Hq, Mq, Mk)
    rows: cls_mod.BlockIndex
    out_sparse: torch.Tensor       # (B, Hq, Sq, D)
    lse: Optional[torch.Tensor]    # (B, Hq, Sq) fp32
    o_l: Optional[torch.Tensor]    # (B, Hq, Sq, D) fp32, or None without the linear branch
    h: Optional[torch.Tensor]
    z: Optional[torch.Tensor]


def sla_forward_parts(q, k, v, *, linear: bool, critical: float, negligible: float, block_size, feature: str,
                      scale: float, causal: bool, out_sparse: torch.Tensor, with_lse: bool,
                      weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> SLAForward:
    """Run classification, preprocess and the fused kernel on bhsd views; writes out_sparse
    (O_s, or O_s + O_l W^T + b given weight / bias: then o_l is None)."""
    pooled_k, h, z = cls_mod.key_blocks(k, v, block_n=block_size[1], feature=feature, linear=linear)
    classes = cls_mod.classify(q, pooled_k, seq_k=k.shape[2], block_size=block_size, critical=critical,
                               negligible=negligible, scale=scale, causal=causal)
    rows = cls_mod.class_index(classes)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if with_lse else None
    o_l = sla_fwd(q, k, v, out_sparse, rows, block_size=block_size, causal=causal, scale=scale, feature=feature,
                  h=h, z=z, lse=lse, rows_hz=_rows_hz(classes, h, z, q.dtype) if linear else None,
                  weight=weight, bias=bias)
    return SLAForward(classes, rows, out_sparse, lse, o_l, h, z)


def _rows_hz(classes, h, z, dtype):
    """The query blocks' marginal state sums as one product per head (row_states.py:
    B*Hq*Mq*(D*D + D)*4 bytes); None with ATTNLIB_SLA_ROW_STATES=0 (per-tile pre-aggregation)."""
    return row_states(classes, h, z, state_precision(dtype)) if row_states_enabled() else None


def _runs_linear(q, k, proj_weight, block_size, causal: bool, critical: float, negligible: float) -> bool:
    """The linear branch runs with a weight and when some block can be marginal. Without one
    (e.g. negligible = 1 - critical) O_l is 0 on every row, so out = O_s + b, dW = 0: no key-block
    states, no pre-aggregation, no projection epilogue and no linear backward kernels."""
    if proj_weight is None:
        return False
    return cls_mod.has_marginal_blocks(q.shape[2], k.shape[2], tuple(block_size), causal, critical, negligible)


def sla_forward(q, k, v, out: torch.Tensor, proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
                *, critical: float, negligible: float, block_size, feature: str, scale: float,
                causal: bool, with_lse: bool = False):
    """out (bhsd view, q's dtype) = O_s + O_l W^T + b, in the kernel's epilogue (nothing N x D
    besides out is written); the linear branch runs only with a weight and when some block can
    be marginal (_runs_linear). with_lse: returns (out, lse of the critical blocks' softmax) for
    sla_backward."""
    linear = _runs_linear(q, k, proj_weight, block_size, causal, critical, negligible)
    parts = sla_forward_parts(q, k, v, linear=linear, critical=critical, negligible=negligible,
                              block_size=block_size, feature=feature, scale=scale, causal=causal, out_sparse=out,
                              with_lse=with_lse, weight=proj_weight if linear else None, bias=proj_bias)
    return (out, parts.lse) if with_lse else out


PROJECT_CHUNK_BYTES = 64 << 20  # fp32 copy of dO held at once by project_grad


def project_grad(dout: torch.Tensor, o_l: Optional[torch.Tensor], weight: Optional[torch.Tensor]
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(G = dO W (B, Hq, Sq, D) fp32 contiguous, dW = sum over rows of dO^T O_l fp32) for a bhsd
    view dout, in (batch, head-range) chunks, so no fp32 copy of the whole dO is made. Without
    weight G is None; without o_l dW is None."""
    batch, heads, seq_q, d = dout.shape
    g_all = torch.empty(batch, heads, seq_q, d, dtype=torch.float32, device=dout.device) if weight is not None else None
    d_weight = torch.zeros(d, d, dtype=torch.float32, device=dout.device) if o_l is not None else None
    w = weight.float() if weight is not None else None
    step = max(1, min(heads, PROJECT_CHUNK_BYTES // max(1, 4 * seq_q * d)))
    for b in range(batch):
        for h0 in range(0, heads, step):
            g = dout[b, h0:h0 + step].float()
            if w is not None:
                torch.matmul(g, w, out=g_all[b, h0:h0 + step])
            if o_l is not None:
                d_weight.addmm_(g.reshape(-1, d).transpose(0, 1), o_l[b, h0:h0 + step].reshape(-1, d))
    return g_all, d_weight


def sla_backward(dout, q, k, v, proj_weight, proj_bias, *, critical: float, negligible: float, block_size,
                 feature: str, scale: float, causal: bool, out: Optional[torch.Tensor] = None,
                 lse: Optional[torch.Tensor] = None):
    """(dq, dk, dv, d proj_weight, d proj_bias) for bhsd views; None for an absent projection,
    zeros for a weight when no block can be marginal (_runs_linear: the linear branch is skipped).

    The block map and the key-block states h, z are re-formed (no N x N work). With the forward's
    out and the critical blocks' lse (sla_forward(with_lse=True)), the critical branch is not
    walked again, and the linear branch's dq kernel runs first: it forms each query block's
    state sums once and writes O_l (for dW) and G . O_l per row, so delta = rowsum(dO * out) -
    G . O_l - dO . b (triton_kernels/sla/delta.py); the critical branch's dq then adds to its dq.
    A 16-bit out that carries b or O_l W^T holds O_s only to |out|'s rounding: the delta kernel
    flags the rows where that costs delta more than delta.RECOMPUTE_RATIO times O_s's own
    rounding, and the query tiles holding one walk their critical blocks again for an exact delta
    (sla_fwd with redo; the other tiles walk nothing).
    Without them, one pass re-walks the critical blocks for lse, delta and O_l first. Nothing
    D x D is kept per query block. Memory it allocates beyond dq, dk, dv, dW, db, in bytes, with
    Mq = ceil(Sq/bq), Mk = ceil(Sk/bk) and P = backward.TOTAL_SPLITS:
      classification  B*Hkv*Mk*4*D (pooled K) + B*Hq*Mq*Mk*(4 + 1 + 2 * 4) (scores, map, row and
                      column index forms) + the sort's temporaries (B*Hq*Mq*Mk*8, transient)
      states          B*Hkv*Mk*4*(D*D + D) (h, z) + B*Hkv*4*(D*D + D) (their sums)
      lse, delta      B*Hq*Sq*4 each (lse is the forward's when saved); B*Hq*Sq (delta's flags,
                      16-bit out with b or the linear branch)
      linear branch   B*Hq*Sq*D*4 (O_l, freed after delta and dW) + B*Hq*Sq*D*4 (G = dO W, then dN
                      in place) + B*Hq*Sq*4 (dd) + B*Hq*(P + 1)*4*(D*D + D) (totals)
                      + PROJECT_CHUNK_BYTES (dO in fp32, a chunk at a time)
      row states      unless ATTNLIB_SLA_ROW_STATES=0 (row_states.py): B*Hq*Mq*4*(D*D + D)
                      (H_i, Z_i; freed after the linear dq), then the same for dH_i, dZ_i and
                      B*Hkv*Mk*4*(D*D + D) for their per-key-block sums
    At Wan2.1-1.3B (B=1, H=12, D=128, S=32760, 64 x 64 blocks): h 403 MB + 2 * 201 MB of
    N x D fp32 at peak + about 45 MB of maps and index forms + 64 MB: about 0.9 GB, and the row
    states up to about 0.8 GB more (none per tile)."""
    seq_k = k.shape[2]
    linear = _runs_linear(q, k, proj_weight, block_size, causal, critical, negligible)
    no_linear_dw = torch.zeros_like(proj_weight) if proj_weight is not None and not linear else None
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    pooled_k, h, z = cls_mod.key_blocks(k, v, block_n=block_size[1], feature=feature, linear=linear)
    classes = cls_mod.classify(q, pooled_k, seq_k=seq_k, block_size=block_size, critical=critical,
                               negligible=negligible, scale=scale, causal=causal)
    del pooled_k
    rows = cls_mod.class_index(classes)
    cols = cls_mod.class_index(classes.transpose(-1, -2))
    rows_hz = _rows_hz(classes, h, z, q.dtype) if linear else None
    if rows_hz is None:
        del classes
    kw = dict(block_size=block_size, causal=causal, scale=scale, feature=feature, h=h, z=z, rows_hz=rows_hz)
    d_bias = dout.sum(dim=(0, 1, 2), dtype=torch.float32).to(proj_bias.dtype) if proj_bias is not None else None
    holder = list(rows_hz) if rows_hz is not None else None  # emptied after the linear dq kernel
    lin = dict(block_size=block_size, feature=feature)
    if lse is not None and out is not None:
        # the linear dq kernel runs first: it forms the state sums once, writes O_l and G . O_l
        # (for dW and delta) and its dq part, which the critical branch's dq then adds to
        out = out if out.stride(-1) == 1 else out.contiguous()
        dq_acc = dd = d_weight = None
        # a 16-bit out that also carries b or O_l W^T may have lost O_s's digits: delta.py flags
        # the rows where it did, and their tiles re-walk the critical blocks for delta
        redo = (torch.empty(q.shape[:3], dtype=torch.int8, device=q.device)
                if out.element_size() < 4 and (linear or proj_bias is not None) else None)
        if linear:
            g = project_grad(dout, None, proj_weight)[0]
            o_l = torch.empty_like(g)
            gol = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            dq_acc = torch.zeros_like(q)
            del kw, rows_hz
            dd = sla_linear_dq(q, k, g, h, z, rows, dq_acc, rows_hz=holder, o_l=o_l, gol=gol, **lin)
            d_weight = project_grad(dout, o_l, None)[1]
            delta = sla_delta(dout, out, proj_bias, gol=gol, redo=redo, o_l=o_l if redo is not None else None,
                              weight=proj_weight if redo is not None else None)
            del o_l, gol
        else:
            delta = sla_delta(dout, out, proj_bias, redo=redo)
        if redo is not None:
            sla_fwd(q, k, v, None, rows, block_size=block_size, causal=causal, scale=scale, feature=feature,
                    dout=dout, delta=delta, redo=redo)
            del redo
        dq, dk, dv = block_sparse_bwd(dout, q, k, v, None, lse, rows.row_form, cols.row_form, block_size=block_size,
                                      causal=causal, scale=scale, delta=delta, dq_acc=dq_acc)
        del lse, delta
        if not linear:
            return dq, dk, dv, no_linear_dw, d_bias
        sla_linear_dkdv(q, k, v, g, dd, rows, cols, dk, dv, classes=classes if holder is not None else None, **lin)
        return dq, dk, dv, d_weight.to(proj_weight.dtype), d_bias
    # without the forward's lse: one pass re-walks the critical blocks for lse, delta and O_l
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    o_l = sla_fwd(q, k, v, None, rows, lse=lse, dout=dout, delta=delta, **kw)
    g = d_weight = None
    if linear:
        g, d_weight = project_grad(dout, o_l, proj_weight)
    del o_l, kw, rows_hz
    dq, dk, dv = block_sparse_bwd(dout, q, k, v, None, lse, rows.row_form, cols.row_form,
                                  block_size=block_size, causal=causal, scale=scale, delta=delta)
    del lse, delta
    if not linear:
        return dq, dk, dv, no_linear_dw, d_bias
    # G = dO_l; the linear dq kernel turns it into dN in place
    sla_linear_bwd(q, k, v, g, h, z, rows, cols, dq, dk, dv, rows_hz=holder,
                   classes=classes if holder is not None else None, **lin)
    return dq, dk, dv, d_weight.to(proj_weight.dtype), d_bias

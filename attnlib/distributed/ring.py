"""Ring attention: K/V shards travel around the ring while each rank attends to the one it holds.

Forward (Liu et al., "Ring Attention with Blockwise Transformers", 2023): at step s rank r holds
the K/V shard of rank (r - s) mod P. It posts the send of that shard to r + 1 and the receive
of the next one from r - 1 (one ``batch_isend_irecv``) *before* it runs attention on the
current shard, so the transfer hides behind the compute; the partial (out, lse) of each step
are combined with :func:`merge_attention`.

Backward: the same ring once more. Each rank keeps its queries, dO, the final out and the
global lse; K/V travel as in forward and the dK/dV accumulated for a shard travel with it
(one step behind), ending on the shard's owner after P exchanges. The block gradients are
the exact softmax ones, recomputed from the global lse: P = exp(S - lse), dV = P^T dO,
dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.

Causal attention uses the zigzag order (ring-flash-attention; Brandon et al., "Striped
Attention", 2023 for the idea of balancing): the sequence is cut into 2P chunks and rank r
holds chunks r and 2P-1-r, see :func:`zigzag_shard`. Then, for the shard of rank j:
j == r is causal attention of the local block (chunk order is preserved inside the shard, so
the local causal mask is exact); j < r: both query chunks see all of j's first chunk and none
of its second; j > r: only the second query chunk sees anything, and it sees all of j.
Every rank does the same work at every step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..dispatch import check_method
from ..inputs import check_layout, check_scale, from_bhsd, validate_qkv
from ..reference._common import causal_mask, expand_kv
from . import comm
from .merge import merge_attention

_KV_TAG, _GRAD_TAG = 0, 1
# rows of the score tile in the backward are chunked so that one tile holds about this many elements
_BWD_TILE_ELEMENTS = 1 << 26


def require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed initialised (torch.distributed.init_process_group)")


def check_ring_method(method, what: str, needs_grad: bool) -> str:
    """The ring merges each step's partial result by its lse and computes the backward of exact
    softmax itself: only flash qualifies for training, sage (forward-only, as sage_attention) for
    inference. Checked before any exchange, on every rank alike."""
    check_method(method)
    if method not in ("flash", "sage"):
        raise ValueError(f"{what} runs ring attention, which merges each step's partial result by its lse, so "
                         f"its method must be 'flash' or 'sage' (softmax with lse and no required option), "
                         f"got {method!r}")
    if method == "sage" and needs_grad:
        raise ValueError(f"{what}(method='sage') is forward-only, as sage_attention is: q, k or v requires grad. "
                         f"Use method='flash' to train, or run under torch.no_grad()")
    return method


def visible_blocks(rank: int, src: int, seq: int, *, causal: bool, zigzag: bool, seq_k: Optional[int] = None):
    """(query rows, key rows, causal) blocks of rank ``rank``'s queries against rank ``src``'s
    K/V shard that have visible pairs, given local shard length ``seq`` (of the queries) and
    ``seq_k`` of the K/V shard (default ``seq``; it may differ only without causal)."""
    full = slice(0, seq)
    if not causal:
        return [(full, slice(0, seq if seq_k is None else seq_k), False)]
    if src == rank:
        return [(full, full, True)]
    if not zigzag:  # contiguous shards: earlier shards fully visible, later ones not at all
        return [(full, full, False)] if src < rank else []
    half = seq // 2
    if src < rank:
        return [(full, slice(0, half), False)]
    return [(slice(half, seq), full, False)]


def _block_attention(q, k, v, *, causal, scale, method, backend):
    """Local attention of one block (bhsd), returning (out, lse). A seam the tests instrument."""
    from ..api import attention

    return attention(q, k, v, method=method, backend=backend, layout="bhsd", causal=causal, scale=scale,
                     return_lse=True)


def _block_grads(q, k, v, dout, lse, delta, *, causal, scale, dq, dk, dv) -> None:
    """Accumulate the exact softmax gradients of one block into dq, dk, dv (in place).

    ``lse`` is the global normaliser of these query rows, ``delta`` = rowsum(dO * O) - dlse.
    """
    ct = dq.dtype
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    kc, vc = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
    dk_e = torch.zeros(b, hq, sk, k.shape[3], dtype=ct, device=q.device)
    dv_e = torch.zeros(b, hq, sk, v.shape[3], dtype=ct, device=q.device)
    mask = causal_mask(sq, sk, q.device) if causal else None
    rows = max(1, _BWD_TILE_ELEMENTS // max(1, b * hq * sk))
    for r0 in range(0, sq, rows):
        r = slice(r0, min(sq, r0 + rows))
        qc, doc = q[:, :, r].to(ct), dout[:, :, r].to(ct)
        s = (qc @ kc.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[r], float("-inf"))
        l = lse[:, :, r].to(ct)
        l = torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l)  # empty rows: p = 0
        p = torch.exp(s - l.unsqueeze(-1))
        dv_e += p.transpose(-1, -2) @ doc
        ds = p * (doc @ vc.transpose(-1, -2) - delta[:, :, r].to(ct).unsqueeze(-1))
        dq[:, :, r] += scale * (ds @ kc)
        dk_e += scale * (ds.transpose(-1, -2) @ qc)
    group = hq // hkv
    # the head dims are spelled out: with an empty K/V shard (sk = 0) a -1 cannot be inferred
    dk += dk_e.view(b, hkv, group, sk, k.shape[3]).sum(2)
    dv += dv_e.view(b, hkv, group, sk, v.shape[3]).sum(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, zigzag, scale, method, backend, layout):
        world, rank = comm.group_size(group), comm.group_rank(group)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, h, s, _ = q.shape
        acc_out = torch.zeros(b, h, s, v.shape[3], dtype=ct, device=q.device)
        acc_lse = torch.full((b, h, s), float("-inf"), dtype=ct, device=q.device)
        ring = comm.RingExchange(group, tag=_KV_TAG)
        k_cur, v_cur = k, v
        for step in range(world):
            src = (rank - step) % world
            nxt = ring.start([k_cur, v_cur]) if step + 1 < world else None  # before the compute
            for qs, ks, blk_causal in visible_blocks(rank, src, s, causal=causal, zigzag=zigzag, seq_k=k.shape[2]):
                o, l = _block_attention(q[:, :, qs], k_cur[:, :, ks], v_cur[:, :, ks], causal=blk_causal,
                                        scale=scale, method=method, backend=backend)
                acc_out[:, :, qs], acc_lse[:, :, qs] = merge_attention(
                    [acc_out[:, :, qs], o], [acc_lse[:, :, qs], l])
            if nxt is not None:
                ring.wait()
                k_cur, v_cur = nxt
        # the output lives in the caller's layout; autograd sees its bhsd view
        if layout == "bhsd":
            out = torch.empty(b, h, s, v.shape[3], dtype=q.dtype, device=q.device)
        else:
            out = torch.empty(b, s, h, v.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
        out.copy_(acc_out)
        lse = acc_lse.to(torch.float64 if ct == torch.float64 else torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.zigzag, ctx.scale = group, causal, zigzag, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: it raises, never returns a constant
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, zigzag, scale = ctx.group, ctx.causal, ctx.zigzag, ctx.scale
        world, rank = comm.group_size(group), comm.group_rank(group)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = q.shape[2]
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        delta = (dout.to(ct) * out.to(ct)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(ct)
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        kv_ring = comm.RingExchange(group, tag=_KV_TAG)
        grad_ring = comm.RingExchange(group, tag=_GRAD_TAG)
        k_cur, v_cur = k, v
        dk_in = dv_in = None
        for step in range(world):
            src = (rank - step) % world
            nxt = kv_ring.start([k_cur, v_cur]) if step + 1 < world else None
            dk_blk = torch.zeros(k.shape, dtype=ct, device=k.device)
            dv_blk = torch.zeros(v.shape, dtype=ct, device=v.device)
            for qs, ks, blk_causal in visible_blocks(rank, src, s, causal=causal, zigzag=zigzag, seq_k=k.shape[2]):
                _block_grads(q[:, :, qs], k_cur[:, :, ks], v_cur[:, :, ks], dout[:, :, qs], lse[:, :, qs],
                             delta[:, :, qs], causal=blk_causal, scale=scale,
                             dq=dq[:, :, qs], dk=dk_blk[:, :, ks], dv=dv_blk[:, :, ks])
            if step > 0:  # the dK/dV that earlier ranks accumulated for this shard
                grad_ring.wait()
                dk_blk += dk_in
                dv_blk += dv_in
            if world > 1:
                dk_in, dv_in = grad_ring.start([dk_blk, dv_blk])
            else:
                dk_in, dv_in = dk_blk, dv_blk
            if nxt is not None:
                kv_ring.wait()
                k_cur, v_cur = nxt
        grad_ring.wait()  # after P exchanges each shard's gradient is back with its owner
        return (dq.to(q.dtype), dk_in.to(k.dtype), dv_in.to(v.dtype),
                None, None, None, None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                   method: str = "flash", backend: str = "auto", layout: str = "bshd", causal: bool = False,
                   zigzag: bool = True, scale: Optional[float] = None, return_lse: bool = False):
    """Exact attention over a sequence sharded across the ranks of ``group`` (default: world).

    Each rank passes its shard: q (B, S/P, Hq, D) and k, v (B, S/P, Hkv, D) for layout "bshd"
    ((B, H, S/P, D) for "bhsd"); every rank's shard must have the same shape. Without causal,
    any assignment of tokens to ranks works. With ``causal=True`` the shards must be in zigzag
    order (:func:`zigzag_shard`; shard length even), or, with ``zigzag=False``, contiguous
    (rank r holds the r-th slice; correct but rank P-1 does P times the work of rank 0).

    The local attention runs through ``attnlib.attention(method=..., backend=...)`` and must
    return lse: method "flash", or "sage" for inference (forward-only, as sage_attention: inputs
    that require grad are refused). The backward is that of exact softmax attention, computed
    blockwise in PyTorch (no double backward). No rank holds more than two K/V shards at a time.

    Returns the local output shard in the input's layout and dtype, and with ``return_lse``
    also its lse (B, Hq, S/P), float32.
    """
    require_initialized("ring_attention")
    comm.require_member(group, "ring_attention")
    layout = check_layout(layout)
    for name, flag in (("causal", causal), ("zigzag", zigzag)):
        if not isinstance(flag, bool):
            raise TypeError(f"ring_attention: {name} must be a bool, got {type(flag).__name__}")
    qb, kb, vb = validate_qkv(q, k, v, layout)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qb, kb, vb))
    check_ring_method(method, "ring_attention", needs_grad)
    scale = check_scale(scale, qb.shape[3])
    world = comm.group_size(group)
    # the shapes are agreed first: a rule checked on one rank's shape alone would let that rank
    # raise while the others wait for it in the next collective
    comm.check_same_shapes("ring_attention", {
        "batch": qb.shape[0], "heads_q": qb.shape[1], "heads_kv": kb.shape[1], "seq_q": qb.shape[2],
        "seq_k": kb.shape[2], "head_dim": qb.shape[3], "head_dim_v": vb.shape[3],
        "dtype": qb.dtype}, group, qb.device)
    if causal and qb.shape[2] != kb.shape[2]:
        raise ValueError(f"ring_attention(causal=True) needs query and key shards of one length "
                         f"(self-attention), got {qb.shape[2]} and {kb.shape[2]}")
    if causal and zigzag and world > 1 and qb.shape[2] % 2:
        raise ValueError(f"ring_attention(causal=True): a zigzag shard holds two equal chunks, so its "
                         f"length must be even, got {qb.shape[2]}")
    out, lse = _RingAttention.apply(qb, kb, vb, group, causal, zigzag, scale, method, backend, layout)
    out = from_bhsd(out, layout)
    return (out, lse) if return_lse else out

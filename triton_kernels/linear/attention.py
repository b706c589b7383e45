"""Linear attention forward and backward from the Triton primitives in kernels.py.

Forward: non-causal is two passes, (S, z) = state(phi(K), V) per kv head, then
O = phi(Q) S / (phi(Q) . z + eps); causal is the chunked kernel with the feature map fused.

Backward, with n_i = phi(q_i) S_i, d_i = phi(q_i) . z_i + eps, O_i = n_i / d_i and g = dO:
  dn_i = g_i / d_i,   dd_i = -(g_i . O_i) / d_i,
  dphi(q_i) = sum_{j vis} (dn_i . v_j + dd_i) phi(k_j),
  dphi(k_j) = sum_{i sees j} (dn_i . v_j + dd_i) phi(q_i),   dv_j = sum_{i sees j} (phi(q_i) . phi(k_j)) dn_i.
Non-causal these are state/apply products; causal they are the causal kernel on [dn, dd]
against [v, 1], and the same run backwards in time (sequences flipped, offset 0) for the
key side. The feature map's own derivative is applied by torch.func.vjp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def _phi_torch(name: str):
    return {
        "elu": lambda x: F.elu(x) + 1.0,
        "relu": F.relu,
        "softmax": lambda x: torch.softmax(x, dim=-1),
        "identity": lambda x: x,
    }[name]


def linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, feature: str,
               causal: bool, eps: float) -> torch.Tensor:
    """Write phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K) + eps) into out (bhsd views; causal
    bottom-right: query i sees keys j <= i + Sk - Sq; rows that see no key give 0)."""
    if causal:
        return kernels.causal(q, k, v, out, feature, offset=k.shape[2] - q.shape[2], normalize=True, eps=eps)
    s, z = kernels.state(k, v, feature)
    return kernels.apply(q, s, z, out, feature, eps)


def _group_sum(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, hq = x.shape[:2]
    return x.view(b, heads_kv, hq // heads_kv, *x.shape[2:]).sum(2)


def linear_bwd(dout, q, k, v, out, *, feature: str, causal: bool, eps: float):
    """(dq, dk, dv) in q/k/v's dtypes; dout, q, out (B, Hq, Sq, .), k, v (B, Hkv, Sk, .) bhsd views."""
    phi = _phi_torch(feature)
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    pq, vjp_q = torch.func.vjp(phi, q.float())
    pk, vjp_k = torch.func.vjp(phi, k.float())
    g = dout.float()
    vf = v.float()
    offset = k.shape[2] - q.shape[2]
    if causal:
        # d_i = sum_{j vis} phi(q_i) . phi(k_j) + eps: the causal kernel with values 1
        ones_k = vf.new_ones(*vf.shape[:3], 1)
        den = kernels.causal(pq, pk, ones_k, vf.new_empty(*pq.shape[:3], 1), "identity", offset=offset,
                             normalize=False)[..., 0] + eps
    else:
        s, z = kernels.state(pk, vf, "identity")
        den = torch.einsum("bhnd,bhd->bhn", pq, z.repeat_interleave(group, dim=1)) + eps
    zero = den == 0.0  # only with eps = 0: such rows output 0 and pass no gradient
    den = torch.where(zero, torch.ones_like(den), den)
    dn = torch.where(zero[..., None], 0.0, g / den[..., None])
    dd = torch.where(zero, 0.0, -(g * out.float()).sum(-1) / den)
    if causal:
        grad_rows = torch.cat([dn, dd[..., None]], dim=-1)            # (B, Hq, Sq, Dv + 1)
        v_one = torch.cat([vf, vf.new_ones(*vf.shape[:3], 1)], dim=-1)  # (B, Hkv, Sk, Dv + 1)
        dpq = kernels.causal(grad_rows, v_one, pk, torch.empty_like(pq), "identity", offset=offset, normalize=False)
        # key side: in time-reversed order query row i sees key row j iff i <= j (offset 0)
        flip = lambda t: t.flip(2)  # noqa: E731
        v_one_q = flip(v_one.repeat_interleave(group, dim=1))
        dpk = kernels.causal(v_one_q, flip(grad_rows), flip(pq), pq.new_empty(*v_one_q.shape[:3], pq.shape[-1]),
                             "identity", offset=0, normalize=False)
        dv = kernels.causal(flip(pk.repeat_interleave(group, dim=1)), flip(pq), flip(dn),
                            dn.new_empty(*v_one_q.shape[:3], dn.shape[-1]), "identity", offset=0, normalize=False)
        dpk, dv = _group_sum(flip(dpk), hkv), _group_sum(flip(dv), hkv)
    else:
        # dS = phi(Q)^T dn and dz = phi(Q)^T dd per query head, summed over the group
        ds, _ = kernels.state(pq, dn, "identity")
        dz = torch.einsum("bhnd,bhn->bhd", pq, dd)
        ds, dz = _group_sum(ds, hkv), _group_sum(dz, hkv)
        dpq = kernels.apply(dn, s.transpose(-1, -2), None, torch.empty_like(pq), "identity")
        dpq += dd[..., None] * z.repeat_interleave(group, dim=1)[:, :, None, :]
        dpk = kernels.apply(vf, ds.transpose(-1, -2), None, torch.empty_like(pk), "identity") + dz[:, :, None, :]
        dv = kernels.apply(pk, ds, None, torch.empty_like(vf), "identity")
    (dq,) = vjp_q(dpq)
    (dk,) = vjp_k(dpk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

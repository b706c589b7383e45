"""Linear attention forward and backward from the Triton primitives in kernels.py.

Forward: non-causal is two passes, (S, z) = state(phi(K), V) per kv head, then
O = phi(Q) S / (phi(Q) . z + eps); causal is the chunk-parallel pipeline (chunk states, prefix,
output kernel) with the feature map fused.

Backward, with n_i = phi(q_i) S_i, d_i = phi(q_i) . z_i + eps, O_i = n_i / d_i and g = dO:
  dn_i = g_i / d_i,   dd_i = -(g_i . O_i) / d_i,
  dphi(q_i) = sum_{j vis} (dn_i . v_j + dd_i) phi(k_j),
  dphi(k_j) = sum_{i sees j} (dn_i . v_j + dd_i) phi(q_i),   dv_j = sum_{i sees j} (phi(q_i) . phi(k_j)) dn_i.
Causal: kernels.causal_bwd (dq with the feature map's derivative fused, then dk/dv from a reverse
prefix of the query-side states). Non-causal these are state/apply products, the feature map's
derivative applied by reference.linear.phi_pullback (written out per feature map).
"""
from __future__ import annotations

import torch

from ...reference.linear import feature_map_fn, phi_pullback
from . import kernels


def linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, feature: str,
               causal: bool, eps: float) -> torch.Tensor:
    """Write phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K) + eps) into out (bhsd views; causal
    bottom-right: query i sees keys j <= i + Sk - Sq; rows that see no key give 0)."""
    if causal:
        return kernels.causal(q, k, v, out, feature, offset=k.shape[2] - q.shape[2], eps=eps)
    s, z = kernels.state(k, v, feature)
    return kernels.apply(q, s, z, out, feature, eps)


def _group_sum(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, hq = x.shape[:2]
    return x.view(b, heads_kv, hq // heads_kv, *x.shape[2:]).sum(2)


def linear_bwd(dout, q, k, v, out, *, feature: str, causal: bool, eps: float):
    """(dq, dk, dv) in q/k/v's dtypes; dout, q, out (B, Hq, Sq, .), k, v (B, Hkv, Sk, .) bhsd views."""
    if causal:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernels.causal_bwd(dout, q, k, v, out, dq, dk, dv, feature, offset=k.shape[2] - q.shape[2], eps=eps)
        return dq, dk, dv
    phi = feature_map_fn(feature)
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    q32, k32 = q.float(), k.float()
    pq, pk = phi(q32), phi(k32)
    g = dout.float()
    # bf16 inputs: the kernels' operands in bf16 (as the forward multiplies: phi formed in fp32 and
    # rounded; accumulations fp32), their tensor cores instead of tf32x3 on fp32 copies (three
    # passes, twice the bytes). Not fp16: dn = dO / den falls below fp16's normal range once den
    # grows with the length (a float32 emulation at 3000 keys: dq rel RMSE 0.017 against a bound of
    # 5e-3; bf16 0.0062 against 0.02), so fp16 keeps fp32 operands.
    low = (lambda t: t.to(q.dtype)) if q.dtype == torch.bfloat16 else (lambda t: t.float())  # noqa: E731
    s, z = kernels.state(k, v, feature)  # the forward's S and z, phi fused
    den = torch.einsum("bhnd,bhd->bhn", pq, z.repeat_interleave(group, dim=1)) + eps
    zero = den == 0.0  # only with eps = 0: such rows output 0 and pass no gradient
    den = torch.where(zero, torch.ones_like(den), den)
    vc = v
    if q.dtype != torch.float32:
        # 16-bit: V centred by its mean mu over the keys, S = phi(K)^T (V - mu) and O - mu formed
        # in fp32 here (out is not read). The gradients depend on V only through dO_i . (v_j - o_i);
        # uncentred, dn S^T and dd z (and v dS^T and dz on the key side) both carry V's mean and
        # cancel, and the 16-bit rounding of the saved output (in dd) came out of the cancellation
        # as dq's error: relative RMSE 2e-2 (fp16, 500 tokens, V ~ N(3, 1); 1.5e-2 at N(1, 1))
        # against the 5e-3 contract, 5e-4 centred. (The causal pipeline: kernels.causal_bwd.)
        mu = v.float().sum(dim=2, keepdim=True) / max(v.shape[2], 1)  # (B, Hkv, 1, DV)
        vc = v.float() - mu
        s = s - z[..., None] * mu
        num = kernels.apply(low(pq), s, None, torch.empty(*q.shape[:3], v.shape[3], dtype=torch.float32,
                                                          device=q.device), "identity")
        # O - mu = (phi(q) S_c - eps mu) / den
        out_c = (num - eps * mu.repeat_interleave(group, dim=1)) / den[..., None]
    else:
        out_c = out.float()
    dn = torch.where(zero[..., None], 0.0, g / den[..., None])
    dd = torch.where(zero, 0.0, -(g * out_c).sum(-1) / den)
    # dS = phi(Q)^T dn and dz = phi(Q)^T dd per query head, summed over the group
    pq_low, dn_low = low(pq), low(dn)
    ds, _ = kernels.state(pq_low, dn_low, "identity")
    dz = torch.einsum("bhnd,bhn->bhd", pq, dd)
    ds, dz = _group_sum(ds, hkv), _group_sum(dz, hkv)
    dpq = kernels.apply(dn_low, s.transpose(-1, -2), None, torch.empty_like(pq), "identity")
    dpq += dd[..., None] * z.repeat_interleave(group, dim=1)[:, :, None, :]
    dpk = kernels.apply(low(vc), ds.transpose(-1, -2), None, torch.empty_like(pk), "identity") + dz[:, :, None, :]
    dv = kernels.apply(low(pk), ds, None, torch.empty(v.shape, dtype=torch.float32, device=v.device), "identity")
    dq = phi_pullback(feature, q32, pq, dpq)
    dk = phi_pullback(feature, k32, pk, dpk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

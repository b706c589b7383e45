"""Linear attention (Katharopoulos et al., arXiv 2006.16236): the ground truth for method linear.

out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps), over all keys, or
with causal over keys j <= i + Sk - Sq (bottom-right), by prefix sums over keys. A row whose
denominator is exactly 0 (relu phi(q_i) all zero with eps = 0, or no key) gives 0, as the Triton
kernels do.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._common import compute_dtype, expand_kv, safe_divide


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (Katharopoulos et al. §3.2: positive, smooth), as x + 1 above 0 and exp(x) at and
    below: F.elu(x) + 1 forms exp(x) - 1 + 1, which cancels to an absolute error of ~6e-8 in fp32
    and to exactly 0 below x ~ -16.6 (a row of such keys or queries lost its whole output). The
    exponent is clamped at 0 so the branch torch.where drops cannot overflow into the gradient."""
    return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": elu_plus_one,
    "relu": F.relu,
    "softmax": lambda x: torch.softmax(x, dim=-1),  # over head_dim (as SLA uses it)
    "identity": lambda x: x,
}

# keys per prefix-sum chunk: bounds the (chunk, D, Dv) running-state tensor
_CHUNK = 256


def feature_map_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature map phi by name: "elu" (elu + 1), "relu", "softmax" (over head_dim), "identity"."""
    try:
        return FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {name!r}") from None


def phi_pullback(name: str, x: torch.Tensor, px: torch.Tensor, g: torch.Tensor, inplace: bool = False):
    """g pulled back through the feature map phi at x (px = phi(x)): the derivative written out
    for the four maps, without torch.func.vjp, which fails inside an op under a TorchDispatchMode
    such as FlopCounterMode (functorch's wrappers find no storage there) and holds more full-size
    temporaries. inplace: may overwrite g and px (a fresh allocation of this size costs page
    faults), so the caller must be done with px. Used by the torch and Triton backwards alike."""
    if name == "elu":  # d(elu(x) + 1)/dx is 1 above 0 and exp(x) = phi(x) <= 1 at and below
        return g.mul_(px.clamp_(max=1.0)) if inplace else g * px.clamp(max=1.0)
    if name == "relu":  # 0 at x = 0, as torch's relu backward
        return g.masked_fill_(x <= 0, 0.0) if inplace else g.masked_fill(x <= 0, 0.0)
    if name == "softmax":  # over head_dim: s * (g - g . s)
        if inplace:
            return g.sub_((g * px).sum(dim=-1, keepdim=True)).mul_(px)
        return (g - (g * px).sum(dim=-1, keepdim=True)) * px
    if name == "identity":
        return g
    return torch.func.vjp(feature_map_fn(name), x)[1](g)[0]


def _causal_sums(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor):
    """Numerator (B, H, Sq, Dv) and denominator (B, H, Sq) for causal linear attention: query i
    reads the prefix sums of phi(k_j) v_j^T and phi(k_j) up to key i + Sk - Sq. Rows with no key
    get zeros. Prefix sums run in chunks of keys so memory stays O(chunk * D * Dv)."""
    b, h, sq, d = pq.shape
    sk, dv = pk.shape[2], v.shape[-1]
    offset = sk - sq
    first = max(0, -offset)  # first query that sees a key
    nums = [pq.new_zeros(b, h, min(first, sq), dv)]
    dens = [pq.new_zeros(b, h, min(first, sq))]
    state_kv = pq.new_zeros(b, h, d, dv)
    state_k = pq.new_zeros(b, h, d)
    for start in range(0, sk, _CHUNK):
        stop = min(start + _CHUNK, sk)
        pk_c, v_c = pk[:, :, start:stop], v[:, :, start:stop]
        kv_cum = state_kv[:, :, None] + torch.cumsum(pk_c[..., :, None] * v_c[..., None, :], dim=2)
        k_cum = state_k[:, :, None] + torch.cumsum(pk_c, dim=2)
        # queries whose last visible key lies in this chunk
        q0, q1 = max(start - offset, 0), min(stop - offset, sq)
        if q1 > q0:
            idx = torch.arange(q0, q1, device=pq.device) + offset - start
            pq_r = pq[:, :, q0:q1]
            nums.append(torch.einsum("bhqd,bhqde->bhqe", pq_r, kv_cum[:, :, idx]))
            dens.append(torch.einsum("bhqd,bhqd->bhq", pq_r, k_cum[:, :, idx]))
        state_kv, state_k = kv_cum[:, :, -1], k_cum[:, :, -1]
    return torch.cat(nums, dim=2), torch.cat(dens, dim=2), first


def linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu",
                     causal: bool = False, eps: float = 1e-6):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) bhsd. Output in q's dtype, computed in float32
    (float64 for float64 inputs). With causal, queries that see no key (Sq > Sk) give 0."""
    ct = compute_dtype(q.dtype)
    hq = q.shape[1]
    phi = feature_map_fn(feature_map)
    pq = phi(q.to(ct))
    pk = expand_kv(phi(k.to(ct)), hq)
    vc = expand_kv(v.to(ct), hq)
    if not causal:
        num = pq @ (pk.transpose(-1, -2) @ vc)
        den = pq @ pk.sum(dim=-2)[..., None]
        return safe_divide(num, den + eps).to(q.dtype)
    num, den, first = _causal_sums(pq, pk, vc)
    den = den + eps
    if first:  # rows that see no key: exactly 0 (also when eps == 0)
        sees = torch.arange(q.shape[2], device=q.device) >= first
        den = torch.where(sees, den, torch.zeros_like(den))
    return safe_divide(num, den[..., None]).to(q.dtype)

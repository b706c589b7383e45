"""Method linear in plain PyTorch, memory-bounded: linear attention (Katharopoulos et al., arXiv
2006.16236) forward and an explicit backward, causal in the chunkwise-parallel form, so nothing
of size (Sq, Sk) or (Sk, D, Dv) is ever held.

The torch-backend kernel for fp16/bf16/fp32 wherever linear-triton does not run (CPU without
the Triton interpreter). The reference it ranks above (linear-torch-reference, still the ground
truth and the fp64 kernel) forms the causal sums as per-key prefix sums of phi(k_j) v_j^T, a
(B, H, 256, D, Dv) tensor per chunk of keys, and autograd keeps every one for backward:
O(Sk * D * Dv), tens of GB at 32k tokens x 12 heads x hd128.

Non-causal: KV = phi(K)^T V and z = sum_j phi(k_j) per (batch, kv head), then
out = phi(Q) KV / (phi(Q) . z + eps). Causal (bottom-right: query i sees keys j <= i + Sk - Sq):
the keys every row sees (the first max(0, Sk - Sq)) form the initial state S (D x Dv) and z (D);
the remaining min(Sq, Sk) keys and the queries on their diagonal go in square chunks of CHUNK,
each a masked lower-triangular C x C quadratic term plus phi(q) S, z from the chunks before it.
The backward runs the same chunks forward once (each row's denominator from the running z, its
numerator from the running S unless the saved output is the float32 result itself, as in fp32;
giving phi(Q)'s gradient and the in-chunk part of phi(K)'s and V's) and then in reverse, carrying
dS = sum phi(q_i)^T dnum_i and dz over the later chunks for the across-chunk part. Memory beyond
inputs and gradients: float32 copies of q, k, v (for half inputs), phi of them, the rows' dnum
(like the output) and two (B, Hq, C, C) tensors per chunk; the states are B x Hkv x D x Dv.

GQA/MQA folds a kv head's query heads into the rows of one matmul against that head's states and
keys (no repeat_interleave copy), which also sums their dK/dV. Everything computes in float32 as
the reference does, with its semantics: a row that sees no key (causal, Sq > Sk) gives 0 and no
gradient, whatever eps; a row whose denominator is exactly 0 (relu with eps = 0) gives 0 and no
gradient (safe_divide). phi is the reference's own feature map; its derivative is written out
(_phi_with_grad). Deterministic: one summation order.
"""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..reference._common import safe_divide
from ..reference.linear import feature_map_fn, phi_pullback
# flash's row helpers: a kv head's query heads stacked along the rows (row g * rows + i is query
# head g of the group, position r0 + i), float32, and back
from .flash_torch_chunked import _empty_like_layout, _rows, _to_heads

# keys (and as many diagonal queries) per causal chunk: the C x C term costs C * D per row, the
# state term D * Dv; 128 was fastest on a 2-core CPU at hd64 and hd128 (64 and 256 up to 25 % slower)
CHUNK = 128


def _tril_(a: torch.Tensor, group: int) -> torch.Tensor:
    """Zero the pairs above the diagonal of (B, Hkv, group * c, c) in-chunk scores, in place: row
    g * c + i reads keys 0..i of the chunk (the chunk is square on the causal diagonal)."""
    a.view(a.shape[0], a.shape[1], group, -1, a.shape[-1]).tril_()
    return a


def _in_layout(inp: AttentionInputs, like: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (bhsd, float32) in the inputs' dtype, laid out as the caller's tensors (a bhsd view)."""
    out = _empty_like_layout(inp, like, inp.dtype)
    out.copy_(x)
    return out


class _Geometry:
    """Bottom-right causal alignment: queries q0.. and keys k0.. pair up along the diagonal (query
    q0 + t sees keys 0..k0 + t), n of each; keys before k0 are seen by every query from q0 on,
    queries before q0 see none."""

    def __init__(self, seq_q: int, seq_k: int):
        offset = seq_k - seq_q
        self.q0, self.k0, self.n = max(0, -offset), max(0, offset), min(seq_q, seq_k)

    def chunks(self, reverse: bool = False):
        """(t0, t1): diagonal positions of each chunk; queries q0 + t0.., keys k0 + t0.."""
        starts = range(0, self.n, CHUNK)
        for t0 in (reversed(starts) if reverse else starts):
            yield t0, min(self.n, t0 + CHUNK)


def _prefix_state(pk: torch.Tensor, v: torch.Tensor):
    """S = pk^T v (B, Hkv, D, Dv) and z = sum pk (B, Hkv, D), float32, fresh tensors."""
    return pk.transpose(-1, -2) @ v, pk.sum(dim=-2)


def _chunk_sums(pq, pk, v, state, norm, eps: float, group: int, with_num: bool = True):
    """A chunk's rows: numerators (B, Hkv, R, Dv) (None without with_num), denominators
    (..., R, 1) with eps, the masked in-chunk weights phi(q) . phi(k) (B, Hkv, R, c), and each
    diagonal position's running key sum z + sum_{j <= t} phi(k_j) (B, Hkv, c, D)."""
    a = _tril_(pq @ pk.transpose(-1, -2), group)
    num = (pq @ state).add_(a @ v) if with_num else None
    # phi(q) . (running key sum), not phi(q) . z plus the row of a: as the reference forms it, and
    # summing keys before the dot product keeps a cancelling denominator (identity phi) accurate
    zcum = torch.cumsum(pk, dim=-2).add_(norm.unsqueeze(-2))
    den = _row_dot(pq, zcum, group).add_(eps)
    return num, den, a, zcum


def _row_dot(rows: torch.Tensor, per_position: torch.Tensor, group: int) -> torch.Tensor:
    """rows (B, Hkv, group * c, D) . per_position (B, Hkv, c, D), row g * c + t with position t:
    (B, Hkv, group * c, 1)."""
    b, hkv, c, d = per_position.shape
    dot = rows.view(b, hkv, group, c, d).mul(per_position.unsqueeze(2)).sum(dim=-1, keepdim=True)
    return dot.view(b, hkv, group * c, 1)


def _phi_with_grad(name: str, x: torch.Tensor):
    """(phi(x), g -> g's pull-back through phi, in place: after phi(x)'s last use)."""
    px = feature_map_fn(name)(x)
    return px, lambda g: phi_pullback(name, x, px, g, inplace=True)


# -- non-causal -----------------------------------------------------------------------------------

def full_forward(inp: AttentionInputs) -> torch.Tensor:
    """out (B, Hq, Sq, Dv) bhsd, float32 (the caller casts and lays it out)."""
    phi, eps, hkv = feature_map_fn(inp.options["feature_map"]), inp.options["eps"], inp.heads_kv
    state, norm = _prefix_state(phi(inp.k.float()), inp.v.float())
    pq = phi(_rows(inp.q, hkv, 0, inp.seq_q))
    den = (pq @ norm.unsqueeze(-1)).add_(eps)
    return _to_heads(safe_divide(pq @ state, den), inp.heads_q, inp.seq_q)


def full_backward(inp: AttentionInputs, dout: torch.Tensor, out32: torch.Tensor | None):
    """(dq, dk, dv) float32 bhsd: O = num / den with num = phi(Q) KV, den = phi(Q) z + eps, so
    dnum = dO / den, dden = -(dO . O) / den, then through KV = phi(K)^T V and z = sum phi(K).
    out32: the forward's output where it is the float32 result itself (else recomputed)."""
    name, eps, hkv, hq = inp.options["feature_map"], inp.options["eps"], inp.heads_kv, inp.heads_q
    pq, phi_q_grad = _phi_with_grad(name, _rows(inp.q, hkv, 0, inp.seq_q))
    pk, phi_k_grad = _phi_with_grad(name, inp.k.float())
    vf = inp.v.float()
    state, norm = _prefix_state(pk, vf)
    den = (pq @ norm.unsqueeze(-1)).add_(eps)
    out = safe_divide(pq @ state, den) if out32 is None else _rows(out32, hkv, 0, inp.seq_q)
    dnum = safe_divide(_rows(dout, hkv, 0, inp.seq_q), den)  # 0 where den == 0: no gradient there
    dden = (dnum * out).sum(dim=-1, keepdim=True).neg_()
    del out
    dpq = (dnum @ state.transpose(-1, -2)).add_(dden * norm.unsqueeze(-2))
    dstate = pq.transpose(-1, -2) @ dnum
    dnorm = pq.transpose(-1, -2) @ dden  # (B, Hkv, D, 1)
    dq = _to_heads(phi_q_grad(dpq), hq, inp.seq_q)
    del dpq, dnum
    dpk = (vf @ dstate.transpose(-1, -2)).add_(dnorm.transpose(-1, -2))
    dv = pk @ dstate
    return dq, phi_k_grad(dpk), dv


# -- causal -------------------------------------------------------------------------------------

def causal_forward(inp: AttentionInputs) -> torch.Tensor:
    phi, eps, hkv, hq = feature_map_fn(inp.options["feature_map"]), inp.options["eps"], inp.heads_kv, inp.heads_q
    group = hq // hkv
    geo = _Geometry(inp.seq_q, inp.seq_k)
    out = inp.new_output()
    if geo.n == 0 or out.numel() == 0:
        return out.zero_()
    out[:, :, :geo.q0] = 0  # rows that see no key
    state, norm = _prefix_state(phi(inp.k[:, :, :geo.k0].float()), inp.v[:, :, :geo.k0].float())
    for t0, t1 in geo.chunks():
        pq = phi(_rows(inp.q, hkv, geo.q0 + t0, geo.q0 + t1))
        pk = phi(inp.k[:, :, geo.k0 + t0:geo.k0 + t1].float())
        v = inp.v[:, :, geo.k0 + t0:geo.k0 + t1].float()
        num, den, _, zcum = _chunk_sums(pq, pk, v, state, norm, eps, group)
        out[:, :, geo.q0 + t0:geo.q0 + t1] = _to_heads(safe_divide(num, den), hq, t1 - t0)
        state.add_(pk.transpose(-1, -2) @ v)
        norm = zcum[:, :, -1]
    return out


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum over positions s >= t, along dim -2."""
    return x.flip(-2).cumsum(dim=-2).flip(-2)


def causal_backward(inp: AttentionInputs, dout: torch.Tensor, out32: torch.Tensor | None):
    """(dq, dk, dv) float32 bhsd. Per chunk, with S the state before it, zcum_t the running key
    sum, A the masked in-chunk weights, dnum = dO / den, dden = -(dO . O) / den and dA = dnum V_c^T
    masked:
      dphi(q_i) = S dnum_i + (dA phi(K_c))_i + dden_i zcum_i             (forward pass, S live)
      dphi(k_t) = (dA^T phi(Q_c))_t + sum_{i at s >= t} dden_i phi(q_i) + dS v_t + dz
      dV_c = A^T dnum + phi(K_c) dS
    where dS = sum over later chunks of phi(Q)^T dnum and dz of phi(Q)^T dden (reverse pass).
    out32: the forward's output where it is the float32 result itself (else recomputed)."""
    name, eps, hkv, hq = inp.options["feature_map"], inp.options["eps"], inp.heads_kv, inp.heads_q
    group = hq // hkv
    geo = _Geometry(inp.seq_q, inp.seq_k)
    b, d, dv_dim = inp.batch, inp.head_dim, inp.head_dim_v
    q32, k32, v32 = inp.q.float(), inp.k.float(), inp.v.float()
    if geo.n == 0 or q32.numel() == 0:
        return torch.zeros_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
    # every row of dpk and dv is written below, and of dpq from q0 on
    dpq = torch.empty(q32.shape, dtype=torch.float32, device=inp.device)
    dpq[:, :, :geo.q0] = 0  # rows without a key
    dpk = torch.empty(k32.shape, dtype=torch.float32, device=inp.device)
    dv = torch.empty(v32.shape, dtype=torch.float32, device=inp.device)
    pq_all, phi_q_grad = _phi_with_grad(name, q32)
    pk_all, phi_k_grad = _phi_with_grad(name, k32)
    k0, q0 = geo.k0, geo.q0
    # the diagonal rows' dnum and dden for the reverse pass, kv-head-grouped (rows g * n + t)
    dnum_all = torch.empty(b, hkv, group, geo.n, dv_dim, dtype=torch.float32, device=inp.device)
    dden_all = torch.empty(b, hkv, group, geo.n, 1, dtype=torch.float32, device=inp.device)

    state, norm = _prefix_state(pk_all[:, :, :k0], v32[:, :, :k0])
    for t0, t1 in geo.chunks():
        c = t1 - t0
        pq = _rows(pq_all, hkv, q0 + t0, q0 + t1)
        pk, v = pk_all[:, :, k0 + t0:k0 + t1], v32[:, :, k0 + t0:k0 + t1]
        num, den, a, zcum = _chunk_sums(pq, pk, v, state, norm, eps, group, with_num=out32 is None)
        out = safe_divide(num, den) if out32 is None else _rows(out32, hkv, q0 + t0, q0 + t1)
        dnum = safe_divide(_rows(dout, hkv, q0 + t0, q0 + t1), den)  # 0 where den == 0: no gradient
        dden = (dnum * out).sum(dim=-1, keepdim=True).neg_()
        del num, out
        da = _tril_(dnum @ v.transpose(-1, -2), group)
        dpq_c = (dnum @ state.transpose(-1, -2)).add_(da @ pk)
        dpq_c.view(b, hkv, group, c, d).addcmul_(dden.view(b, hkv, group, c, 1), zcum.unsqueeze(2))
        dpq[:, :, q0 + t0:q0 + t1] = _to_heads(dpq_c, hq, c)
        dden_pq = (dden * pq).view(b, hkv, group, c, d).sum(dim=2)
        dpk[:, :, k0 + t0:k0 + t1] = (da.transpose(-1, -2) @ pq).add_(_reverse_cumsum(dden_pq))
        dv[:, :, k0 + t0:k0 + t1] = a.transpose(-1, -2) @ dnum
        del a, da, dpq_c, dden_pq
        dnum_all[:, :, :, t0:t1] = dnum.view(b, hkv, group, c, dv_dim)
        dden_all[:, :, :, t0:t1] = dden.view(b, hkv, group, c, 1)
        state.add_(pk.transpose(-1, -2) @ v)
        norm = zcum[:, :, -1]
    del state, norm, zcum

    dstate = torch.zeros(b, hkv, d, dv_dim, dtype=torch.float32, device=inp.device)
    dnorm = torch.zeros(b, hkv, 1, d, dtype=torch.float32, device=inp.device)
    for t0, t1 in geo.chunks(reverse=True):
        pk, v = pk_all[:, :, k0 + t0:k0 + t1], v32[:, :, k0 + t0:k0 + t1]
        dpk[:, :, k0 + t0:k0 + t1] += (v @ dstate.transpose(-1, -2)).add_(dnorm)
        dv[:, :, k0 + t0:k0 + t1] += pk @ dstate
        pq_t = _rows(pq_all, hkv, q0 + t0, q0 + t1).transpose(-1, -2)
        dstate.add_(pq_t @ dnum_all[:, :, :, t0:t1].reshape(b, hkv, -1, dv_dim))
        dnorm.add_((pq_t @ dden_all[:, :, :, t0:t1].reshape(b, hkv, -1, 1)).transpose(-1, -2))
    # keys before k0: every row with a key reads them through the initial state
    dpk[:, :, :k0] = (v32[:, :, :k0] @ dstate.transpose(-1, -2)).add_(dnorm)
    dv[:, :, :k0] = pk_all[:, :, :k0] @ dstate
    return phi_q_grad(dpq), phi_k_grad(dpk), dv


class LinearTorchChunked(Kernel):
    name = "linear-torch-chunked"
    method = "linear"
    backend = "torch"
    # above linear-torch-reference (0), which it replaces as the fallback; below linear-triton (20)
    priority = 5
    dtypes = (torch.float16, torch.bfloat16, torch.float32)  # fp64 stays on the reference
    supports_lse = False
    options = ("feature_map", "eps")

    def forward(self, inp: AttentionInputs):
        if inp.causal:
            return causal_forward(inp)
        out = full_forward(inp)
        if inp.dtype == torch.float32:  # the op lays it out as the caller's
            return out
        return inp.new_output().copy_(out)

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse, dout: torch.Tensor, dlse) -> tuple:
        # fp32: the saved output is the float32 result, and saves recomputing the numerators; in
        # fp16/bf16 its rounding would enter dden = -(dO . O) / den, so they are recomputed
        out32 = out if inp.dtype == torch.float32 else None
        grads = (causal_backward if inp.causal else full_backward)(inp, dout, out32)
        if inp.dtype == torch.float32:
            return (*grads, None, None)
        dq, dk, dv = (_in_layout(inp, like, g) for like, g in zip((inp.q, inp.k, inp.v), grads))
        return dq, dk, dv, None, None


register(LinearTorchChunked())

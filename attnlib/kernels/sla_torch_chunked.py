"""Method sla in plain PyTorch, memory-bounded: the critical blocks by block_sparse-torch-chunked's
FlashAttention-2 over chunks (on a CPU gathering only the critical blocks, block_sparse_gather.py),
the marginal blocks by linear attention from
per-key-block states, forward and an explicit backward; no (Sq, Sk) quantity is ever held.

The torch-backend kernel for fp16/bf16/fp32 wherever sla-triton does not apply (CPU, block sizes
or head dims it refuses). The reference it ranks above (sla-torch-reference, still the ground
truth and the fp64 kernel) forms (B, H, Sq, Sk) scores, token masks and linear-attention weights,
and autograd keeps them for backward: tens of GB at 32k tokens x 12 heads.

Here the blocks are classified as the reference does (sla_block_classes, once per forward and
once per backward, not differentiated). The critical part is block_sparse-torch-chunked's (the
critical blocks as its block mask): one chunk's fp32 scores stay under flash-torch-chunked's
SCORE_BUDGET_BYTES, and the backward reads the lse the op keeps (options.AUX_LSE) but not the
saved output: delta = rowsum(dO * O_s) comes from each chunk's P and dP (chunked_backward with
out=None), as O_s cannot be taken back out of the rounded O_s + O_l W^T + b where b or O_l W^T
dominates (in fp16 dq and dk came out 100x less accurate than the reference's at |b| ~ 100). The
linear branch forms h_j = phi(K_j)^T V_j and z_j = sum phi(K_j) per key block once, then, chunk by chunk
of query blocks, each query block's marginal sums H_i, Z_i as a masked product of the block map
with those states, O_l = phi(Q) H_i / (phi(Q) . Z_i + 1e-6). Its backward runs the same chunks:
dH_i, dZ_i go back to every key block through the transposed masked product, then to phi(K) and
V; phi's own gradient is written out (reference.linear.phi_pullback: torch.func.vjp fails in
the op under a TorchDispatchMode such as FlopCounterMode).
Memory beyond inputs and outputs: float32 copies of q, k, v (for half inputs), a few score
budgets, the states (B x Hkv x Mk x D x Dv: 2x K's size in float32 at D = Dv = 128 and 64-key
blocks) and in the backward their gradient, freed before phi(K)'s backward; the linear branch's
gradients are the buffers the critical part's add to. Everything computes in float32, as the
reference does; deterministic.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..reference._common import num_blocks
from ..reference.linear import feature_map_fn
from ..reference.sla import CRITICAL, LINEAR_EPS, MARGINAL, sla_block_classes
from . import flash_torch_chunked as flash_chunked
from .block_sparse_gather import sparse_backward, sparse_forward
from ..reference.linear import phi_pullback


def block_classes(inp: AttentionInputs) -> torch.Tensor:
    """The reference's int8 block map (B, Hq, Mq, Mk) for this call."""
    o = inp.options
    return sla_block_classes(inp.q, inp.k, critical=o["critical"], negligible=o["negligible"],
                             block_size=tuple(o["block_size"]), scale=inp.scale, causal=inp.causal)


def _float32(inp: AttentionInputs) -> AttentionInputs:
    # the helpers then give O_s, dq, dk, dv in float32: the projection and the linear branch's
    # gradients are added before the one rounding to the inputs' dtype, as in the reference
    return replace(inp, q=inp.q.float(), k=inp.k.float(), v=inp.v.float())


def _padded_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, ceil(S/block), block, D); the ragged last block padded with zeros,
    which add nothing to a state, an output that is dropped or a gradient."""
    s, m = x.shape[2], num_blocks(x.shape[2], block)
    if m * block != s:
        x = F.pad(x, (0, 0, 0, m * block - s))
    return x.reshape(x.shape[0], x.shape[1], m, block, x.shape[-1])


def _unpadded(xb: torch.Tensor, s: int) -> torch.Tensor:
    b, h, m, block, d = xb.shape
    return xb.reshape(b, h, m * block, d)[:, :, :s]


def _blocks_per_chunk(inp: AttentionInputs, block_q: int, n_blocks: int) -> int:
    """Query blocks per linear-branch chunk: their states H_i (D x Dv each) and rows stay within
    the score budget (the backward holds about three such: H, dH, and the rows' tensors)."""
    d, dv = inp.head_dim, inp.head_dim_v
    per_block = inp.batch * inp.heads_q * (d * dv + d + block_q * (d + dv)) * 4
    if per_block == 0:
        return max(n_blocks, 1)
    return max(1, min(n_blocks, flash_chunked.SCORE_BUDGET_BYTES // per_block))


def _stacked(marginal: torch.Tensor, heads_kv: int, i0: int, i1: int) -> torch.Tensor:
    """Query blocks i0:i1 of the (B, Hq, Mq, Mk) marginal mask as (B, Hkv, group * blocks, Mk):
    a kv head's query heads stacked, so one matmul per kv head reads its key-block states."""
    b, hq, _, mk = marginal.shape
    return marginal[:, :, i0:i1].reshape(b, heads_kv, hq // heads_kv * (i1 - i0), mk)


class LinearBranch:
    """The marginal blocks' linear attention for one call: phi, the marginal mask and the
    key-block states h_j (B, Hkv, Mk, D, Dv), z_j (B, Hkv, Mk, D), formed once."""

    def __init__(self, inp32: AttentionInputs, classes: torch.Tensor, with_grad: bool = False):
        self.inp = inp32
        self.block_q, self.block_k = tuple(inp32.options["block_size"])
        self.feature = inp32.options["feature_map"]
        self.phi = feature_map_fn(self.feature)
        self.marginal = (classes == MARGINAL).float()
        pk = self.phi(inp32.k)
        # phi(K) for its pull-back at the end of the backward (pk_b may be a view of it)
        self.pk = pk if with_grad else None
        self.pk_b, self.v_b = _padded_blocks(pk, self.block_k), _padded_blocks(inp32.v, self.block_k)
        self.h = self.pk_b.transpose(-1, -2) @ self.v_b
        self.z = self.pk_b.sum(dim=-2)

    def chunks(self):
        """(first query block, end block, first row, end row) of each chunk of query blocks."""
        sq, mq = self.inp.seq_q, self.marginal.shape[2]
        step = _blocks_per_chunk(self.inp, self.block_q, mq)
        for i0 in range(0, mq, step):
            i1 = min(mq, i0 + step)
            yield i0, i1, i0 * self.block_q, min(sq, i1 * self.block_q)

    def row_states(self, i0: int, i1: int):
        """H_i (B, Hq, n, D, Dv) and Z_i (B, Hq, n, D): the key-block states summed over each of
        query blocks i0:i1's marginal key blocks."""
        b, hkv, mk, d, dv = self.h.shape
        hq, n = self.inp.heads_q, i1 - i0
        m = _stacked(self.marginal, hkv, i0, i1)
        big_h = (m @ self.h.reshape(b, hkv, mk, d * dv)).view(b, hq, n, d, dv)
        big_z = (m @ self.z).view(b, hq, n, d)
        return big_h, big_z

    @staticmethod
    def rows(pq_b: torch.Tensor, big_h: torch.Tensor, big_z: torch.Tensor):
        """(O_l, 1 / den) per padded row, (B, Hq, n, bq, Dv) and (..., 1); a row whose
        denominator is exactly 0 gives 0 and no gradient, as the reference's safe_divide."""
        den = pq_b @ big_z.unsqueeze(-1) + LINEAR_EPS
        zero = den == 0
        inv = torch.where(zero, torch.zeros_like(den), 1.0 / torch.where(zero, torch.ones_like(den), den))
        return (pq_b @ big_h) * inv, inv

    def add_output(self, out32: torch.Tensor, weight: torch.Tensor) -> None:
        """out32 (bhsd, float32) += O_l W^T, chunk by chunk."""
        w_t = weight.float().t()
        for i0, i1, r0, r1 in self.chunks():
            big_h, big_z = self.row_states(i0, i1)
            pq_b = _padded_blocks(self.phi(self.inp.q[:, :, r0:r1]), self.block_q)
            o_l, _ = self.rows(pq_b, big_h, big_z)
            out32[:, :, r0:r1] += _unpadded(o_l, r1 - r0) @ w_t

    def backward(self, weight: torch.Tensor, dout: torch.Tensor):
        """(dq, dk, dv, dW) of the linear branch's O_l W^T, all float32. Frees the states on the
        way out (the branch is then spent)."""
        inp, bq = self.inp, self.block_q
        b, hkv, mk, d, dv = self.h.shape
        group = inp.heads_q // hkv
        w = weight.float()
        dq = torch.empty(b, inp.heads_q, inp.seq_q, d, dtype=torch.float32, device=inp.device)
        dw = torch.zeros(dv, dv, dtype=torch.float32, device=inp.device)
        # contiguous (not zeros_like, which copies the states' strides): viewed as batches of matrices
        dh = torch.zeros(self.h.shape, dtype=torch.float32, device=inp.device)
        dz = torch.zeros(self.z.shape, dtype=torch.float32, device=inp.device)
        for i0, i1, r0, r1 in self.chunks():
            big_h, big_z = self.row_states(i0, i1)
            q_rows = inp.q[:, :, r0:r1]
            pq = self.phi(q_rows)
            pq_b = _padded_blocks(pq, bq)
            o_l, inv = self.rows(pq_b, big_h, big_z)
            o_l_rows = _unpadded(o_l, r1 - r0)
            do = dout[:, :, r0:r1].float()
            dw += do.reshape(-1, dv).t() @ o_l_rows.reshape(-1, dv)
            # O_l = num / den: dnum = dO_l / den, dden = -(dO_l . O_l) / den; padded rows have dO_l 0
            dnum = _padded_blocks(do @ w, bq).mul_(inv)
            dden = (dnum * o_l).sum(dim=-1, keepdim=True).neg_()
            dpq_b = dnum @ big_h.transpose(-1, -2) + dden * big_z.unsqueeze(-2)
            dq[:, :, r0:r1] = phi_pullback(self.feature, q_rows, pq, _unpadded(dpq_b, r1 - r0))
            # H_i = sum of h_j over its marginal j: each key block gathers dH_i of the query
            # blocks (and query heads of its group) for which it is marginal, added in place
            # (baddbmm_: the product alone would be a temporary as large as dh, every chunk)
            rows = group * (i1 - i0)
            m_t = _stacked(self.marginal, hkv, i0, i1).transpose(-1, -2).reshape(b * hkv, mk, rows)
            dh_i = (pq_b.transpose(-1, -2) @ dnum).reshape(b * hkv, rows, d * dv)
            dh.view(b * hkv, mk, d * dv).baddbmm_(m_t, dh_i)
            dz.view(b * hkv, mk, d).baddbmm_(m_t, (dden * pq_b).sum(dim=-2).reshape(b * hkv, rows, d))
            del pq_b, o_l, dnum, dpq_b, dh_i
        # the states, then their gradients, go as soon as they are read: this branch is spent
        self.h = self.z = None
        sk = inp.seq_k
        dpk_b = (self.v_b @ dh.transpose(-1, -2)).add_(dz.unsqueeze(-2))
        dv_l = _unpadded(self.pk_b @ dh, sk)
        del dh, dz
        return dq, phi_pullback(self.feature, inp.k, self.pk, _unpadded(dpk_b, sk)), dv_l, dw


class SLATorchChunked(Kernel):
    name = "sla-torch-chunked"
    method = "sla"
    backend = "torch"
    # above sla-torch-reference (0), which it replaces as the fallback; below sla-triton (20)
    priority = 5
    dtypes = (torch.float16, torch.bfloat16, torch.float32)  # fp64 stays on the reference
    supports_lse = False
    keeps_lse_for_backward = True
    options = ("proj_weight", "proj_bias", "critical", "negligible", "block_size", "feature_map")

    def forward(self, inp: AttentionInputs):
        classes = block_classes(inp)
        inp32 = _float32(inp)
        out32, lse = sparse_forward(inp32, classes == CRITICAL, tuple(inp.options["block_size"]))
        weight, bias = inp.options["proj_weight"], inp.options["proj_bias"]
        if weight is not None:
            LinearBranch(inp32, classes).add_output(out32, weight)
        if bias is not None:
            out32 += bias.float()
        if inp.dtype == torch.float32:
            out = out32
        else:
            out = inp.new_output()
            out.copy_(out32)
        return (out, lse) if inp.requires_grad else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        classes = block_classes(inp)
        inp32 = _float32(inp)
        critical, block_size = classes == CRITICAL, tuple(inp.options["block_size"])
        if lse is None:  # the op kept none (a forward that expected no backward): re-form it
            _, lse = sparse_forward(inp32, critical, block_size)
        weight, bias = inp.options["proj_weight"], inp.options["proj_bias"]
        dw = db = None
        if bias is not None:
            db = dout.sum(dim=(0, 1, 2), dtype=torch.float32).to(bias.dtype)
        linear = None
        if weight is not None:
            *linear, dw = LinearBranch(inp32, classes, with_grad=True).backward(weight, dout)
            dw = dw.to(weight.dtype)
        # out (the saved output) is not read: delta from each chunk's P and dP (chunked_backward's
        # out=None), as O_s cannot be taken back out of the rounded O_s + O_l W^T + b
        dq, dk, dv = sparse_backward(inp32, None, lse, dout, None, critical, block_size,
                                     into=None if linear is None else tuple(linear))
        return dq.to(inp.dtype), dk.to(inp.dtype), dv.to(inp.dtype), dw, db


register(SLATorchChunked())

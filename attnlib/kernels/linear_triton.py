"""Method linear on Triton (attnlib.triton_kernels.linear): non-causal two-pass (state, then
apply) and causal chunk-parallel (per-chunk states, a prefix over super-chunks, then every
super-chunk in parallel: masked quadratic inside a chunk, running state across), feature maps
elu / relu / softmax / identity fused into the loads, fp32 accumulation; the causal backward
mirrors it with a reverse prefix (no N x N anywhere).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests).
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .families import TritonKernel


class LinearTriton(TritonKernel):
    name = "linear-triton"
    method = "linear"
    same_head_dim_v = False
    head_dim_multiple = 1  # padded to a power of two inside; masked
    supports_lse = False
    needs_unit_last_stride = False  # loads are fully strided
    options = ("feature_map", "eps")

    def grid_yz(self, inp: AttentionInputs) -> dict[str, int]:
        # linear_apply_kernel launches (query blocks, batch * heads, value blocks)
        return {"batch * heads": inp.batch * inp.heads_q}

    def forward(self, inp: AttentionInputs):
        from ..triton_kernels.linear.attention import linear_fwd

        out = inp.new_output()
        return linear_fwd(inp.q, inp.k, inp.v, out, feature=inp.options["feature_map"], causal=inp.causal,
                          eps=inp.options["eps"])

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse, dout: torch.Tensor, dlse) -> tuple:
        from ..triton_kernels.linear.attention import linear_bwd

        dq, dk, dv = linear_bwd(dout, inp.q, inp.k, inp.v, out, feature=inp.options["feature_map"],
                                causal=inp.causal, eps=inp.options["eps"])
        return dq, dk, dv, None, None


register(LinearTriton())

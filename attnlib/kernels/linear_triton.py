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

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        return shared_memory_reasons(inp)

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


# The launch configs are fitted to an H100's 227 KB of shared memory per block and do not yet
# look at the device. Compiled on the CPU for the cards with less (tests/triton_sm90.py, stop 22):
# every launch at padded head dims up to 64 fits sm_86 / sm_89's 99 KB, up to 128 an A100's 163 KB;
# past those some launch needs more (e.g. the hd128 16-bit state kernel 160 KB, the hd256 apply
# kernel 176 KB) and would fail at launch, so those calls go to linear-torch-chunked instead.
SMEM_NEEDED = ((64, 101376), (128, 166912), (256, 232448))  # (widest padded head dim, bytes per block)


def shared_memory_reasons(inp: AttentionInputs) -> list[str]:
    if inp.device.type != "cuda":
        return []
    from ..triton_kernels.flash.configs import device_smem_limit, padded_head_dim

    widest = max(padded_head_dim(inp.head_dim), padded_head_dim(inp.head_dim_v))
    need = next((b for d, b in SMEM_NEEDED if widest <= d), SMEM_NEEDED[-1][1])
    limit = device_smem_limit(inp.q)
    if limit is not None and limit < need:
        return [f"head dims {inp.head_dim} / {inp.head_dim_v}: the Triton linear kernels' tiles need {need} bytes "
                f"of shared memory per block here, the device gives {limit}"]
    return []

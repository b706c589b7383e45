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
        return shared_memory_reasons(inp) + narrow_causal_backward_reasons(inp)

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


# The launchers fit their configs to the device's shared memory per block (fit in
# triton_kernels/linear/kernels.py, from bytes compiled for sm_80 / sm_89): every launch at padded
# head dims up to 256 fits an A100's 166912 bytes and sm_86 / sm_89's 101376, except the causal
# backward's dq kernel with softmax's whole rows at the widest head dims (in fp32 on an H100 too),
# which no config of its kernel fits. Those calls, and every call on a card with less than 101376
# bytes (not compiled for), go to linear-torch-chunked instead of failing at launch.
SMALLEST_FITTED_SMEM = 101376

# The causal backward with key head dims padded to 16 (dk <= 16) faulted with an illegal memory
# access on an H100 (stop 22: tests/test_linear_triton.py::test_relu_eps_zero_backends_agree,
# fp32 relu, dk = dv = 16, MQA, 12 rows) where every index traced in bounds under the interpreter;
# key tiles of 32 and up passed there. Likely the class of upstream Triton faults on Hopper in
# kernels with several tl.dot over narrow tiles (triton-lang/triton#10573: "3.6.0 and later", an
# attention backward at head dim 32; #10486 and #11366: several dots, BLOCK_D 32, "Invalid __shared__
# read" under memcheck, clean on 3.5.1), as stop 19's dk 64 / dv 32 fault in the dk kernel (see
# triton_kernels/linear/kernels.causal_value_pad). Until a GPU run finds the cause (the memcheck command is in
# bench/results/nvidia-h100-80gb-hbm3/NOTES-stop22-2026-11-27.md), such calls with gradients run on
# linear-torch-chunked instead of risking a fault that ends the process's CUDA context.
UNFAULTED_CAUSAL_KEY_PAD = 32


def shared_memory_reasons(inp: AttentionInputs) -> list[str]:
    if inp.device.type != "cuda":
        return []
    from ..triton_kernels.flash.configs import device_smem_limit

    limit = device_smem_limit(inp.q)
    if limit is None:
        return []
    if limit < SMALLEST_FITTED_SMEM:
        return [f"the Triton linear kernels' launch configs are fitted down to {SMALLEST_FITTED_SMEM} bytes of "
                f"shared memory per block, the device gives {limit}"]
    if not (inp.causal and inp.requires_grad):
        return []
    from ..triton_kernels.linear import kernels

    feature = inp.options.get("feature_map", "elu")
    unfit = kernels.unfit_causal_backward(inp.head_dim, inp.head_dim_v, inp.dtype, feature, limit)
    if unfit:
        return [f"head dims {inp.head_dim} / {inp.head_dim_v}, {feature}, {inp.dtype_name}: no config of the causal "
                f"backward's {' and '.join(unfit)} fits the device's {limit} bytes of shared memory per block"]
    return []


def narrow_causal_backward_reasons(inp: AttentionInputs) -> list[str]:
    """On a GPU, a causal call with gradients whose key tiles would be narrower than
    UNFAULTED_CAUSAL_KEY_PAD (see there)."""
    if inp.device.type != "cuda" or not (inp.causal and inp.requires_grad):
        return []
    from ..triton_kernels.linear import kernels

    if kernels.pad(inp.head_dim) >= UNFAULTED_CAUSAL_KEY_PAD:
        return []
    return [f"key head dim {inp.head_dim}: the Triton causal backward with key tiles narrower than "
            f"{UNFAULTED_CAUSAL_KEY_PAD} made an illegal memory access on an H100 (stop 22; cause not found)"]

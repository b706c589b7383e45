"""Method flash on Triton: FlashAttention-2 forward and backward (attnlib.triton_kernels.flash).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests). Triton is
imported only when the kernel runs, so this module imports without it. ``backward`` runs the
fused FA2 backward from the saved out and lse (no recomputation of the forward); a gradient
flowing into lse is honoured; the option deterministic=False with ATTNLIB_FLASH_ATOMIC_DQ=1 forms
dQ with atomics inside the dK/dV kernel instead of a second kernel (opt-in: measured slower).
ATTNLIB_FLASH_TMA=1 switches dense fp16/bf16 forwards on sm_90+ to the tensor-descriptor (TMA)
kernel (triton_kernels/flash/forward_tma.py; same results, opt-in until a GPU run compares the
two); inputs it cannot express keep the default forward. The option key_mask reaches both passes
as an additive per-key bias (attnlib/key_mask.py); with one the default forward always runs.
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from ..key_mask import key_bias
from .families import TritonKernel


class FlashTriton(TritonKernel):
    name = "flash-triton"
    method = "flash"

    def forward(self, inp: AttentionInputs):
        from ..triton_kernels.flash.autograd import flash_attn_func

        out, lse = flash_attn_func(inp.q, inp.k, inp.v, causal=inp.causal, scale=inp.scale,
                                   new_output=inp.new_output, key_bias=key_bias(inp))
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        from ..triton_kernels.flash.backward import flash_bwd

        dq, dk, dv = flash_bwd(dout, inp.q, inp.k, inp.v, out, lse, causal=inp.causal, scale=inp.scale, dlse=dlse,
                               deterministic=inp.options.get("deterministic", True), key_bias=key_bias(inp))
        return dq, dk, dv, None, None


register(FlashTriton())

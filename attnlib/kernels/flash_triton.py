"""Method flash on Triton: FlashAttention-2 forward and backward (attnlib.triton_kernels.flash).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests). Triton is
imported only when the kernel runs, so this module imports without it. ``backward`` runs the
fused FA2 backward from the saved out and lse (no recomputation of the forward); a gradient
flowing into lse is honoured.
"""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs


class FlashTriton(Kernel):
    name = "flash-triton"
    method = "flash"
    backend = "triton"
    priority = 20
    devices = ("cuda",)
    interpret_ok = True
    requires = ("triton",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dim_multiple = 8
    max_head_dim = 256
    needs_unit_last_stride = True

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        if inp.head_dim_v != inp.head_dim:
            return [f"value head_dim {inp.head_dim_v} differs from query/key head_dim {inp.head_dim} "
                    "(the Triton flash kernel needs them equal)"]
        return []

    def forward(self, inp: AttentionInputs):
        from ..triton_kernels.flash.autograd import flash_attn_func

        out, lse = flash_attn_func(inp.q, inp.k, inp.v, causal=inp.causal, scale=inp.scale,
                                   new_output=inp.new_output)
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        from ..triton_kernels.flash.backward import flash_bwd

        dq, dk, dv = flash_bwd(dout, inp.q, inp.k, inp.v, out, lse, causal=inp.causal, scale=inp.scale, dlse=dlse)
        return dq, dk, dv, None, None


register(FlashTriton())

"""Method sage on Triton (attnlib.triton_kernels.sage): quantization kernels parallel over token
blocks (K's mean and V's fp8 scales from deterministic per-block partials) and INT8
QK^T attention with fp16, fp16-accumulator or fp8 PV. Forward only (SageAttention is an
inference method; rounding to INT8 has no useful gradient).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests), except
pv="fp8": the interpreter computes fp8 dots wrongly, and fp8 tensor cores need sm_89+.
"""
from __future__ import annotations

import os

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .families import TritonKernel
from ..reference.sage import K_BLOCK, q_block_size

FP8_MIN_CC = (8, 9)


class SageTriton(TritonKernel):
    name = "sage-triton"
    method = "sage"
    supports_backward = False
    # its dots are INT8 QK^T and fp16 (or fp8) PV: bf16 inputs are quantized or cast before any
    # dot, so the interpreter's broken bf16 tl.dot is never reached (pv="fp8" is refused there)
    interpret_bf16_ok = True
    options = ("smooth_k", "qk_granularity", "pv")

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        r = []
        if inp.options.get("pv") == "fp8":
            if inp.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
                r.append("pv='fp8' does not run under the Triton CPU interpreter (its fp8 dots are wrong)")
            elif inp.device.type == "cuda" and torch.cuda.get_device_capability(inp.device) < FP8_MIN_CC:
                cc = torch.cuda.get_device_capability(inp.device)
                r.append(f"pv='fp8' needs fp8 tensor cores (sm_89 or newer), device has sm_{cc[0]}{cc[1]}")
        return r

    def forward(self, inp: AttentionInputs):
        from ..triton_kernels.sage.forward import sage_forward

        o = inp.options
        out, lse = sage_forward(inp.q, inp.k, inp.v, causal=inp.causal, scale=inp.scale,
                                smooth_k=o.get("smooth_k", True), pv=o.get("pv", "fp16"),
                                q_block=q_block_size(o.get("qk_granularity", "per_block")), k_block=K_BLOCK,
                                return_lse=inp.return_lse, new_output=inp.new_output)
        return (out, lse) if inp.return_lse else out


register(SageTriton())

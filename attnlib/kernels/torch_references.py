"""The pure-PyTorch references as torch-backend kernels: CPU fallback (and fp64) for every method
(flash, block_sparse, sage and linear in fp16/bf16/fp32 fall back to flash-torch-chunked,
block_sparse-torch-chunked, sage-torch-chunked and linear-torch-chunked first, which hold no
N x N scores, nor linear's per-key D x Dv prefix states)."""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..options import NO_LSE


class ReferenceKernel(Kernel):
    backend = "torch"
    priority = 0
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def __init__(self, method: str) -> None:
        self.method = method
        self.name = f"{method}-torch-reference"
        self.supports_lse = method not in NO_LSE
        # SageAttention is an inference method: rounding to INT8 has no useful gradient
        self.supports_backward = method != "sage"

    def forward(self, inp: AttentionInputs):
        from .. import reference

        o = inp.options
        q, k, v = inp.q, inp.k, inp.v
        if self.method == "flash":
            return reference.flash_reference(q, k, v, causal=inp.causal, scale=inp.scale,
                                             return_lse=inp.return_lse, key_mask=o.get("key_mask"))
        if self.method == "sage":
            return reference.sage_reference(q, k, v, causal=inp.causal, scale=inp.scale,
                                            smooth_k=o["smooth_k"], return_lse=inp.return_lse,
                                            qk_granularity=o.get("qk_granularity", "per_block"),
                                            pv=o.get("pv", "fp16"))
        if self.method == "block_sparse":
            return reference.block_sparse_reference(q, k, v, o["block_mask"], block_size=o["block_size"],
                                                    causal=inp.causal, scale=inp.scale,
                                                    return_lse=inp.return_lse)
        if self.method == "linear":
            return reference.linear_reference(q, k, v, feature_map=o["feature_map"], causal=inp.causal,
                                              eps=o["eps"])
        if self.method == "sla":
            return reference.sla_reference(q, k, v, o["proj_weight"], o["proj_bias"], critical=o["critical"],
                                           negligible=o["negligible"], block_size=o["block_size"],
                                           feature_map=o["feature_map"], scale=inp.scale, causal=inp.causal)
        raise NotImplementedError(self.method)


for _method in ("flash", "sage", "block_sparse", "linear", "sla"):
    register(ReferenceKernel(_method))

"""Method flash on torch's own scaled_dot_product_attention (GPU tensors): a torch-backend
kernel that is fast where attnlib's Triton/CUDA kernels are not installed."""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs


class FlashSDPA(Kernel):
    name = "flash-torch-sdpa"
    method = "flash"
    backend = "torch"
    priority = 10
    devices = ("cuda",)
    supports_lse = False  # torch's public SDPA does not return the log-sum-exp

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        r = []
        if inp.causal and inp.seq_q != inp.seq_k:
            r.append("torch SDPA's is_causal is top-left aligned; bottom-right causal with seq_q != seq_k "
                     "needs another kernel")
        return r

    def forward(self, inp: AttentionInputs):
        # the builtin, not the torch.nn.functional attribute, which patch_sdpa may have replaced
        return torch._C._nn.scaled_dot_product_attention(
            inp.q, inp.k, inp.v, is_causal=inp.causal, scale=inp.scale, enable_gqa=inp.is_gqa)


register(FlashSDPA())

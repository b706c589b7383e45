"""Method asymrnr on Triton: fused matching and the reduce/restore gathers in Triton
(attnlib.triton_kernels.asymrnr); the inner attention is dispatched as usual. Runs on CUDA, and
on CPU under TRITON_INTERPRET=1 (tests). Inference only: no backward pass."""
from __future__ import annotations

import torch

from ..dispatch import register
from .asymrnr_torch import AsymrnrKernel


class AsymrnrTriton(AsymrnrKernel):
    name = "asymrnr-triton"
    backend = "triton"
    priority = 20
    devices = ("cuda",)
    interpret_ok = True
    requires = ("triton",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 256
    supports_backward = False
    piece_backend = "triton"


register(AsymrnrTriton())

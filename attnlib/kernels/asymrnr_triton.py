"""Method asymrnr on Triton: fused matching and the reduce/restore gathers in Triton
(attnlib.triton_kernels.asymrnr); the inner attention is dispatched as usual. Runs on CUDA, and
on CPU under TRITON_INTERPRET=1 (tests). Inference only: no backward pass."""
from __future__ import annotations

from ..dispatch import register
from ..inputs import AttentionInputs
from .asymrnr_torch import AsymrnrKernel
from .families import TritonKernel


class AsymrnrTriton(TritonKernel, AsymrnrKernel):
    name = "asymrnr-triton"
    # the gathers and the matching read rows with full strides and mask any head dim
    head_dim_multiple = 1
    needs_unit_last_stride = False
    same_head_dim_v = False
    supports_backward = False
    piece_backend = "triton"

    def grid_yz(self, inp: AttentionInputs) -> dict[str, int]:
        # the matching kernel and the gathers launch (row blocks, batch * heads)
        return {"batch * heads": inp.batch * inp.heads_q}


register(AsymrnrTriton())

"""Method block_sparse on Triton (attnlib.triton_kernels.block_sparse): the flash kernels' steps
visiting only the key blocks a bool block mask allows, forward and fused backward.

The tile is the mask's block (BLOCK_M = bq, BLOCK_N = bk), so the supported block sizes are
capability data: powers of two from 16 to 128 per side. Others get a reason and the dispatcher
falls back (automatically) to the torch reference. The index forms (the row form for forward
and dQ, the column form for dK/dV) are built from the mask once per mask object and version
(block_mask.INDEX_CACHE), so a mask reused across layers, steps and the backward is sorted once.
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .families import TritonKernel

MIN_BLOCK, MAX_BLOCK = 16, 128  # mirrors triton_kernels/block_sparse/configs.py (imported lazily)


def _block_ok(b: int) -> bool:
    return MIN_BLOCK <= b <= MAX_BLOCK and (b & (b - 1)) == 0


class BlockSparseTriton(TritonKernel):
    name = "block_sparse-triton"
    method = "block_sparse"
    options = ("block_mask", "block_size")
    block_sizes_text = f"powers of two from {MIN_BLOCK} to {MAX_BLOCK} per side, e.g. (64, 64), (128, 64)"

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        r = []
        bq, bk = inp.options.get("block_size", (64, 64))
        if not (_block_ok(bq) and _block_ok(bk)):
            r.append(f"block_size {(bq, bk)} not supported (supports {self.block_sizes_text})")
        return r

    def forward(self, inp: AttentionInputs):
        from ..block_mask import cached_row_index
        from ..triton_kernels.block_sparse.forward import block_sparse_fwd

        out = inp.new_output()
        lse = torch.empty(inp.q.shape[:3], dtype=torch.float32, device=inp.device)
        row_form = cached_row_index(inp.options["block_mask"])
        block_sparse_fwd(inp.q, inp.k, inp.v, out, lse, *row_form, block_size=inp.options["block_size"],
                         causal=inp.causal, scale=inp.scale)
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        from ..block_mask import cached_col_index, cached_row_index
        from ..triton_kernels.block_sparse.backward import block_sparse_bwd

        mask = inp.options["block_mask"]
        dq, dk, dv = block_sparse_bwd(dout, inp.q, inp.k, inp.v, out, lse, cached_row_index(mask),
                                      cached_col_index(mask), block_size=inp.options["block_size"],
                                      causal=inp.causal, scale=inp.scale, dlse=dlse)
        return dq, dk, dv, None, None


register(BlockSparseTriton())

"""Method sla on Triton (attnlib.triton_kernels.sla): block classification on the device, the
key-block preprocess (pooled K, h_j = phi(K_j)^T V_j, z_j), one fused forward kernel (linear
branch from each query block's marginal state sum, formed by row_states.py or, with
ATTNLIB_SLA_ROW_STATES=0, pre-aggregated per tile; then block_sparse's main loop over the
critical blocks, then the projection O_l W^T + b in its epilogue: out is written once), and a
fused backward (block_sparse's backward for the critical blocks, the linear-branch kernels for
the marginal ones, dW and db).

Tiles are the classification blocks (BLOCK_M = bq, BLOCK_N = bk): powers of two from 16 to 128
per side. The D x D states live in registers, so head dims go up to 128 (multiples of 8, padded
inside); value and query/key head dims must be equal. When a backward will follow, the forward
returns the critical blocks' lse and the op keeps it with the output (options.AUX_LSE); the
backward re-forms the block map and key-block states, forms O_l in its linear dq kernel (no
second pass over the states) and delta from the saved output; it stores no D x D state per
query block (memory formula in triton_kernels/sla/attention.py: sla_backward).
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from ..triton_kernels.sla.aggregation import row_states_enabled
from .families import TritonKernel

MIN_BLOCK, MAX_BLOCK = 16, 128  # mirrors triton_kernels/block_sparse/configs.py (imported lazily)


def _block_ok(b: int) -> bool:
    return MIN_BLOCK <= b <= MAX_BLOCK and (b & (b - 1)) == 0


def block_size_supported(block_size) -> bool:
    """Whether sla-triton (and its classifier, which tiles a block as one power-of-two range)
    takes this (query block, key block); sla_block_map uses the reference otherwise, as the
    dispatcher does."""
    bq, bk = block_size
    return _block_ok(bq) and _block_ok(bk)


class SLATriton(TritonKernel):
    name = "sla-triton"
    method = "sla"
    max_head_dim = 128  # the D x D linear-attention state lives in registers
    supports_lse = False
    keeps_lse_for_backward = True
    options = ("proj_weight", "proj_bias", "critical", "negligible", "block_size", "feature_map")
    block_sizes_text = f"powers of two from {MIN_BLOCK} to {MAX_BLOCK} per side, e.g. (64, 64), (128, 64)"

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        bq, bk = inp.options.get("block_size", (64, 64))
        if not block_size_supported((bq, bk)):
            return [f"block_size {(bq, bk)} not supported (supports {self.block_sizes_text})"]
        return []

    def grid_yz(self, inp: AttentionInputs) -> dict[str, int]:
        sizes = super().grid_yz(inp)
        if row_states_enabled():  # row_states.py launches z = batch * heads
            sizes["batch * heads"] = inp.batch * inp.heads_q
        return sizes

    @staticmethod
    def _kwargs(inp: AttentionInputs) -> dict:
        o = inp.options
        return dict(critical=o["critical"], negligible=o["negligible"], block_size=tuple(o["block_size"]),
                    feature=o["feature_map"], scale=inp.scale, causal=inp.causal)

    def forward(self, inp: AttentionInputs):
        from ..triton_kernels.sla.attention import sla_forward

        return sla_forward(inp.q, inp.k, inp.v, inp.new_output(), inp.options["proj_weight"],
                           inp.options["proj_bias"], with_lse=inp.requires_grad, **self._kwargs(inp))

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse, dout: torch.Tensor, dlse) -> tuple:
        from ..triton_kernels.sla.attention import sla_backward

        return sla_backward(dout, inp.q, inp.k, inp.v, inp.options["proj_weight"], inp.options["proj_bias"],
                            out=out if lse is not None else None, lse=lse, **self._kwargs(inp))


register(SLATriton())

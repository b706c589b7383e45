"""Method block_sparse in plain PyTorch, memory-bounded: FlashAttention-2's forward and backward
over chunks, visiting only the listed key blocks (block_sparse_gather.py) where the mask is sparse.

The torch-backend kernel for fp16/bf16/fp32 wherever no Triton/CUDA kernel applies (CPU, block
sizes those kernels refuse). The reference it ranks above (block_sparse-torch-reference, still the
ground truth and the fp64 kernel) expands the block mask to a (B, H, Sq, Sk) token mask and forms
the full score matrix. Here, on CPU tensors with at most block_sparse_gather.GATHER_MAX_DENSITY of
the visible block pairs listed, each chunk of block rows gathers its listed K/V blocks (work
proportional to them); otherwise flash-torch-chunked's loop over chunks of query rows masks its
scores with the rows' part of the block mask, (B or 1, H or 1, rows, keys) as the block mask
broadcasts, and causal (bottom-right). Either way one chunk's fp32 scores stay under
flash-torch-chunked's SCORE_BUDGET_BYTES and no (Sq, Sk) mask is formed. Semantics as the
reference's: rows with nothing allowed give 0 and lse -inf, gradients finite; deterministic.
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .block_sparse_gather import sparse_backward, sparse_forward
from .flash_torch_chunked import FlashTorchChunked


class BlockSparseTorchChunked(FlashTorchChunked):
    name = "block_sparse-torch-chunked"
    method = "block_sparse"
    # priority 5 (inherited): above block_sparse-torch-reference (0), which it replaces as the
    # fallback; below the Triton and CUDA kernels. fp16/bf16/fp32; fp64 stays on the reference
    options = ("block_mask", "block_size")

    def forward(self, inp: AttentionInputs):
        out, lse = sparse_forward(inp, inp.options["block_mask"], inp.options["block_size"])
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        if lse is None:
            raise RuntimeError(f"{self.name}'s backward needs the forward's lse")
        dq, dk, dv = sparse_backward(inp, out, lse, dout, dlse, inp.options["block_mask"], inp.options["block_size"])
        return dq, dk, dv, None, None


register(BlockSparseTorchChunked())

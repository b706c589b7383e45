"""Method block_sparse in plain PyTorch, memory-bounded: flash-torch-chunked's forward and
backward (FlashAttention-2 over chunks of query rows) with the block mask applied chunk by chunk.

The torch-backend kernel for fp16/bf16/fp32 wherever no Triton/CUDA kernel applies (CPU, block
sizes those kernels refuse). The reference it ranks above (block_sparse-torch-reference, still the
ground truth and the fp64 kernel) expands the block mask to a (B, H, Sq, Sk) token mask and forms
the full score matrix. Here each chunk of query rows gathers only its own rows of the token mask
from the block mask, (B or 1, H or 1, rows, keys) as the block mask broadcasts, and masks its
scores with it and causal (bottom-right): one chunk's fp32 scores stay under flash-torch-chunked's
SCORE_BUDGET_BYTES, its bool mask under a quarter of that. Semantics as the reference's: rows with
nothing allowed give 0 and lse -inf, gradients finite; deterministic. GQA with a per-query-head
mask: the mask's heads split as the chunk's rows stack a kv head's query heads.
"""
from __future__ import annotations

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .flash_torch_chunked import FlashTorchChunked, RowMask


def blocked_rows(inp: AttentionInputs) -> RowMask:
    """blocked(r0, r1, kend) -> bool (B or 1, Hq or 1, r1 - r0, kend), True where the block mask
    leaves the (query, key) pair out; built from the block mask alone (no (Sq, Sk) mask)."""
    bq, bk = inp.options["block_size"]
    left_out = ~inp.options["block_mask"].to(device=inp.device, dtype=torch.bool)  # block-sized

    def blocked(r0: int, r1: int, kend: int) -> torch.Tensor:
        qb = torch.arange(r0, r1, device=inp.device) // bq
        kb = torch.arange(kend, device=inp.device) // bk
        return left_out[:, :, qb[:, None], kb[None, :]]

    return blocked


class BlockSparseTorchChunked(FlashTorchChunked):
    name = "block_sparse-torch-chunked"
    method = "block_sparse"
    # priority 5 (inherited): above block_sparse-torch-reference (0), which it replaces as the
    # fallback; below the Triton and CUDA kernels. fp16/bf16/fp32; fp64 stays on the reference
    options = ("block_mask", "block_size")

    def blocked(self, inp: AttentionInputs) -> RowMask:
        return blocked_rows(inp)


register(BlockSparseTorchChunked())

"""Method block_sparse in CUDA C++ (csrc/block_sparse): the flash forward's sm_80 main loop and
epilogue (csrc/flash) walking the listed key blocks, compiled with NVRTC through CuPy at first
use by the flash loader (attnlib.cuda). Block sizes (64, 64) and (128, 64); fp16/bf16; head
dims 64/128. Backward: the Triton block-sparse backward from the saved out and lse.
"""
from __future__ import annotations

import math

import torch

from ..cuda.specs import BLOCK_SPARSE_BLOCK_SIZES, block_sparse_fwd_spec
from ..dispatch import register
from ..inputs import AttentionInputs
from .families import CudaKernel
from .flash_cuda import LOG2E

def _strides_bhm(t: torch.Tensor):
    import numpy as np

    return [np.int64(0 if t.shape[i] == 1 else t.stride(i)) for i in range(3)]


def block_sparse_fwd_cuda(q, k, v, out, lse, kv_num_blocks, kv_indices, *, block_size, causal: bool,
                          scale: float) -> None:
    """Launch on bhsd views (unit last stride); lse dense float32 (B, Hq, Sq). No sync."""
    import numpy as np

    from ..cuda import loader

    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if batch == 0 or heads_q == 0 or seq_q == 0:
        return
    bm, bn = block_size
    spec = block_sparse_fwd_spec(head_dim, "bf16" if q.dtype == torch.bfloat16 else "fp16", causal, bm, bn)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    fn = loader.get_function(spec, dev, torch.cuda.get_device_capability(dev))

    def ptr(t):
        return np.uint64(t.data_ptr())

    def strides(t):
        return [np.int64(s) for s in t.stride()[:3]]

    args = [ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(kv_num_blocks), ptr(kv_indices),
            *strides(q), *strides(k), *strides(v), *strides(out),
            *_strides_bhm(kv_num_blocks), *_strides_bhm(kv_indices),
            np.int32(seq_q), np.int32(seq_k), np.int32(heads_q), np.int32(heads_q // heads_kv),
            np.float32(scale * LOG2E)]
    stream = torch.cuda.current_stream(q.device).cuda_stream
    loader.launch(fn, (math.ceil(seq_q / bm), heads_q, batch), (spec.threads,), args, shared_mem=spec.smem_bytes,
                  device_index=dev, stream_ptr=stream)


class BlockSparseCUDA(CudaKernel):
    name = "block_sparse-cuda"
    method = "block_sparse"
    requires = ("cupy", "triton")  # triton: the backward
    options = ("block_mask", "block_size")

    def kernel_reasons(self, inp: AttentionInputs) -> list[str]:
        bs = tuple(inp.options.get("block_size", (64, 64)))
        if bs not in BLOCK_SPARSE_BLOCK_SIZES:
            return [f"block_size {bs} not supported (supports {', '.join(map(str, BLOCK_SPARSE_BLOCK_SIZES))})"]
        return []

    def spec(self, inp: AttentionInputs):
        return block_sparse_fwd_spec(inp.head_dim, "bf16" if inp.dtype == torch.bfloat16 else "fp16", inp.causal,
                                     *tuple(inp.options["block_size"]))

    def forward(self, inp: AttentionInputs):
        from ..block_mask import cached_row_index

        out = inp.new_output()
        lse = torch.empty(inp.q.shape[:3], dtype=torch.float32, device=inp.device)
        block_sparse_fwd_cuda(inp.q, inp.k, inp.v, out, lse, *cached_row_index(inp.options["block_mask"]),
                              block_size=tuple(inp.options["block_size"]), causal=inp.causal, scale=inp.scale)
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out, lse, dout, dlse) -> tuple:
        from .block_sparse_triton import BlockSparseTriton

        return BlockSparseTriton.backward(self, inp, out, lse, dout, dlse)


register(BlockSparseCUDA())

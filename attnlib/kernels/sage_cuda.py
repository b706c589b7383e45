"""Method sage in CUDA C++ (csrc/sage): fused INT8 quantization kernels and the INT8
attention (mma.m16n8k32 s8 for QK^T, mma.m16n8k16 fp16 for PV) for sm_80+, compiled with
NVRTC through CuPy at first use. Forward only; pv "fp16" and "fp16_accum" (fp8 PV runs on
the Triton kernel). V is read in fp16: bf16/fp32 V is converted first (as sageattention does).

Registered below the Triton kernel (priority 10 < 20): its GPU tests pass on an H100, but there
(2026-11-27) it took 2.1x sage-triton's time (8.41 vs 4.04 ms at B4 H16 S8192 hd128).
backend="cuda" selects it explicitly.
"""
from __future__ import annotations

import math

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from .families import CudaKernel
from ..reference.sage import K_BLOCK, q_block_size

LOG2E = 1.4426950408889634
_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _device(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _launch(spec, grid, args, t: torch.Tensor) -> None:
    from ..cuda import loader

    dev = _device(t)
    fn = loader.get_function(spec, dev, torch.cuda.get_device_capability(dev))
    loader.launch(fn, grid, (spec.threads,), args, shared_mem=spec.smem_bytes, device_index=dev,
                  stream_ptr=torch.cuda.current_stream(t.device).cuda_stream)


def _ptr(t):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def quantize_q_cuda(q: torch.Tensor, block: int, x_scale: float, k_mean=None, lse_scale: float = 0.0):
    """Same contract as attnlib.triton_kernels.sage.quant.quantize_q."""
    import numpy as np

    from ..cuda.specs import sage_quant_spec

    bsz, heads, seq, d = q.shape
    nb = -(-seq // block)
    qi = torch.empty(bsz, heads, seq, d, dtype=torch.int8, device=q.device)
    delta = torch.empty(bsz, heads, nb, dtype=torch.float32, device=q.device)
    shift = None if k_mean is None else torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    heads_kv = heads if k_mean is None else k_mean.shape[1]
    if qi.numel():
        args = [_ptr(q), _ptr(qi), _ptr(delta), _ptr(k_mean), _ptr(shift), *(np.int64(s) for s in q.stride()[:3]),
                np.int32(seq), np.int32(heads), np.int32(heads_kv), np.int32(d), np.int32(block), np.int32(nb),
                np.int32(_KINDS[q.dtype]), np.float32(x_scale), np.float32(lse_scale)]
        _launch(sage_quant_spec("q"), (nb, heads, bsz), args, q)
    return qi, delta, shift


def quantize_k_cuda(k: torch.Tensor, block: int, smooth: bool):
    """Same contract as attnlib.triton_kernels.sage.quant.quantize_k. With smooth, three launches
    over (blocks | channel slices, heads, batch): per-block channel sums into a (B, H, n_blocks, D)
    fp32 scratch, their fold in block order into the mean (deterministic, no atomics), then the
    quantization of K - mean."""
    import numpy as np

    from ..cuda.specs import sage_quant_spec

    bsz, heads, seq, d = k.shape
    nb = -(-seq // block)
    ki = torch.empty(bsz, heads, seq, d, dtype=torch.int8, device=k.device)
    delta = torch.empty(bsz, heads, nb, dtype=torch.float32, device=k.device)
    mean = torch.zeros(bsz, heads, d, dtype=torch.float32, device=k.device) if smooth else None
    if ki.numel():
        strides = [np.int64(s) for s in k.stride()[:3]]
        if smooth:
            part = torch.empty(bsz, heads, nb, d, dtype=torch.float32, device=k.device)
            _launch(sage_quant_spec("k_stats"), (nb, heads, bsz),
                    [_ptr(k), _ptr(part), *strides, np.int32(seq), np.int32(heads), np.int32(d), np.int32(block),
                     np.int32(nb), np.int32(_KINDS[k.dtype])], k)
            reduce = sage_quant_spec("k_reduce")
            _launch(reduce, (-(-d // reduce.threads), heads, bsz),
                    [_ptr(part), _ptr(mean), np.int32(seq), np.int32(heads), np.int32(d), np.int32(nb)], k)
        args = [_ptr(k), _ptr(ki), _ptr(delta), _ptr(mean), *strides,
                np.int32(seq), np.int32(heads), np.int32(d), np.int32(block), np.int32(nb),
                np.int32(_KINDS[k.dtype]), np.int32(int(smooth))]
        _launch(sage_quant_spec("k"), (nb, heads, bsz), args, k)
    return ki, delta, mean


def sage_fwd_cuda(q_int8, k_int8, v16, delta_q, delta_k, out, lse, lse_shift, *, causal: bool, pv: str,
                  q_block: int) -> None:
    """Launch the attention kernel; v16 fp16 bhsd (unit last stride, 16-byte rows)."""
    import numpy as np

    from ..cuda.specs import sage_fwd_spec

    batch, heads_q, seq_q, head_dim = q_int8.shape
    heads_kv, seq_k = k_int8.shape[1], k_int8.shape[2]
    spec = sage_fwd_spec(head_dim, causal, pv, block_n=K_BLOCK)
    block_m = int(dict(spec.defines)["ATTNLIB_BLOCK_M"])
    args = [_ptr(q_int8), _ptr(k_int8), _ptr(v16), _ptr(out), _ptr(lse), _ptr(delta_q), _ptr(delta_k),
            _ptr(lse_shift), *(np.int64(s) for s in v16.stride()[:3]), *(np.int64(s) for s in out.stride()[:3]),
            np.int32(seq_q), np.int32(seq_k), np.int32(heads_q), np.int32(heads_q // heads_kv),
            np.int32(q_block), np.int32(delta_q.shape[-1]), np.int32(delta_k.shape[-1]),
            np.int32(_KINDS[out.dtype])]
    _launch(spec, (math.ceil(seq_q / block_m), heads_q, batch), args, q_int8)


def _v_fp16(v: torch.Tensor) -> torch.Tensor:
    aligned = v.data_ptr() % 16 == 0 and all(s % 8 == 0 for s, n in zip(v.stride()[:3], v.shape[:3]) if n > 1)
    if v.dtype == torch.float16 and aligned:
        return v
    return v.to(torch.float16).contiguous()


def sage_forward_cuda(inp: AttentionInputs):
    o = inp.options
    q, k, v = inp.q, inp.k, inp.v
    smooth, pv = o.get("smooth_k", True), o.get("pv", "fp16")
    q_block = q_block_size(o.get("qk_granularity", "per_block"))
    out = inp.new_output()
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if inp.return_lse else None
    if q.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return out, lse
    if k.shape[2] == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    k_int8, delta_k, k_mean = quantize_k_cuda(k, K_BLOCK, smooth)
    want_shift = inp.return_lse and smooth
    q_int8, delta_q, shift = quantize_q_cuda(q, q_block, inp.scale * LOG2E, k_mean if want_shift else None,
                                             inp.scale)
    sage_fwd_cuda(q_int8, k_int8, _v_fp16(v), delta_q, delta_k, out, lse, shift, causal=inp.causal, pv=pv,
                  q_block=q_block)
    return out, lse


class SageCUDA(CudaKernel):
    name = "sage-cuda"
    method = "sage"
    priority = 10  # below sage-triton, which ran 2.1x faster on an H100
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_backward = False
    needs_aligned_rows = False  # reads its own quantized copies, not the caller's rows
    options = ("smooth_k", "qk_granularity", "pv")

    def kernel_reasons(self, inp: AttentionInputs) -> list[str]:
        if inp.options.get("pv") == "fp8":
            return ["pv='fp8' is not built in CUDA C++ (the Triton sage kernel runs it on sm_89+)"]
        return []

    def spec(self, inp: AttentionInputs):
        from ..cuda.specs import sage_fwd_spec

        return sage_fwd_spec(inp.head_dim, inp.causal, inp.options.get("pv", "fp16"), block_n=K_BLOCK)

    def forward(self, inp: AttentionInputs):
        out, lse = sage_forward_cuda(inp)
        return (out, lse) if inp.return_lse else out


register(SageCUDA())

"""The ``sageattention`` package's ``sageattn`` call signature on attnlib's sage kernels.

``sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False,
**kwargs)`` follows sageattention 1.0.6: tensor_layout "HND" is (batch, heads, seq, head_dim),
"NHD" is (batch, seq, heads, head_dim); K is smoothed by its token mean (``smooth_k=True``, by
keyword only: the positional order is SageAttention2's, whose seventh argument is return_lse
where 1.0.6's is smooth_k); sm_scale defaults to head_dim ** -0.5; the output has the input's dtype
and layout (fp32 inputs run the quantized algorithm too, PV in fp16). ``return_lse=True``
returns (out, lse) as SageAttention2 does: lse (batch, heads, seq_q) float32, natural log, of
the unsmoothed scores. ``qk_quant_gran`` ("per_block"/"per_warp") and ``pv`` pick attnlib's
options.

Differences, all deliberate:
- the inputs are never modified (1.0.6 subtracts K's mean from K in place);
- it runs on every device attnlib has a sage kernel for (CPU through the reference) instead
  of raising for GPUs outside the package's list, and on any head dim (the Triton kernel takes
  multiples of 8 up to 256, the CUDA one 64 and 128; other head dims run on the torch simulation);
- is_causal is bottom-right aligned; for equal query and key lengths (the package's case)
  that is its mask too;
- inputs that require grad raise (sage is forward-only; use attnlib.flash_attention), where
  the package would silently return an output without gradient;
- ``sageattn_varlen`` (packed (total_tokens, heads, head_dim) sequences with int32 or int64
  cu_seqlens, as the package's) runs one sage call per sequence: each sequence's K is smoothed by its own
  mean (the package subtracts one mean over the whole pack; either shift is exact, only the
  rounding differs), and causal is bottom-right per sequence. It reads cu_seqlens on the host.
- SDPA-style callers (``F.scaled_dot_product_attention = sageattn``): attn_mask and dropout_p
  must be None / 0 (a ValueError otherwise); SDPA's ``scale`` keyword is the softmax scale, as
  sm_scale (both given and different: a ValueError), where the package would silently drop it
  and run with head_dim ** -0.5; any other keyword is ignored, as the package ignores it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import api, varlen
from ..inputs import FLOAT32_TINY, SCALE_MAX, is_real_number, scale_in_range, type_name
from ..options import SAGE_QK_GRANULARITIES
from ..reference._common import compute_dtype
from .flash_attn import _max_seqlen

LAYOUTS = {"HND": "bhsd", "NHD": "bshd"}
__version__ = "1.0.6+attnlib"


def _check_sdpa_kwargs(kwargs: dict[str, Any]) -> None:
    if kwargs.get("attn_mask") is not None:
        raise ValueError("attn_mask: sageattn has no attention mask; pass attn_mask=None")
    dropout_p = kwargs.get("dropout_p", 0.0)
    if not is_real_number(dropout_p):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: sageattn has no dropout; use dropout_p=0.0")


def _check_scale(name: str, value: Any) -> None:
    if value is not None:
        if not is_real_number(value):
            raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and positive, got {value}")
        if not scale_in_range(float(value)):  # the kernels scale scores in float32, times log2(e)
            raise ValueError(f"{name} must lie in [{FLOAT32_TINY:.4g}, {SCALE_MAX:.4g}] (scale * log2(e) "
                             f"must fit in float32), got {value}")


def _check_arguments(tensor_layout: Any, is_causal: Any, sm_scale: Any) -> None:
    """The package's own argument names in the errors (attnlib's say layout, causal, scale)."""
    if not isinstance(tensor_layout, str):
        raise TypeError(f"tensor_layout must be a str, 'HND' or 'NHD', got {type(tensor_layout).__name__}")
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type_name(is_causal)}")
    _check_scale("sm_scale", sm_scale)


def _softmax_scale(sm_scale: Any, kwargs: dict[str, Any]):
    """sm_scale, or SDPA's ``scale`` keyword when only that is given (float, or None: the default)."""
    sdpa_scale = kwargs.get("scale")
    _check_scale("scale", sdpa_scale)
    if sdpa_scale is not None:
        if sm_scale is not None and float(sm_scale) != float(sdpa_scale):
            raise ValueError(f"sm_scale={sm_scale} and scale={sdpa_scale} disagree: pass one softmax scale")
        sm_scale = sdpa_scale
    return None if sm_scale is None else float(sm_scale)  # numpy floats, as the package takes them


def _qk_granularity(kwargs: dict[str, Any]) -> Any:
    """qk_quant_gran checked under its own name (attnlib's errors say qk_granularity)."""
    gran = kwargs.get("qk_quant_gran", "per_block")
    if not isinstance(gran, str):
        raise TypeError(f"qk_quant_gran must be a str, one of {SAGE_QK_GRANULARITIES}, got {type(gran).__name__}")
    if gran not in SAGE_QK_GRANULARITIES:
        raise ValueError(f"qk_quant_gran must be one of {SAGE_QK_GRANULARITIES}, got {gran!r}")
    return gran


def sageattn(q, k, v, tensor_layout: str = "HND", is_causal: bool = False, sm_scale=None,
             return_lse: bool = False, **kwargs: Any):
    """SageAttention with the sageattention package's signature (see the module docstring)."""
    _check_arguments(tensor_layout, is_causal, sm_scale)
    _check_sdpa_kwargs(kwargs)
    scale = _softmax_scale(sm_scale, kwargs)
    return api.sage_attention(q, k, v, causal=is_causal, scale=scale, layout=LAYOUTS[tensor_layout],
                              smooth_k=kwargs.get("smooth_k", True), qk_granularity=_qk_granularity(kwargs),
                              pv=kwargs.get("pv", "fp16"), return_lse=return_lse,
                              backend=kwargs.get("backend", "auto"))


def _sequence_bounds(name: str, cu: Any, total: int, device: torch.device, max_name: str, max_seqlen: Any
                     ) -> list[int]:
    """cu_seqlens as host ints, checked: int32 or int64 (as the package documents), 1-D, on q's
    device, from 0 up to total, never decreasing, no sequence longer than max_seqlen (a Python,
    NumPy or one-element tensor int, as flash_attn's varlen takes it)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")
    max_seqlen = _max_seqlen(max_name, max_seqlen)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    bounds = cu.tolist()
    varlen.check_bounds(name, bounds, total, max_name, max_seqlen)
    return bounds


def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    is_causal: bool = False, sm_scale=None, smooth_k: bool = True, **kwargs: Any):
    """SageAttention on packed sequences with the sageattention package's signature: q
    (total_q, Hq, D), k and v (total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k int32 or int64
    (batch + 1,) on q's device. Returns (total_q, Hq, D) in q's dtype. A sequence with queries but
    no keys gives zeros, as do rows past cu_seqlens_q[-1] (a buffer longer than its sequences).
    qk_quant_gran, pv and backend keywords as in sageattn."""
    varlen.check_packed(q, k, v)
    _check_arguments("NHD", is_causal, sm_scale)
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type_name(smooth_k)}")
    _check_sdpa_kwargs(kwargs)
    scale = _softmax_scale(sm_scale, kwargs)
    bq = _sequence_bounds("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, "max_seqlen_q", max_seqlen_q)
    bk = _sequence_bounds("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, "max_seqlen_k", max_seqlen_k)
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got {len(bq)} and {len(bk)}")
    options = dict(causal=is_causal, scale=scale, layout="bshd", smooth_k=smooth_k,
                   qk_granularity=_qk_granularity(kwargs), pv=kwargs.get("pv", "fp16"),
                   backend=kwargs.get("backend", "auto"))
    if q.shape[0] == 0:  # nothing to attend: one call checks everything
        return api.sage_attention(q[None], k[None], v[None], **options)[0]
    parts = []
    for (q0, q1), (k0, k1) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])):
        # every sequence runs, empty ones too, so bad input raises whatever the lengths
        parts.append(api.sage_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **options)[0])
    if bq[-1] < q.shape[0]:  # rows past the last sequence (a padded buffer) give 0
        parts.append(parts[0].new_zeros(q.shape[0] - bq[-1], *parts[0].shape[1:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# SageAttention2's kernel-specific entry points (sageattention 2.x), which pipelines call directly
# to pick a kernel for their GPU. Each runs attnlib's sage with the nearest options, on every
# device: qk_quant_gran "per_thread" (a scale per thread's rows) maps to "per_warp", the finest
# granularity attnlib has; pv_accum_dtype "fp32" is pv="fp16", "fp16" and "fp16+fp32" (an fp16
# accumulator, flushed to fp32 in the second) are pv="fp16_accum", which flushes after every key
# block; the fp8 functions are pv="fp8" with fp32 accumulation. smooth_v=True subtracts V's token
# mean (per batch, kv head, channel) before the call and adds it back to every row that sees a
# key, as SageAttention2 fuses it: exact (each row's P sums to 1), and it keeps a V with a large
# mean inside the fp16 accumulator's range and the fp8 per-channel scale's resolution.
_SAGE2_GRANULARITIES = {"per_thread": "per_warp", "per_warp": "per_warp"}
_FP16_ACCUMULATORS = {"fp32": "fp16", "fp16+fp32": "fp16_accum", "fp16": "fp16_accum"}
_FP8_ACCUMULATORS = ("fp32", "fp32+fp32")


def _choice(name: str, value: Any, allowed) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _sage2(q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, smooth_k, smooth_v, return_lse, pv, kwargs):
    gran = _SAGE2_GRANULARITIES[_choice("qk_quant_gran", qk_quant_gran, _SAGE2_GRANULARITIES)]
    if not isinstance(smooth_v, bool):
        raise TypeError(f"smooth_v must be a bool, got {type_name(smooth_v)}")
    options = dict(kwargs, smooth_k=smooth_k, qk_quant_gran=gran, pv=pv)
    shaped = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)) and \
        isinstance(tensor_layout, str) and tensor_layout in LAYOUTS
    if not (smooth_v and shaped):  # (not shaped: the call raises, naming the argument)
        return sageattn(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, **options)
    tokens, heads = (2, 1) if tensor_layout == "HND" else (1, 2)
    # float32, or float64 for float64 inputs: their sage runs in float64, and V's mean rounded to
    # float32 and added back in float32 cost them ~half a float32 ulp of the mean (0.03 at 1e6)
    ct = compute_dtype(v.dtype)
    vc = v.to(ct)
    mean = vc.mean(dim=tokens, keepdim=True)
    res = sageattn(q, k, (vc - mean).to(v.dtype), tensor_layout, is_causal, sm_scale, return_lse, **options)
    out = res[0] if return_lse else res
    if out.numel() and v.shape[tokens]:  # (no key: every row is 0 and V's mean is undefined)
        seq_q, seq_k = q.shape[tokens], k.shape[tokens]
        # rows that see no key (bottom-right causal, seq_q > seq_k) output 0 and stay 0
        sees = torch.arange(seq_q, device=out.device) >= (seq_q - seq_k if is_causal else 0)
        mean = mean.repeat_interleave(q.shape[heads] // v.shape[heads], dim=heads)
        out = (out.to(ct) + mean * sees.view((-1, 1) if tensor_layout == "HND" else (-1, 1, 1))).to(out.dtype)
    return (out, res[1]) if return_lse else out


def sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout: str = "HND", quantization_backend: str = "triton",
                                    is_causal: bool = False, attn_mask=None, sm_scale=None, smooth_k: bool = True,
                                    return_lse: bool = False, **kwargs: Any):
    """INT8 QK^T per block, fp16 PV: SageAttention's first kernel (attnlib's defaults)."""
    _choice("quantization_backend", quantization_backend, ("triton", "cuda"))
    return sageattn(q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                    **dict(kwargs, attn_mask=attn_mask, smooth_k=smooth_k, qk_quant_gran="per_block", pv="fp16"))


def sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                  qk_quant_gran: str = "per_thread", sm_scale=None, pv_accum_dtype: str = "fp32",
                                  smooth_k: bool = True, smooth_v: bool = False, return_lse: bool = False,
                                  **kwargs: Any):
    """INT8 QK^T, fp16 PV with the accumulator pv_accum_dtype names (see above)."""
    pv = _FP16_ACCUMULATORS[_choice("pv_accum_dtype", pv_accum_dtype, _FP16_ACCUMULATORS)]
    return _sage2(q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, smooth_k, smooth_v, return_lse, pv,
                  kwargs)


def sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                 qk_quant_gran: str = "per_thread", sm_scale=None, pv_accum_dtype: str = "fp32+fp32",
                                 smooth_k: bool = True, smooth_v: bool = False, return_lse: bool = False,
                                 **kwargs: Any):
    """INT8 QK^T, fp8 (e4m3) P and V with fp32 accumulation: SageAttention2's kernel for sm_89/sm_90."""
    _choice("pv_accum_dtype", pv_accum_dtype, _FP8_ACCUMULATORS)
    return _sage2(q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, smooth_k, smooth_v, return_lse, "fp8",
                  kwargs)


def sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                      qk_quant_gran: str = "per_thread", sm_scale=None,
                                      pv_accum_dtype: str = "fp32+fp32", smooth_k: bool = True,
                                      return_lse: bool = False, **kwargs: Any):
    """SageAttention2's sm_90 fp8 kernel: the same as sageattn_qk_int8_pv_fp8_cuda here. Its
    signature has no smooth_v, but a ``smooth_v`` keyword is honoured (checked, and exact as
    there) rather than passed on twice: forwarded in kwargs next to the positional False it
    raised Python's "got multiple values for argument 'smooth_v'" from inside this module."""
    smooth_v = kwargs.pop("smooth_v", False)
    return sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout, is_causal, qk_quant_gran, sm_scale, pv_accum_dtype,
                                        smooth_k, smooth_v, return_lse, **kwargs)


__all__ = ["sageattn", "sageattn_varlen", "sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp16_cuda",
           "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp8_cuda_sm90"]

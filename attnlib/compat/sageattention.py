"""The ``sageattention`` package's ``sageattn`` call signature on attnlib's sage kernels.

``sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False,
**kwargs)`` follows sageattention 1.0.6: tensor_layout "HND" is (batch, heads, seq, head_dim),
"NHD" is (batch, seq, heads, head_dim); K is smoothed by its token mean (``smooth_k=True``, a
keyword as in 1.0.6); sm_scale defaults to head_dim ** -0.5; the output has the input's dtype
and layout (fp32 inputs run the quantized algorithm too, PV in fp16). ``return_lse=True``
returns (out, lse) as SageAttention2 does: lse (batch, heads, seq_q) float32, natural log, of
the unsmoothed scores. ``qk_quant_gran`` ("per_block"/"per_warp") and ``pv`` pick attnlib's
options.

Differences, all deliberate:
- the inputs are never modified (1.0.6 subtracts K's mean from K in place);
- it runs on every device attnlib has a sage kernel for (CPU through the reference) instead
  of raising for GPUs outside the package's list, and on head dims 8..256 (multiples of 8);
- is_causal is bottom-right aligned; for equal query and key lengths (the package's case)
  that is its mask too;
- inputs that require grad raise (sage is forward-only; use attnlib.flash_attention), where
  the package would silently return an output without gradient;
- attn_mask and dropout_p, passed by SDPA-style callers, must be None / 0 (a ValueError
  otherwise); any other keyword is ignored, as the package ignores it.
"""
from __future__ import annotations

from typing import Any

from .. import api

LAYOUTS = {"HND": "bhsd", "NHD": "bshd"}
__version__ = "1.0.6+attnlib"


def _check_sdpa_kwargs(kwargs: dict[str, Any]) -> None:
    if kwargs.get("attn_mask") is not None:
        raise ValueError("attn_mask: sageattn has no attention mask; pass attn_mask=None")
    if kwargs.get("dropout_p", 0.0):
        raise ValueError(f"dropout_p={kwargs['dropout_p']}: sageattn has no dropout; use dropout_p=0.0")


def sageattn(q, k, v, tensor_layout: str = "HND", is_causal: bool = False, sm_scale=None,
             return_lse: bool = False, **kwargs: Any):
    """SageAttention with the sageattention package's signature (see the module docstring)."""
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    _check_sdpa_kwargs(kwargs)
    return api.sage_attention(q, k, v, causal=is_causal, scale=sm_scale, layout=LAYOUTS[tensor_layout],
                              smooth_k=kwargs.get("smooth_k", True),
                              qk_granularity=kwargs.get("qk_quant_gran", "per_block"),
                              pv=kwargs.get("pv", "fp16"), return_lse=return_lse,
                              backend=kwargs.get("backend", "auto"))


__all__ = ["sageattn"]

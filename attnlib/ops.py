"""The custom op every attention call goes through: torch.library registration, fake, autograd.

``torch.ops.attnlib.attention`` takes the caller's tensors as they are (either layout) and all
options as typed arguments, validates them, dispatches to a kernel and returns
``(out, lse)``: out contiguous in the caller's layout and dtype; lse (B, H, Sq) float32
(float64 for float64 inputs) for softmax methods, an empty tensor for the others. Because
selection and launching happen inside the op, ``torch.compile(fullgraph=True)`` sees one opaque
node with a fake implementation and no graph break; the op never synchronises the host.

Backward: the op's autograd formula re-selects the kernel that ran forward (selection is
deterministic for the same inputs) and calls its ``backward``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .inputs import AttentionInputs, from_bhsd, to_bhsd
from .options import METHOD_OPTIONS, NO_LSE

# Per-method option names carried by the op's typed arguments; options not used by a method
# travel with placeholder values and are dropped again inside the op.
_SCALAR_OPTIONS = ("smooth_k", "feature_map", "eps", "critical", "negligible", "block_size")
_TENSOR_OPTIONS = ("block_mask", "proj_weight", "proj_bias")
_PLACEHOLDER = {"smooth_k": True, "feature_map": "elu", "eps": 1e-6, "critical": 0.0, "negligible": 0.0,
                "block_size": (64, 64)}


def op_arguments(method: str, method_options: dict[str, Any]) -> dict[str, Any]:
    """Fill every op argument: the method's options (given or default), placeholders elsewhere."""
    args: dict[str, Any] = {n: None for n in _TENSOR_OPTIONS}
    args.update(_PLACEHOLDER)
    for name, (default, _check) in METHOD_OPTIONS[method].items():
        args[name] = method_options.get(name, default)
    args["block_size"] = list(args["block_size"])
    return args


def _method_options(method: str, args: dict[str, Any]) -> dict[str, Any]:
    opts = {name: args[name] for name in METHOD_OPTIONS[method]}
    if "block_size" in opts:
        opts["block_size"] = tuple(opts["block_size"])
    return opts


def _build(q, k, v, method, layout, causal, scale, return_lse, grad, args) -> AttentionInputs:
    from .api import build_inputs

    inp = build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                       return_lse=return_lse, **_method_options(method, args))
    return replace(inp, grad=grad)


def _lse_shape(method: str, q: Tensor, layout: str) -> tuple:
    if method in NO_LSE:
        return (0,)
    b, h, s = to_bhsd(q, layout).shape[:3]
    return (b, h, s)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("attnlib::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, block_mask: Optional[Tensor], proj_weight: Optional[Tensor],
                 proj_bias: Optional[Tensor], method: str, backend: str, layout: str, causal: bool,
                 scale: Optional[float], return_lse: bool, needs_grad: bool, smooth_k: bool, feature_map: str,
                 eps: float, critical: float, negligible: float, block_size: List[int]) -> Tuple[Tensor, Tensor]:
    args = dict(block_mask=block_mask, proj_weight=proj_weight, proj_bias=proj_bias, smooth_k=smooth_k,
                feature_map=feature_map, eps=eps, critical=critical, negligible=negligible, block_size=block_size)
    inp = _build(q, k, v, method, layout, causal, scale, return_lse, needs_grad, args)
    kernel = dispatch.select(inp, backend)
    want_lse = method not in NO_LSE and kernel.supports_lse
    res = kernel.forward(replace(inp, return_lse=want_lse))
    out, lse = res if want_lse else (res, None)
    out = from_bhsd(out, layout).contiguous()
    if lse is None:
        # only reached when the caller did not ask for lse (a kernel without lse is rejected
        # otherwise); the kernel's backward does not read it
        lse = torch.full(_lse_shape(method, q, layout), float("nan"), dtype=_lse_dtype(q), device=q.device)
    return out, lse.to(_lse_dtype(q)).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, block_mask, proj_weight, proj_bias, method, backend, layout, causal, scale,
                    return_lse, needs_grad, smooth_k, feature_map, eps, critical, negligible, block_size):
    args = dict(block_mask=block_mask, proj_weight=proj_weight, proj_bias=proj_bias, smooth_k=smooth_k,
                feature_map=feature_map, eps=eps, critical=critical, negligible=negligible, block_size=block_size)
    inp = _build(q, k, v, method, layout, causal, scale, return_lse, needs_grad, args)  # validates
    shape = list(q.shape)
    shape[-1] = inp.head_dim_v
    out = q.new_empty(shape)
    lse = q.new_empty(_lse_shape(method, q, layout), dtype=_lse_dtype(q))
    return out, lse


_SAVED_ARGS = ("method", "backend", "layout", "causal", "scale", "smooth_k", "feature_map", "eps", "critical",
               "negligible", "block_size")


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, block_mask, proj_weight, proj_bias, method, backend, layout, causal, scale, return_lse, needs_grad,
     smooth_k, feature_map, eps, critical, negligible, block_size) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_mask, proj_weight, proj_bias, out, lse)
    ctx.args = dict(method=method, backend=backend, layout=layout, causal=causal, scale=scale, smooth_k=smooth_k,
                    feature_map=feature_map, eps=eps, critical=critical, negligible=negligible,
                    block_size=block_size)


@torch.library.custom_op("attnlib::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                          block_mask: Optional[Tensor], proj_weight: Optional[Tensor], proj_bias: Optional[Tensor],
                          out: Tensor, lse: Tensor, method: str, backend: str, layout: str, causal: bool,
                          scale: Optional[float], smooth_k: bool, feature_map: str, eps: float, critical: float,
                          negligible: float, block_size: List[int]) -> List[Tensor]:
    """(dq, dk, dv, d proj_weight, d proj_bias); an empty tensor stands for "no gradient"."""
    args = dict(block_mask=block_mask, proj_weight=proj_weight, proj_bias=proj_bias, smooth_k=smooth_k,
                feature_map=feature_map, eps=eps, critical=critical, negligible=negligible, block_size=block_size)
    has_lse = method not in NO_LSE
    inp = _build(q, k, v, method, layout, causal, scale, has_lse, True, args)
    kernel = dispatch.select(replace(inp, return_lse=False), backend)
    if not kernel.supports_backward:
        raise RuntimeError(f"attnlib kernel {kernel.name} has no backward pass")
    grads = kernel.backward(inp, to_bhsd(out, layout), lse if has_lse else None, to_bhsd(dout, layout),
                            dlse if has_lse else None)
    dq, dk, dv = (from_bhsd(g, layout).contiguous() for g in grads[:3])
    dw, db = (g if g is not None else q.new_empty(0) for g in (grads[3], grads[4]))
    return [dq, dk, dv, dw, db]


@attention_backward_op.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, block_mask, proj_weight, proj_bias, out, lse, method, backend,
                             layout, causal, scale, smooth_k, feature_map, eps, critical, negligible, block_size):
    dw = torch.empty_like(proj_weight) if proj_weight is not None else q.new_empty(0)
    db = torch.empty_like(proj_bias) if proj_bias is not None else q.new_empty(0)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dw, db]


def _backward(ctx, dout, dlse):
    q, k, v, block_mask, proj_weight, proj_bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dw, db = attention_backward_op(dout, dlse, q, k, v, block_mask, proj_weight, proj_bias, out, lse,
                                               **ctx.args)
    dw = dw if proj_weight is not None else None
    db = db if proj_bias is not None else None
    return (dq, dk, dv, None, dw, db) + (None,) * 13


attention_op.register_autograd(_backward, setup_context=_setup_context)

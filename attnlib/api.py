"""The public attention functions: validate, dispatch, return in the caller's layout."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from . import dispatch, ops
from .dispatch import check_method
from .inputs import AttentionInputs, from_bhsd, make_inputs, plain_number
from .kernels.flash_sdpa import may_serve_graph
from .key_mask import refuse_mask_gradient
from .options import NO_LSE, NO_SCALE, check_option_names, validate_options


def build_inputs(q, k, v, *, method: str = "flash", layout: str = "bhsd", causal: bool = False, scale=None,
                 return_lse: bool = False, **method_options: Any) -> AttentionInputs:
    """Validate a call and normalise it into an :class:`AttentionInputs` (no kernel runs)."""
    check_method(method)
    if method in NO_SCALE and scale is not None:
        raise ValueError(f"scale is not used by method {method!r}; leave it None")
    if method in NO_LSE and return_lse:
        raise ValueError(f"return_lse=True is not defined for method {method!r} (no softmax normaliser)")
    inp = make_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                      return_lse=return_lse)
    return with_options(inp, method_options)


def with_options(inp: AttentionInputs, method_options: dict[str, Any]) -> AttentionInputs:
    """inp, just made by make_inputs, with its method's options validated and set in place
    (nothing else holds it yet: dataclasses.replace would build a second instance, a few
    microseconds per call)."""
    object.__setattr__(inp, "options", validate_options(inp.method, method_options, inp))
    return inp


def attention(q, k, v, *, method: str = "flash", backend: str = "auto", layout: str = "bhsd",
              causal: bool = False, scale=None, return_lse: bool = False, **method_options: Any):
    """Attention by any attnlib method; see the method functions for their options.

    q: (B, Hq, Sq, D) for layout "bhsd" or (B, Sq, Hq, D) for "bshd"; k, v likewise with Hkv
    heads (Hq a multiple of Hkv). causal is bottom-right aligned. Returns the output in the
    input's layout and dtype, or (out, lse) with lse (B, Hq, Sq) when return_lse: float32
    (float64 for float64 inputs)."""
    check_method(method)
    check_option_names(method, method_options)  # names only: the op's schema would drop unknown ones
    if method == "flash":  # the op validates with grad mode off, where a learned mask would pass
        refuse_mask_gradient(method_options.get("key_mask"))
    scale = plain_number(scale)
    eager = not torch.compiler.is_compiling()
    # resolved here (use_backend's thread-local override, ATTNLIB_BACKEND) and passed on, so the
    # backward re-selects the kernel that ran forward even where the override is not in force:
    # loss.backward() after the use_backend block, or on autograd's device threads. Compiled too:
    # dynamo bakes the resolved name into the graph and guards on the override (a graph traced
    # inside use_backend("torch") is retraced outside it), where "auto" resolved by the ops when
    # they ran let a backward outside the block pair another kernel with the forward's output.
    backend = dispatch.effective_backend(backend)
    if eager:
        # every check with its clear error before anything runs (under torch.compile the op's
        # fake implementation runs the same checks while tracing)
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                         return_lse=return_lse, **method_options)  # raises, naming the argument
    tensors = ops.call_tensors(q, k, v, method_options)
    needs_grad = ops.builds_graph(tensors)
    # plain tensors with no mode or transform watching: the op's implementation may run without
    # the dispatcher's round trip; it validates every argument before any kernel runs
    plain = eager and ops.direct_call_ok(tensors)
    if eager and not plain and ops.forward_mode_transform_active():
        raise NotImplementedError(
            f"attnlib.attention (method {method!r}) has no forward-mode derivative: under torch.func.jvp, "
            "jacfwd, linearize or hessian its op would give a zero tangent without a word. Use reverse mode "
            "outside torch.func (torch.autograd.grad, Tensor.backward) or torch's scaled_dot_product_attention "
            "there")
    if eager and not plain and ops.grad_transform_differentiates(tensors):
        raise NotImplementedError(
            f"attnlib.attention (method {method!r}) has no torch.func rules: under torch.func.grad, vjp or "
            "jacrev its op cannot be differentiated (torch's autograd for torch.library ops is not "
            "functorch-aware). Use torch.autograd.grad or Tensor.backward, or torch's "
            "scaled_dot_product_attention there")
    if plain and not needs_grad:  # no autograd node needed
        out, lse = ops.attention_direct(q, k, v, method, backend, layout, causal, scale, return_lse,
                                        ops.op_arguments(method, method_options))
        return (out, lse) if return_lse else out
    inp = None
    if eager and needs_grad and method == "flash" and may_serve_graph(q, method_options.get("deterministic"),
                                                                      return_lse):
        inp = build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                           return_lse=return_lse, **method_options)
        out = _sdpa_with_its_autograd(inp, backend)
        if out is not None:
            return out
    if plain:  # the op's implementation and autograd (ops.attnlib_attention)
        out, lse = ops.attention_with_grad(q, k, v, method, backend, layout, causal, scale, return_lse,
                                           ops.op_arguments(method, method_options))
        return (out, lse) if return_lse else out
    if eager and inp is None:  # validated here, with its clear errors, before the dispatcher
        build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                     return_lse=return_lse, **method_options)
    out, lse = torch.ops.attnlib.attention(q, k, v, method=method, backend=backend, layout=layout, causal=causal,
                                           scale=scale, return_lse=return_lse, needs_grad=needs_grad,
                                           **ops.op_arguments(method, method_options))
    return (out, lse) if return_lse else out


def _sdpa_with_its_autograd(inp: AttentionInputs, backend: str):
    """The output, when the kernel chosen for this graph-building call is torch's SDPA
    (deterministic=False on fp16/bf16 CUDA tensors; fp32 CPU tensors: see kernels/flash_sdpa.py),
    called outside attnlib's op so that torch's autograd runs SDPA's own backward from the
    statistics its forward saved; through the op its backward would first recompute the forward.
    None otherwise."""
    from .kernels.flash_sdpa import FlashSDPA

    kernel = dispatch.select(replace(inp, grad=True), backend)
    if not isinstance(kernel, FlashSDPA):
        return None
    with ops.no_autocast(inp.q):
        return from_bhsd(kernel.forward(inp), inp.layout)


def flash_attention(q, k, v, *, causal: bool = False, scale=None, layout: str = "bhsd",
                    return_lse: bool = False, backend: str = "auto", deterministic: bool = True,
                    key_mask=None):
    """Exact softmax attention (FlashAttention-2 style kernels).

    key_mask (B or 1, Sk), the same for every head, or (B or 1, Hq or 1, Sk), per query head:
    which keys each batch element's queries may see, bool (True = attend: a padded text prompt's
    valid tokens) or floating (added to scale * q . k), the same for every query row, as torch
    SDPA's attn_mask of shape (B, 1, 1, Sk) or (B, Hq, 1, Sk). A row that sees no key gives 0
    (lse -inf). No gradient flows into it. Served by flash-triton, torch SDPA (without
    causal) and the torch kernels; see attnlib/key_mask.py.

    deterministic=False permits a backward whose float additions may come in another order from
    run to run (gradients then differ in their last bits). For fp16/bf16 calls on a GPU that build
    a graph, auto then runs torch's SDPA (cuDNN) forward and its own backward, measured fastest;
    elsewhere the Triton backward stays the deterministic one (its atomic-dQ variant, opt-in with
    ATTNLIB_FLASH_ATOMIC_DQ=1, measured slower). torch.use_deterministic_algorithms(True) keeps
    the deterministic kernels whatever is asked here. Forward results do not depend on it. On a
    CPU, fp32 calls that build a graph run torch SDPA's CPU flash kernel and its own backward
    either way: it is deterministic (kernels/flash_sdpa.py: cpu_backward_ok).
    """
    return attention(q, k, v, method="flash", backend=backend, layout=layout, causal=causal,
                     scale=scale, return_lse=return_lse, deterministic=deterministic, key_mask=key_mask)


def sage_attention(q, k, v, *, causal: bool = False, scale=None, layout: str = "bhsd", smooth_k: bool = True,
                   qk_granularity: str = "per_block", pv: str = "fp16", return_lse: bool = False,
                   backend: str = "auto"):
    """SageAttention (forward only): K smoothed by its token mean, INT8 QK^T, fp16 or fp8 PV.

    qk_granularity: "per_block" (one INT8 scale per 128 query / 64 key tokens) or "per_warp"
    (per 32 query tokens). pv: "fp16" (fp32 accumulation), "fp16_accum" (an fp16 accumulator
    per key block, as on consumer cards) or "fp8" (e4m3 P and per-channel V; sm_89+). fp32
    inputs run the same quantized algorithm. Inputs that require grad are rejected: use
    flash_attention for a differentiable attention.

    Range: pv="fp16" and "fp16_accum" multiply V in fp16, so fp32 / bf16 values of V beyond
    fp16's 65504 overflow (inf / NaN outputs), as in SageAttention; "fp16_accum" also overflows
    where a key block's sum P V passes 65504 (e.g. V with a mean of ~1500 over 64 keys).
    pv="fp8" scales V per channel. For V with a large mean, the sageattention compat entry
    points take smooth_v=True (V's token mean subtracted before and added back after).
    """
    return attention(q, k, v, method="sage", backend=backend, layout=layout, causal=causal, scale=scale,
                     return_lse=return_lse, smooth_k=smooth_k, qk_granularity=qk_granularity, pv=pv)


def block_sparse_attention(q, k, v, block_mask, *, block_size=(64, 64), causal: bool = False, scale=None,
                           layout: str = "bhsd", return_lse: bool = False, backend: str = "auto"):
    """Attention over the (query block, key block) pairs a bool block mask allows.

    The kernels' index form of the mask is cached per mask object and version counter
    (attnlib.block_mask.INDEX_CACHE). In-place torch writes (mask[i] = x, mask.copy_(new)) are
    seen. Writes that bypass the version counter (mask.data[...], a NumPy or torch.from_numpy
    view, DLPack, a custom kernel writing into it) are not: after those, pass a new mask tensor,
    call attnlib.block_mask.INDEX_CACHE.clear(), or set ATTNLIB_BLOCK_INDEX_CACHE=0."""
    return attention(q, k, v, method="block_sparse", backend=backend, layout=layout, causal=causal,
                     scale=scale, return_lse=return_lse, block_mask=block_mask, block_size=block_size)


def linear_attention(q, k, v, *, feature_map: str = "elu", causal: bool = False, layout: str = "bhsd",
                     eps: float = 1e-6, backend: str = "auto"):
    """phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K) + eps); causal uses prefix sums."""
    return attention(q, k, v, method="linear", backend=backend, layout=layout, causal=causal,
                     feature_map=feature_map, eps=eps)


def sla_attention(q, k, v, proj_weight=None, proj_bias=None, *, critical: float = 0.05,
                  negligible: float = 0.10, block_size=(64, 64), feature_map: str = "softmax", scale=None,
                  causal: bool = False, layout: str = "bhsd", backend: str = "auto"):
    """SLA: critical blocks exact, marginal blocks by linear attention (projected), rest skipped.

    causal (bottom-right): blocks above the diagonal are negligible, blocks crossing it critical."""
    return attention(q, k, v, method="sla", backend=backend, layout=layout, scale=scale, causal=causal,
                     proj_weight=proj_weight, proj_bias=proj_bias, critical=critical, negligible=negligible,
                     block_size=block_size, feature_map=feature_map)


def explain(q, k, v, *, method: str = "flash", backend: str = "auto", layout: str = "bhsd",
            causal: bool = False, scale=None, return_lse: bool = False, **method_options: Any
            ) -> dispatch.Explanation:
    """The kernel that would run and every rejected candidate with its reasons; runs nothing."""
    inp = build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                       return_lse=return_lse, **method_options)
    return dispatch.explain(inp, backend)

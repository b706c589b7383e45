"""flash_attention_varlen: packed (total_tokens, heads, head_dim) sequences with cu_seqlens."""
from __future__ import annotations

import torch

from .dispatch import NoKernelError, effective_backend
from .inputs import (FLOAT_DTYPES, AttentionInputs, check_dense, check_scale, plain_number, type_name,
                     unit_last_stride)
from .recompute import vjp as func_vjp

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_packed(q, k, v) -> None:
    """Packed (total_tokens, heads, head_dim) q, k, v that agree (also sageattn_varlen's check)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:  # as the dense API (inputs.validate_qkv): no float8
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must agree on tokens and heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[2] == 0:
        raise ValueError(f"q and k must share a positive head_dim, got q={q.shape[2]}, k={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def _check_cu_seqlens(name: str, cu, device: torch.device, max_name: str, max_seqlen) -> None:
    """Type, shape and device of one cu_seqlens tensor and its max_seqlen (no values read)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")


def _values_readable(cu: torch.Tensor) -> bool:
    """Whether cu_seqlens values may be read on the host now: not on the meta device (no values),
    and not while a CUDA graph is being captured (a device-to-host copy is not allowed there; the
    values of a replay are not known at capture anyway)."""
    if cu.device.type == "meta":
        return False
    return not (cu.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_cu_values(cu_q, cu_k, total_q: int, total_k: int, max_seqlen_q: int,
                     max_seqlen_k: int) -> tuple[int, int]:
    """The values of cu_seqlens_q/k (same length, checked before) against the token counts and
    max_seqlen_q/k; returns (cu_seqlens_q[-1], cu_seqlens_k[-1]). A cu_seqlens that does not start
    at 0, decreases or ends past the token count makes a kernel read or write rows outside
    q/k/v/out; a max_seqlen below the longest sequence sizes the launch grid too small, leaving
    that sequence's tail rows unwritten. Read with one host copy of the 2 * (batch + 1) ints: on a
    GPU one synchronisation (flash_attn trusts these values; a wrong answer or a fault inside a
    kernel is worse than the sync)."""
    n = cu_q.shape[0]
    values = torch.cat((cu_q, cu_k)).tolist()
    check_bounds("cu_seqlens_q", values[:n], total_q, "max_seqlen_q", max_seqlen_q)
    check_bounds("cu_seqlens_k", values[n:], total_k, "max_seqlen_k", max_seqlen_k)
    return values[n - 1], values[-1]


def check_bounds(name: str, cu: list[int], total: int, max_name: str, max_seqlen: int) -> None:
    """One cu_seqlens, read to host ints (length >= 2): it starts at 0, never decreases and ends at
    most at the token count (rows past its end are padding, as flash_attn allows), and no sequence
    is longer than max_seqlen; else a ValueError naming both."""
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or cu[-1] > total or min(lens) < 0:
        shown = cu if len(cu) <= 64 else cu[:32] + ["..."] + cu[-32:]
        # where it goes wrong: a long cu_seqlens is shown shortened, which may hide the decrease
        if cu[0] != 0:
            where = f"{name}[0] is {cu[0]}"
        elif min(lens) < 0:
            i = next(i for i, n in enumerate(lens) if n < 0)
            where = f"{name} decreases from {cu[i]} at index {i} to {cu[i + 1]} at index {i + 1}"
        else:
            where = f"{name}[-1] is {cu[-1]}"
        raise ValueError(f"{name} must start at 0, never decrease and end at most at the token count {total} "
                         f"({where}), got {shown}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} "
                         f"({max(lens)})")


def _triton_reasons(q, k, v, cu_seqlens_q, causal: bool, scale: float) -> list[str]:
    """Why the Triton kernel cannot run these packed tensors (empty list: it can). The dense
    kernel's checks (dtype, head dim, bf16 under the interpreter, heads on grid axis y) apply to
    the (1, heads, total, d) view; the sequences go on grid axis z, where batch would."""
    from .kernels.families import grid_yz_reasons
    from .kernels.flash_triton import FlashTriton

    def view(x):  # (total, heads, d) -> (1, heads, total, d), as the kernel sees it
        return x.unsqueeze(0).transpose(1, 2)

    inp = AttentionInputs(q=view(q), k=view(k), v=view(v), method="flash", causal=causal, scale=scale)
    return FlashTriton().not_supported_reasons(inp) + grid_yz_reasons({"sequences": cu_seqlens_q.shape[0] - 1})


def _pick_backend(backend: str, q, k, v, cu_seqlens_q, causal: bool, scale: float) -> str:
    backend = effective_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        raise NoKernelError("flash_attention_varlen has no cuda backend; use backend='triton' or 'torch'")
    reasons = _triton_reasons(q, k, v, cu_seqlens_q, causal, scale)
    if backend == "triton" and reasons:
        raise NoKernelError("flash_attention_varlen: backend='triton' cannot run this call:\n"
                            + "\n".join(f"  - {r}" for r in reasons))
    return "torch" if reasons else "triton"


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           causal=False, scale=None, return_lse=False, backend="auto", deterministic=True):
    """Exact attention over packed variable-length sequences (flash_attn's varlen interface).

    q (total_q, Hq, D), k/v (total_k, Hkv, D) with Hq a multiple of Hkv; sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v (int32,
    length batch + 1; empty sequences allowed). causal is bottom-right aligned per sequence.
    Returns out (total_q, Hq, D), or (out, lse) with lse (Hq, total_q), float32 (float64 for
    float64 inputs). backend "auto"
    runs Triton on CUDA tensors (or under TRITON_INTERPRET=1), else torch: flash-torch-chunked's
    functions sequence by sequence (the float64 reference for float64).

    cu_seqlens values and max_seqlen_q/k are checked on every device (a ValueError, where a wrong
    cu_seqlens would make the kernel read or write out of bounds and a too small max_seqlen_q,
    which sizes the launch grid, would leave rows unwritten). That reads the 2 * (batch + 1) ints
    on the host: on a GPU one synchronisation per call (flash_attn does not check). They are
    trusted, as in flash_attn, while a CUDA graph is captured (no host reads there) and under
    torch.compile (no values while tracing).

    q, k and v may be longer than their sequences (cu_seqlens_q[-1] < total_q, cu_seqlens_k[-1] <
    total_k; flash_attn allows such padded buffers): padding rows output 0 with lse -inf and get
    zero gradients. While a CUDA graph is captured or under torch.compile (values not read) the
    padding rows of out and lse are left unspecified, as flash_attn leaves them.

    deterministic=False permits a non-deterministic backward (see flash_attention): the Triton
    backward adds dQ with atomics only under ATTNLIB_FLASH_ATOMIC_DQ=1.
    """
    return packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            scale=scale, return_lse=return_lse, backend=backend, deterministic=deterministic)


def packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale,
                     return_lse, backend, deterministic, host_checked=False):
    """flash_attention_varlen's body. host_checked=True: the caller built cu_seqlens_q/k and
    max_seqlen_q/k from host values it has checked itself (flash_attn_with_kvcache), so their
    values are not read back from the device (one host synchronisation fewer per call)."""
    # resolved now (use_backend, ATTNLIB_BACKEND), compiled or not, so the backward runs the
    # forward's backend even outside the use_backend block (see api.attention)
    backend = effective_backend(backend)
    if not torch.compiler.is_compiling():  # the fake implementation checks shapes while tracing
        check_packed(q, k, v)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)  # see inputs.unit_last_stride
    if not torch.compiler.is_compiling():
        from .ops import forward_mode_transform_active, grad_transform_differentiates

        if forward_mode_transform_active():
            raise NotImplementedError("flash_attention_varlen has no forward-mode derivative: under "
                                      "torch.func.jvp, jacfwd, linearize or hessian it would give a zero "
                                      "tangent. Use reverse mode outside torch.func (torch.autograd.grad, "
                                      "Tensor.backward)")
        if grad_transform_differentiates((q, k, v)):
            raise NotImplementedError("flash_attention_varlen has no torch.func rules: under torch.func.grad, "
                                      "vjp or jacrev its op cannot be differentiated (torch.library ops with a "
                                      "registered autograd are not functorch-aware). Use torch.autograd.grad "
                                      "or Tensor.backward")
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, "max_seqlen_q", max_seqlen_q)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, "max_seqlen_k", max_seqlen_k)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        ends = None
        if not host_checked and _values_readable(cu_seqlens_q):
            ends = _check_cu_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
        for name, flag in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type_name(flag)}")
        scale = check_scale(scale, q.shape[2])
        _pick_backend(backend, q, k, v, cu_seqlens_q, causal, scale)  # raises for a backend that cannot run it
        if ends is not None and (ends[0] < q.shape[0] or ends[1] < k.shape[0]):
            return _padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ends, causal=causal,
                           scale=scale, return_lse=return_lse, backend=backend, deterministic=deterministic)
    elif scale is None:
        scale = q.shape[2] ** -0.5
    else:
        scale = plain_number(scale)
    out, lse = torch.ops.attnlib.flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              causal, scale, backend, deterministic)
    return (out, lse) if return_lse else out


def _padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ends: tuple[int, int], *, causal,
            scale, return_lse, backend, deterministic):
    """Buffers longer than their sequences (cu_seqlens_q[-1] < total_q or cu_seqlens_k[-1] <
    total_k: padding rows, as in static buffers sized for CUDA graphs): the sequences' rows only
    (views), then the padding rows appended as output 0 and lse -inf, rows that see no key. Their
    gradients are 0 (flash_attn leaves such rows of out, lse, dq, dk, dv unwritten)."""
    (q_end, k_end), total_q = ends, q.shape[0]
    out, lse = packed_attention(q[:q_end], k[:k_end], v[:k_end], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, causal=causal, scale=scale, return_lse=True, backend=backend,
                                deterministic=deterministic, host_checked=True)
    out = torch.cat((out, out.new_zeros(total_q - q_end, *out.shape[1:])))
    if not return_lse:
        return out
    return out, torch.cat((lse, lse.new_full((lse.shape[0], total_q - q_end), float("-inf"))), dim=1)


# -- the custom ops: forward and backward, opaque to torch.compile -------------------------------
_LIB = torch.library.Library("attnlib", "FRAGMENT")
_LIB.define("flash_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
            "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, str backend, bool deterministic) "
            "-> (Tensor, Tensor)")
_LIB.define("flash_varlen_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
            "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
            "bool causal, float scale, str backend, bool deterministic) -> Tensor[]")


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.impl(_LIB, "flash_varlen", "CompositeExplicitAutograd")
def _flash_varlen_impl(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, deterministic):
    if _pick_backend(backend, q, k, v, cu_q, causal, scale) == "torch":
        if q.dtype in _KERNEL_DTYPES:  # memory-bounded: no sequence's (s_q, s_k) scores held whole
            from .kernels.flash_torch_chunked import varlen_forward

            out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=causal, scale=scale)
        else:  # fp64: the reference, in float64
            from .reference.flash_varlen import flash_varlen_reference

            out, lse = flash_varlen_reference(q, k, v, cu_q, cu_k, causal=causal, scale=scale, return_lse=True)
    else:
        from .triton_kernels.flash.varlen import flash_attn_varlen_func

        out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@torch.library.register_fake("attnlib::flash_varlen", lib=_LIB)
def _flash_varlen_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, deterministic):
    check_packed(q, k, v)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return out, q.new_empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q))


@torch.library.impl(_LIB, "flash_varlen_backward", "CompositeExplicitAutograd")
def _flash_varlen_backward_impl(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend,
                                deterministic):
    if _pick_backend(backend, q, k, v, cu_q, causal, scale) == "torch":
        if q.dtype in _KERNEL_DTYPES:  # FlashAttention-2's backward from the saved out and lse
            from .kernels.flash_torch_chunked import varlen_backward

            return [g.contiguous() for g in varlen_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k,
                                                             causal=causal, scale=scale)]
        from .reference.flash_varlen import flash_varlen_reference

        cq, ck = cu_q.tolist(), cu_k.tolist()  # read here: torch 2.8's functorch refuses it inside vjp

        def f(q_, k_, v_):
            return flash_varlen_reference(q_, k_, v_, cq, ck, causal=causal, scale=scale, return_lse=True)

        (o, l), vjp = func_vjp(f, q, k, v)
        cot = (dout.to(o.dtype), dlse.to(l.dtype) if dlse is not None else torch.zeros_like(l))
        return [g.contiguous() for g in vjp(cot)]
    from .triton_kernels.flash.backward import flash_bwd
    from .triton_kernels.flash.common import Varlen
    from .triton_kernels.flash.varlen import packed_to_bhsd

    varlen = Varlen(cu_q, cu_k, int(max_q), int(max_k))
    grads = flash_bwd(packed_to_bhsd(dout), packed_to_bhsd(q), packed_to_bhsd(k), packed_to_bhsd(v),
                      packed_to_bhsd(out), lse, causal=causal, scale=scale, varlen=varlen, dlse=dlse,
                      deterministic=deterministic)
    return [g.transpose(1, 2).squeeze(0).contiguous() for g in grads]


@torch.library.register_fake("attnlib::flash_varlen_backward", lib=_LIB)
def _flash_varlen_backward_fake(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend,
                                deterministic):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, deterministic = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, backend, deterministic)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnlib.flash_varlen_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnlib::flash_varlen", _backward, setup_context=_setup_context, lib=_LIB)


def _refuse_double_backward() -> None:
    from .ops import refuse_double_backward

    refuse_double_backward("flash_varlen_backward", "flash_attention_varlen", _LIB)


_refuse_double_backward()

_VARLEN_NAMES = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _sequence_lengths(cu: torch.Tensor, max_len: int) -> list[int]:
    """Each sequence's length from cu_seqlens; max_len for each where its values cannot be read
    (fake or meta tensors while tracing), as torch's varlen formula bounds them."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(cu, (FakeTensor, FunctionalTensor)) or cu.is_meta:
        return [max_len] * (cu.shape[0] - 1)
    return cu.diff().tolist()


def _register_flop_formulas() -> None:
    """FlopCounterMode counts the varlen ops as torch counts its own varlen flash attention: its
    SDPA formulas (as ops._register_flop_formulas for the dense op) summed over the sequences,
    causal counted in full; rows past cu_seqlens_q[-1] (padding) are not counted. Without a
    formula they count 0."""
    try:
        from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
    except ImportError:  # pragma: no cover - a torch without it
        return

    def _varlen_flops(a: dict, backward: bool) -> int:
        hq, d, dv = a["q"].shape[1], a["q"].shape[-1], a["v"].shape[-1]
        total = 0
        for sq, sk in zip(_sequence_lengths(a["cu_seqlens_q"], a["max_seqlen_q"]),
                          _sequence_lengths(a["cu_seqlens_k"], a["max_seqlen_k"])):
            q, k, v = (1, hq, sq, d), (1, hq, sk, d), (1, hq, sk, dv)
            total += sdpa_backward_flop_count((1, hq, sq, dv), q, k, v) if backward else sdpa_flop_count(q, k, v)
        return total

    @register_flop_formula(torch.ops.attnlib.flash_varlen, get_raw=True)
    def _forward(*args, out_val=None, **kwargs) -> int:
        return _varlen_flops(dict(zip(_VARLEN_NAMES, args), **kwargs), backward=False)

    @register_flop_formula(torch.ops.attnlib.flash_varlen_backward, get_raw=True)
    def _backward_flops(*args, out_val=None, **kwargs) -> int:
        names = ("dout", "dlse", "q", "k", "v", "out", "lse") + _VARLEN_NAMES[3:]
        return _varlen_flops(dict(zip(names, args), **kwargs), backward=True)


_register_flop_formulas()

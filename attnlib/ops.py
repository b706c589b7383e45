"""The custom ops every attention call goes through: torch.library registration, fake, autograd.

``torch.ops.attnlib.attention`` takes the caller's tensors as they are (either layout) and all
options as typed arguments, validates them, dispatches to a kernel and returns
``(out, lse)``: out contiguous in the caller's layout and dtype; lse (B, H, Sq) float32
(float64 for float64 inputs) for softmax methods, an empty tensor for the others. Because
selection and launching happen inside the op, ``torch.compile(fullgraph=True)`` sees one opaque
node with a fake implementation and no graph break; the op never synchronises the host.

The schema is generated from ``options.OP_OPTION_TYPES``, so a method's new option needs no
change here. Backward is a second op, ``attnlib::attention_backward``, which re-selects the
kernel that ran forward (selection is deterministic for the same inputs) and calls its
``backward``; being an op itself, it stays opaque to compile-time tracing too.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from . import dispatch
from .inputs import AttentionInputs, from_bhsd, plain_number, to_bhsd
from .options import AUX_LSE, METHOD_OPTIONS, NO_LSE, OP_OPTION_TYPES, TUPLE_OPTIONS

_LIB = torch.library.Library("attnlib", "FRAGMENT")

OPTION_NAMES = tuple(OP_OPTION_TYPES)
TENSOR_OPTIONS = tuple(n for n, (t, _) in OP_OPTION_TYPES.items() if t.startswith("Tensor"))
# differentiable tensor options, in the order kernels' backward returns their gradients
GRAD_OPTIONS = ("proj_weight", "proj_bias")
_CALL_ARGS = ("method", "backend", "layout", "causal", "scale")
_OPTION_SCHEMA = ", ".join(f"{t} {n}" for n, (t, _) in OP_OPTION_TYPES.items())

_LIB.define(f"attention(Tensor q, Tensor k, Tensor v, str method, str backend, str layout, bool causal, "
            f"float? scale, bool return_lse, bool needs_grad, {_OPTION_SCHEMA}) -> (Tensor, Tensor)")
# return_lse: the forward's, for the backward to re-select the kernel that ran (a kernel without lse,
# torch SDPA, may rank first without it, and its backward has no dlse term)
_LIB.define(f"attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
            f"str method, str backend, str layout, bool causal, float? scale, bool return_lse, {_OPTION_SCHEMA}) "
            f"-> Tensor[]")


def op_arguments(method: str, method_options: dict[str, Any]) -> dict[str, Any]:
    """Every option argument of the op: the method's options (given or default), placeholders elsewhere."""
    args = {n: placeholder for n, (_t, placeholder) in OP_OPTION_TYPES.items()}
    for name, (default, _check) in METHOD_OPTIONS[method].items():
        args[name] = _schema_numbers(method_options.get(name, default), OP_OPTION_TYPES[name][0])
    for name in TUPLE_OPTIONS:  # anything else stays as given, for validation to name it
        if isinstance(args[name], (tuple, list)):
            args[name] = list(args[name])
    return args


def _schema_numbers(value: Any, schema_type: str) -> Any:
    """NumPy scalars in a float, int or int[] option as Python numbers (inputs.plain_number)."""
    if schema_type in ("float", "int"):
        return plain_number(value, traced_float=schema_type == "float")
    if schema_type == "int[]" and isinstance(value, (tuple, list)):
        return type(value)(plain_number(x, traced_float=False) for x in value)
    return value


def _method_options(method: str, args: dict[str, Any]) -> dict[str, Any]:
    opts = {name: args[name] for name in METHOD_OPTIONS[method]}
    for name in TUPLE_OPTIONS:
        if name in opts and isinstance(opts[name], list):
            opts[name] = tuple(opts[name])
    return opts


def _build(q, k, v, method, layout, causal, scale, return_lse, grad, options) -> AttentionInputs:
    from .api import build_inputs

    inp = build_inputs(q, k, v, method=method, layout=layout, causal=causal, scale=scale,
                       return_lse=return_lse, **_method_options(method, options))
    object.__setattr__(inp, "grad", grad)  # the instance just made (see api.build_inputs)
    return inp


def _autocast_device_types() -> frozenset:
    found = set()
    for dev in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu", "privateuseone"):
        try:
            if torch.amp.is_autocast_available(dev):
                found.add(dev)
        except RuntimeError:  # a device type this torch does not know
            pass
    return frozenset(found)


# Asked once, at import: torch.amp.is_autocast_available is a builtin that Dynamo cannot trace in
# torch 2.11 (the GPU machines' version), and autocast_enabled runs in the SDPA drop-in under
# torch.compile(fullgraph=True), where a graph break is an error.
AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for device_type (False for a device autocast does not know)."""
    if device_type in AUTOCAST_DEVICE_TYPES:
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(q: Tensor):
    """A context in which kernels run with torch.autocast off for q's device (a no-op context when
    it is off): the op returns its inputs' dtype and kernels compute at their own precision, so a
    torch-backend kernel (torch SDPA casts under autocast, references' matmuls would run in the
    autocast dtype) gives what it gives outside autocast, and what the fake implementation says."""
    dev = q.device.type
    if autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _lse_shape(method: str, q: Tensor, layout: str, needs_grad: bool) -> tuple:
    """(B, H, Sq), or (0,) for a method without lse (unless its kernel keeps one for backward)."""
    if method in NO_LSE and not (method in AUX_LSE and needs_grad):
        return (0,)
    return tuple(to_bhsd(q, layout).shape[:3])


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _split(names: tuple, args: tuple) -> dict[str, Any]:
    return dict(zip(names, args))


_FWD_NAMES = ("q", "k", "v") + _CALL_ARGS + ("return_lse", "needs_grad") + OPTION_NAMES
_BWD_NAMES = ("dout", "dlse", "q", "k", "v", "out", "lse") + _CALL_ARGS + ("return_lse",) + OPTION_NAMES


@torch.library.impl(_LIB, "attention", "CompositeExplicitAutograd")
def _attention_impl(*args):
    return _attention(_split(_FWD_NAMES, args), placeholder=True)


def _attention(a: dict[str, Any], *, placeholder: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The op's implementation; placeholder=False (the direct path, whose caller did not ask for
    lse) returns None where a kernel gave no lse, instead of filling a tensor for it."""
    q, method, layout = a["q"], a["method"], a["layout"]
    inp = _build(q, a["k"], a["v"], method, layout, a["causal"], a["scale"], a["return_lse"], a["needs_grad"], a)
    kernel = dispatch.select(inp, a["backend"])
    return forward_selected(inp, kernel, q, layout, a["needs_grad"], placeholder=placeholder)


def forward_selected(inp: AttentionInputs, kernel, q: Tensor, layout: str, needs_grad: bool, *,
                     placeholder: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The op's implementation after validation and selection: inp from _build (or the SDPA
    drop-in's own checks, which made it), kernel = dispatch.select(inp, backend), q as the caller
    gave it (its layout)."""
    method = inp.method
    # lse where someone reads it (the caller, the backward) or where it costs nothing: a full
    # placeholder would be one more launch (see Kernel.lse_is_free)
    want_lse = method not in NO_LSE and kernel.supports_lse and (
        kernel.lse_is_free or inp.return_lse or needs_grad)
    aux_lse = method in AUX_LSE and needs_grad and kernel.keeps_lse_for_backward
    with no_autocast(q):
        res = kernel.forward(inp if inp.return_lse == want_lse else replace(inp, return_lse=want_lse))
    out, lse = res if (want_lse or aux_lse) else (res, None)
    out = from_bhsd(out, layout).contiguous()
    if lse is None and not placeholder:
        return out, None
    if lse is None:
        # only when the caller did not ask for lse (a kernel without one is rejected otherwise);
        # that kernel's backward does not read it. NaN marks it; an AUX_LSE method's slot, which
        # no caller sees, is zeros (NaN would make eager and traced outputs compare unequal)
        fill = 0.0 if method in NO_LSE else float("nan")
        lse = torch.full(_lse_shape(method, q, layout, needs_grad), fill, dtype=_lse_dtype(q), device=q.device)
    return out, lse.to(_lse_dtype(q)).contiguous()


def call_tensors(q, k, v, method_options: dict[str, Any]) -> tuple:
    """A call's tensors: q, k, v and its tensor options (projections, masks)."""
    return (q, k, v, *(t for t in method_options.values() if isinstance(t, Tensor)))


def builds_graph(tensors) -> bool:
    """Whether autograd records a call on these tensors (call_tensors)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def direct_call_ok(tensors) -> bool:
    """Whether an eager call that needs no gradient may run the op's implementation directly,
    skipping the dispatcher's round trip through torch.library (about 60 us a call on a CI
    core, more than validation, selection and launch together). Only for plain tensors with no
    torch-function or torch-dispatch mode active: FakeTensor, FunctionalTensor, make_fx and
    torch.jit tracing, DTensor and other subclasses, vmap / grad transforms, FlopCounterMode and
    the like all see the op itself. torch.compile does too (callers check is_compiling first), and
    meta tensors (no kernel runs on them: the op's Meta kernel, its fake implementation, gives
    outputs of the right shapes as torch SDPA does). Subclasses are told by their dispatch key:
    has_torch_function misses those that disable __torch_function__ (DTensor, wrapper subclasses),
    whose own __torch_dispatch__ must see the op; run directly, the kernels got the wrappers."""
    if torch.jit.is_tracing() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch.overrides.has_torch_function(tensors):
        return False
    return not any(t.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(t) or dispatch_subclass(t)
                   for t in tensors)


def dispatch_subclass(t: Tensor) -> bool:
    """Whether t is a tensor subclass with its own __torch_dispatch__ (the dispatcher's Python
    key: DTensor, a quantized or logging wrapper, a FakeTensor); nn.Parameter is not one."""
    return type(t) is not Tensor and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


def attention_direct(q, k, v, method: str, backend: str, layout: str, causal: bool, scale, return_lse: bool,
                     options: dict[str, Any]) -> tuple[Tensor, Optional[Tensor]]:
    """What ``torch.ops.attnlib.attention`` returns, computed without the dispatcher (no autograd
    node: for calls that need no gradient; see direct_call_ok), except that lse is None when the
    caller did not ask for it and the kernel gave none (the op fills a tensor for it: on a GPU one
    more launch per call, e.g. on torch SDPA). options: op_arguments(...)."""
    args = (q, k, v, method, backend, layout, causal, scale, return_lse, False, *(options[n] for n in OPTION_NAMES))
    return _attention(_split(_FWD_NAMES, args), placeholder=return_lse)


@torch.library.register_fake("attnlib::attention", lib=_LIB)
def _attention_fake(*args):
    a = _split(_FWD_NAMES, args)
    q = a["q"]
    inp = _build(q, a["k"], a["v"], a["method"], a["layout"], a["causal"], a["scale"], a["return_lse"],
                 a["needs_grad"], a)  # validates while tracing
    shape = list(q.shape)
    shape[-1] = inp.head_dim_v
    return q.new_empty(shape), q.new_empty(_lse_shape(a["method"], q, a["layout"], a["needs_grad"]),
                                           dtype=_lse_dtype(q))


@torch.library.impl(_LIB, "attention_backward", "CompositeExplicitAutograd")
def _attention_backward_impl(*args):
    """[dq, dk, dv, d<grad option>...]; an empty tensor stands for "no gradient"."""
    a = _split(_BWD_NAMES, args)
    q, method, layout = a["q"], a["method"], a["layout"]
    has_lse = method not in NO_LSE
    inp = _build(q, a["k"], a["v"], method, layout, a["causal"], a["scale"], has_lse, True, a)
    # the forward's selection: its return_lse (the caller's), not has_lse
    kernel = dispatch.select(replace(inp, return_lse=a["return_lse"]), a["backend"])
    if not kernel.supports_backward:
        raise RuntimeError(f"attnlib kernel {kernel.name} has no backward pass")
    lse = a["lse"]
    if not has_lse:  # the kernel's own statistic from forward, when it kept one
        lse = lse if method in AUX_LSE and kernel.keeps_lse_for_backward and lse.dim() == 3 else None
    with no_autocast(q):
        grads = kernel.backward(inp, to_bhsd(a["out"], layout), lse,
                                to_bhsd(a["dout"], layout), a["dlse"] if has_lse else None)
    dq, dk, dv = (from_bhsd(g, layout).contiguous() for g in grads[:3])
    rest = [g if g is not None else q.new_empty(0) for g in grads[3:3 + len(GRAD_OPTIONS)]]
    return [dq, dk, dv] + rest


@torch.library.register_fake("attnlib::attention_backward", lib=_LIB)
def _attention_backward_fake(*args):
    a = _split(_BWD_NAMES, args)
    rest = [torch.empty_like(a[n]) if a[n] is not None else a["q"].new_empty(0) for n in GRAD_OPTIONS]
    return [torch.empty_like(a["q"]), torch.empty_like(a["k"]), torch.empty_like(a["v"])] + rest


def _setup_context(ctx, inputs, output) -> None:
    a = _split(_FWD_NAMES, inputs)
    ctx.save_for_backward(a["q"], a["k"], a["v"], output[0], output[1], *(a[n] for n in TENSOR_OPTIONS))
    ctx.scalars = {n: a[n] for n in _CALL_ARGS + ("return_lse",) + OPTION_NAMES if n not in TENSOR_OPTIONS}


def _backward(ctx, dout, dlse, direct: bool = False):
    """direct: call the backward op's implementation without the dispatcher, as attention_direct
    does for forwards (eager calls through attnlib_attention with plain tensors, not double
    backward)."""
    q, k, v, out, lse, *tensor_opts = ctx.saved_tensors
    opts = dict(ctx.scalars, **dict(zip(TENSOR_OPTIONS, tensor_opts)))
    args = (dout, dlse, q, k, v, out, lse, *(opts[n] for n in _CALL_ARGS + ("return_lse",) + OPTION_NAMES))
    if direct and not torch.is_grad_enabled() and direct_call_ok(
            [t for t in args if isinstance(t, torch.Tensor)]):
        grads = _attention_backward_impl(*args)
    else:
        grads = torch.ops.attnlib.attention_backward(*args)
    by_name = {n: (g if opts[n] is not None else None) for n, g in zip(GRAD_OPTIONS, grads[3:])}
    option_grads = tuple(by_name.get(n) for n in OPTION_NAMES)
    return (grads[0], grads[1], grads[2]) + (None,) * (len(_CALL_ARGS) + 2) + option_grads


torch.library.register_autograd("attnlib::attention", _backward, setup_context=_setup_context, lib=_LIB)


def refuse_double_backward(backward_op: str, what: str, lib) -> None:
    """Give the backward op ``attnlib::<backward_op>`` an autograd that raises. Without one, torch's
    fallback lets a double backward through it run with only a warning, and the fused kernels
    then give zero second-order gradients without a word."""
    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"{what} has no double backward (a gradient of its gradients, e.g. "
                           "autograd.grad(..., create_graph=True) followed by a backward through that "
                           "gradient, as a gradient penalty does): its backward kernels are not differentiable")

    torch.library.register_autograd(f"attnlib::{backward_op}", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None, lib=lib)


def _transform_active(kind) -> bool:
    """Whether a torch.func transform of this TransformType is on the functorch stack."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == kind for i in retrieve_all_functorch_interpreters())


def forward_mode_transform_active() -> bool:
    """Whether a torch.func forward-mode transform (jvp; jacfwd, linearize and hessian use it) is
    active: functorch treats an output a custom op gives without a tangent as a zero tangent."""
    return _transform_active(torch._C._functorch.TransformType.Jvp)


def grad_transform_differentiates(tensors) -> bool:
    """Whether a torch.func reverse-mode transform (grad, vjp, jacrev) is active and would
    differentiate a call on these tensors: the autograd.Function torch builds behind the op's
    registered autograd is not functorch-aware and raises an error about setup_context that names
    nothing of attnlib's."""
    if not torch._C._are_functorch_transforms_active() or not torch.is_grad_enabled():
        return False
    return (_transform_active(torch._C._functorch.TransformType.Grad)
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


refuse_double_backward("attention_backward", "attnlib attention", _LIB)

attention_op = torch.ops.attnlib.attention.default


class attnlib_attention(torch.autograd.Function):  # grad_fn: attnlib_attentionBackward
    """An eager graph-building call on plain tensors: the op's implementation inside forward (no
    grad there), and the op's registered setup_context and backward (_setup_context, _backward),
    so the same tensors are saved and the same backward runs. It skips the dispatcher's round
    trips and what torch.library's generated autograd adds per call: fill_defaults, which reads
    the op's schema arguments once per argument (32 of them), 265 us of a 420 us graph-building
    flash call on the CI CPU with the launches stubbed (now 105 us; fwd+bwd 506 -> about 260 us,
    with the backward's direct call and unmaterialised dlse below). Gradients are not
    materialised: an lse that never reached the loss (the API drops it unless return_lse) gives
    dlse None, not a zeros tensor the backward would mask and subtract (three launches a call)."""

    @staticmethod
    def forward(ctx, *args):
        # the op's implementation without the dispatcher's round trip (attention_with_grad is
        # called only for plain tensors: see direct_call_ok)
        output = _attention_impl(*args)
        _setup_context(ctx, args, output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:  # only lse reached the loss
            dout = torch.zeros_like(ctx.saved_tensors[3])
        return _backward(ctx, dout, dlse, direct=True)


def attention_with_grad(q, k, v, method: str, backend: str, layout: str, causal: bool, scale, return_lse: bool,
                        options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(out, lse) of an eager call that builds a graph (see direct_call_ok for which tensors may
    take this path; the rest, and torch.compile, call the op and its registered autograd)."""
    return attnlib_attention.apply(q, k, v, method, backend, layout, causal, scale, return_lse, True,
                                 *(options[n] for n in OPTION_NAMES))


def _dense_shapes(names: tuple, args: tuple, kwargs: dict):
    """(method, q, k, v shapes as bhsd) of an op call as a dispatch mode sees it, k and v with the
    query's head count: under GQA every query head forms its own QK^T and PV (the count torch
    2.13's formulas give for GQA shapes; those of torch 2.11 refuse unequal head counts)."""
    a = dict(zip(names, args), **kwargs)
    q, k, v = (tuple(to_bhsd(a[n], a["layout"]).shape) for n in ("q", "k", "v"))
    return a["method"], q, (k[0], q[1], *k[2:]), (v[0], q[1], *v[2:])


# methods whose kernels compute QK^T and PV over every (query, key) pair, as dense attention does
DENSE_PRODUCT_METHODS = ("flash", "sage")


def _register_flop_formulas() -> None:
    """FlopCounterMode (how training scripts measure MFU) counts attnlib's ops like torch's SDPA
    (torch's own formulas: QK^T and PV over all Sq x Sk pairs forward, with the recompute
    backward), for methods flash and sage (INT8 QK^T and fp16/fp8 PV: the same products at lower
    precision, as SageAttention's own throughput figures count them); the op is opaque to it
    otherwise and counted 0. Sparse, token-reducing and linear methods do less or other work
    than dense attention and get no formula rather than a wrong one. Varlen: varlen.py."""
    try:
        from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
    except ImportError:  # pragma: no cover - a torch without them
        return

    @register_flop_formula(torch.ops.attnlib.attention, get_raw=True)
    def _attention_flops(*args, out_val=None, **kwargs) -> int:
        method, q, k, v = _dense_shapes(_FWD_NAMES, args, kwargs)
        return sdpa_flop_count(q, k, v) if method in DENSE_PRODUCT_METHODS else 0

    @register_flop_formula(torch.ops.attnlib.attention_backward, get_raw=True)
    def _attention_backward_flops(*args, out_val=None, **kwargs) -> int:
        method, q, k, v = _dense_shapes(_BWD_NAMES, args, kwargs)
        return sdpa_backward_flop_count((*q[:3], v[3]), q, k, v) if method in DENSE_PRODUCT_METHODS else 0


_register_flop_formulas()

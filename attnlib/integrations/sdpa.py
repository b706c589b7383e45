"""torch SDPA compatibility: attnlib.scaled_dot_product_attention and patch_sdpa.

The drop-in function keeps torch's exact semantics. Calls attnlib can serve exactly (no mask or,
for method flash, a key mask of shape (B or 1, Hq or 1, 1, Sk) without is_causal; no dropout; causal
only with equal lengths because torch's is_causal is top-left aligned; 4-D inputs, a finite
positive scale, at least one head) go through the dispatcher; every other
call goes to torch's own kernel (the builtin, never a patched function), with the reason logged
once at INFO. So whatever torch computes is computed, and whatever torch refuses raises torch's
error. One exception: keys and values of different sequence lengths raise attnlib's ValueError
(torch's CPU flash kernel returns an answer for them instead of refusing). Under torch.autocast
the inputs are cast as autocast casts them for torch's SDPA (so the output has torch's dtype);
calls under torch.func transforms or forward-mode AD, on tensor subclasses with their own
__torch_function__ or under a TorchFunctionMode (the device context aside), and calls of a
forward-only method (sage) that build a graph go to torch, also when compiled (the fallback's log
is skipped while tracing: dynamo cannot trace logging). patch_sdpa contexts may end in any order.
torch's SDPA backend selection is honoured: attnlib stands in for torch's fused kernels, so a call
for which the user switched every fused backend of its device off goes to torch, which then runs
its math path (double backward, the reference numerics, debugging) or raises its "no available
kernel" error. The fused backends are flash on the CPU (torch has no other fused CPU kernel) and
flash, memory-efficient and cuDNN elsewhere: ``with torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``
rules them out everywhere, ``torch.backends.cuda.enable_flash_sdp(False)`` alone on the CPU only
(with ``enable_mem_efficient_sdp(False)`` and ``enable_cudnn_sdp(False)`` on a GPU too). While one
of them is on (the default: all are) attnlib serves the call, also for a selection such as
``[FLASH_ATTENTION]`` or ``[EFFICIENT_ATTENTION, MATH]`` on a GPU. The selection wins over
attnlib's extras (method, backend, patch_sdpa's and diffusers.apply's arguments). The flags are
process-wide and read on each call (one C call with the defaults, three at most); under
torch.compile they are read when tracing, as torch's own compiled SDPA reads them: an
``sdpa_kernel`` block inside the compiled function is seen, flags changed after compiling do not
recompile (torch's SDPA's neither).
attnlib's own extras (method, backend, method options) are checked as attnlib's: a bad one
raises, it is never passed on to torch quietly.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _fwAD

from .. import api, dispatch, ops
from ..inputs import is_dtensor, is_real_number, make_inputs, scale_in_range
from ..key_mask import key_only_mask
from ..options import NO_SCALE, check_method_options

log = logging.getLogger("attnlib")

# The builtin itself: never replaced by patching, so fallbacks cannot recurse into attnlib.
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention

# Methods patch_sdpa accepts; approximate ones run only when named.
PATCHABLE_METHODS = ("flash", "sage", "sla", "linear")
# methods with no backward kernel (the drop-in hands their graph-building calls to torch)
FORWARD_ONLY = ("sage",)
_logged_reasons: set[str] = set()


def _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     method) -> str | None:
    """Why torch's own kernel must serve this call, or None when attnlib can serve it exactly.

    Runs under torch.compile too (no tensor data read, no exceptions)."""
    ts = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in ts):
        return "inputs are not tensors"
    if any(t.is_nested for t in ts):
        return "nested tensors"
    if not torch.compiler.is_compiling():
        # a tensor subclass or a TorchFunctionMode may override SDPA itself: torch's builtin lets
        # it (attnlib's op would compute plain attention past it)
        if _overriding_subclass(ts):
            return "a tensor subclass with __torch_function__"
        if _distributed_tensor(ts):
            return "DTensor inputs (torch's SDPA has sharding rules; attnlib's op has none)"
        if _overriding_function_mode():
            return "a TorchFunctionMode is active"
        # attnlib's op has no functorch rules (torch.func.grad/vjp raise, jvp gives a zero tangent,
        # vmap loops per sample) and no forward-mode derivative; torch's SDPA has its own
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
            return "a torch.func transform (vmap, grad, vjp, jvp, ...)"
        if _fwAD._current_level >= 0 and any(_fwAD.unpack_dual(t).tangent is not None for t in ts):
            return "forward-mode AD (dual tensors)"
    if _fused_sdpa_disabled(query):
        return "torch's SDPA backend selection (sdpa_kernel / enable_*_sdp) switched its fused kernels off"
    if not all(t.dim() == 4 for t in ts):
        return "inputs are not 4-D (batch, heads, seq, head_dim)"
    if attn_mask is not None:
        why = _mask_reason(attn_mask, query, key, is_causal, method)
        if why is not None:
            return why
    if not is_real_number(dropout_p):
        return f"dropout_p of type {type(dropout_p).__name__}"
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if dropout_p != 0.0:
        return "dropout_p < 0 or NaN"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "is_causal or enable_gqa not a bool"
    if scale is not None:
        if method in NO_SCALE:
            return f"an explicit scale (method {method!r} has no softmax scale)"
        if not is_real_number(scale):
            return f"scale of type {type(scale).__name__}"
        if not scale_in_range(float(scale)):
            return "scale not finite, positive and within the kernels' float32 range"
    if is_causal and query.shape[-2] != key.shape[-2]:
        return "is_causal with seq_q != seq_k (torch aligns top-left, attnlib bottom-right)"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "different query and key/value heads without enable_gqa"
    if query.shape[:1] != key.shape[:1] or key.shape[:3] != value.shape[:3]:
        return "shapes torch would broadcast or reject"
    if query.shape[1] == 0 or key.shape[1] == 0:
        return "zero heads"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads not a multiple of key/value heads"
    if query.shape[-1] == 0:
        return "zero head_dim"
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        return "q, k and v differ in dtype or device (torch's error)"
    if method in FORWARD_ONLY and torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return f"an input requires grad and method {method!r} is forward-only"
    return None


def _mask_reason(attn_mask, query, key, is_causal, method) -> str | None:
    """Why attnlib cannot serve this attn_mask (None: it is a key mask, attnlib/key_mask.py)."""
    if method != "flash":
        return f"an explicit attn_mask (method {method!r} takes none; flash takes key masks)"
    if not isinstance(attn_mask, torch.Tensor):
        return "an attn_mask that is not a tensor"
    if is_causal:
        return "attn_mask with is_causal (torch's error)"
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        return "a floating attn_mask of another dtype than the query's (torch's rule, or autocast's cast)"
    if attn_mask.device != query.device or attn_mask.requires_grad:
        return "an attn_mask on another device or requiring grad"
    if query.dim() != 4 or key_only_mask(attn_mask, query.shape[0], query.shape[1], key.shape[2]) is None:
        return "an attn_mask that is not a key mask of shape (batch or 1, heads or 1, 1, seq_k)"
    return None


def _fused_sdpa_disabled(query: torch.Tensor) -> bool:
    """Whether the user's torch SDPA backend selection rules out every fused kernel torch has for
    the query's device: flash on the CPU; flash, memory-efficient and cuDNN elsewhere (see the
    module docstring). Reads torch's global flags directly (about 20 ns each; dynamo folds them to
    constants); with the default flags it is one call."""
    if torch._C._get_flash_sdp_enabled():
        return False
    return query.device.type == "cpu" or not (torch._C._get_mem_efficient_sdp_enabled()
                                              or torch._C._get_cudnn_sdp_enabled())


def _overriding_subclass(ts) -> bool:
    """Whether a tensor of ts is a subclass with its own __torch_function__ (nn.Parameter and
    FakeTensor have it disabled). has_torch_function would also answer True for any active
    function mode, the device context included."""
    if not torch.overrides.has_torch_function(ts):
        return False
    return any(type(a) is not torch.Tensor for a in torch.overrides._get_overloaded_args(ts))


def _distributed_tensor(ts) -> bool:
    """Whether a tensor of ts is a DTensor."""
    return any(is_dtensor(t) for t in ts)


def _overriding_function_mode() -> bool:
    """Whether a TorchFunctionMode other than torch's device context (``with torch.device(...)``,
    which changes only factory functions' default device) is active."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    from torch.utils._device import DeviceContext
    return any(not isinstance(m, DeviceContext) for m in torch.overrides._get_current_function_mode_stack())


def _autocast_inputs(query, key, value):
    """q, k, v as torch's autocast hands them to its SDPA: under torch.autocast for the query's
    device, every floating-point tensor on that device except float64 is cast to the autocast
    dtype (SDPA is on autocast's lower-precision list, CPU and CUDA), so the result has the dtype
    torch's would have. attnlib's op itself keeps its inputs' dtype (and runs its kernels with
    autocast off)."""
    if not isinstance(query, torch.Tensor):
        return query, key, value
    dev = query.device.type
    if not ops.autocast_enabled(dev):
        return query, key, value
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == dev
                 and t.dtype != torch.float64 else t for t in (query, key, value))


def _log_fallback(reason: str, target: str = "torch") -> None:
    if torch.compiler.is_compiling():  # dynamo cannot trace logging (fullgraph would fail on it)
        return
    key = f"{target}: {reason}"
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        log.info("attnlib: scaled_dot_product_attention -> %s (%s)", target, reason)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, method: str = "flash", backend: str = "auto",
                                 **method_options: Any):
    """torch.nn.functional.scaled_dot_product_attention with attnlib kernels where they apply.

    method/backend/method_options are attnlib's extras (keyword-only); with the defaults the
    result equals torch's up to the kernels' rounding. A call attnlib cannot serve exactly
    (see the module docstring) runs torch's own kernel; bad extras raise.
    """
    if not torch.compiler.is_compiling():  # under compile the op's fake implementation checks
        dispatch.check_method(method)
        dispatch.check_backend(backend)
        check_method_options(method, method_options)
    return _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, method, backend,
                  method_options)


def _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, method: str, backend: str,
           method_options: dict[str, Any], fallback: Callable | None = None, fallback_name: str = "torch"):
    """attnlib for what it serves exactly, else ``fallback`` (torch's builtin by default, same
    arguments); method, backend and the options' tensor-free checks were done by the caller."""
    original = (query, key, value)  # what a fallback gets: torch's (or diffusers') autocast casts them itself
    query, key, value = _autocast_inputs(query, key, value)
    reason = _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, method)
    if reason is None and attn_mask is not None:
        if "key_mask" in method_options:
            reason = "an attn_mask beside the key_mask option"
        else:  # a key mask (_mask_reason): flash's option
            method_options = dict(method_options, key_mask=key_only_mask(attn_mask, *query.shape[:2],
                                                                                   key.shape[2]))
    if reason is None:
        scale = None if scale is None else float(scale)  # NumPy scalars: a Python float for the op
        call = dict(method=method, backend=backend, causal=is_causal, scale=scale, **method_options)
        if torch.compiler.is_compiling():
            return api.attention(query, key, value, **call)
        try:  # anything else attnlib's input checks refuse (dtypes, devices, ...) is torch's to judge
            inp = make_inputs(query, key, value, method=method, causal=is_causal, scale=scale)
        except (TypeError, ValueError) as e:
            reason = f"attnlib refuses the inputs: {e}"
        else:  # option errors (a projection of the wrong shape) are attnlib's: they raise
            api.with_options(inp, method_options)
            if dispatch.effective_backend(backend) != "auto" or query.is_meta:
                # forced: attnlib's error if none fits; meta tensors: the op's Meta kernel
                return api.attention(query, key, value, **call)
            tensors = ops.call_tensors(query, key, value, method_options)
            needs_grad = ops.builds_graph(tensors)
            object.__setattr__(inp, "grad", needs_grad)  # as the op's _build sets it: selection reads it
            try:
                kernel = dispatch.select(inp, "auto")
            except dispatch.NoKernelError as e:
                reason = "no attnlib kernel fits: " + " ".join(str(e).split())[:300]
            else:
                if not needs_grad and ops.direct_call_ok(tensors):
                    # what api.attention's direct path would do, without validating and selecting
                    # a second time (half of a small call's host time)
                    return _serve_direct(inp, kernel, query)
                return api.attention(query, key, value, **call)
    # only here: a call attnlib serves has passed _fallback_reason's shape check (equal lengths)
    _check_key_value_lengths(key, value)
    _log_fallback(reason, fallback_name)
    query, key, value = original
    if fallback is not None:
        return fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa)


def _check_key_value_lengths(key, value) -> None:
    """Keys and values pair up token by token, so their sequence lengths must agree. torch's
    math kernel refuses a mismatch, but its CPU flash kernel (torch 2.13) returns an answer
    computed over the shorter one, so a call bound for the fallback is refused before it runs."""
    if (isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor) and not key.is_nested
            and not value.is_nested and key.dim() >= 2 and value.dim() >= 2
            and key.shape[-2] != value.shape[-2]):
        raise ValueError(f"key and value must have the same sequence length (dim -2): key has "
                         f"{key.shape[-2]} tokens ({tuple(key.shape)}), value {value.shape[-2]} "
                         f"({tuple(value.shape)})")


def _serve_direct(inp, kernel: dispatch.Kernel, query: torch.Tensor) -> torch.Tensor:
    """An eager call needing no gradient, validated and its kernel selected by _route: run it
    (api.attention's direct path, less its second validation and selection)."""
    return ops.forward_selected(inp, kernel, query, "bhsd", False, placeholder=False)[0]


class patch_sdpa:
    """Route torch.nn.functional.scaled_dot_product_attention through attnlib.

    As a context manager it restores what was there before on exit (exceptions too; nesting
    works); ``install()`` / ``uninstall()`` do the same for process-wide use. Patches may end in
    any order (two threads' contexts, say): the function in place is always the most recently
    installed patch still active, and torch's own once none is.
    """

    _lock = threading.Lock()
    _active: list = []  # installed patches, oldest first (one entry per install)
    _base: Any = None   # what the first active patch replaced

    def __init__(self, method: str = "flash", backend: str = "auto", **method_options: Any) -> None:
        dispatch.check_method(method)
        if method not in PATCHABLE_METHODS:
            raise ValueError(f"patch_sdpa method must be one of {PATCHABLE_METHODS}, got {method!r}")
        dispatch.check_backend(backend)
        check_method_options(method, method_options)  # here, not at the first patched call
        self.method, self.backend, self.method_options = method, backend, dict(method_options)

        def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
            return _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, self.method,
                          self.backend, self.method_options)

        patched.__attnlib_patch__ = self
        patched.__doc__ = TORCH_SDPA.__doc__
        self._fn = patched

    def install(self) -> "patch_sdpa":
        with self._lock:
            active = patch_sdpa._active
            current = torch.nn.functional.scaled_dot_product_attention
            if active and current is not active[-1]._fn:
                raise RuntimeError("scaled_dot_product_attention was replaced by something other than attnlib's "
                                   "patch while one is active; restore it before installing another")
            if not active:
                patch_sdpa._base = current
            active.append(self)
            torch.nn.functional.scaled_dot_product_attention = self._fn
        return self

    def uninstall(self) -> None:
        with self._lock:
            active = patch_sdpa._active
            if self not in active:
                raise RuntimeError("patch_sdpa.uninstall() called without install()")
            if torch.nn.functional.scaled_dot_product_attention is not active[-1]._fn:
                raise RuntimeError("scaled_dot_product_attention was replaced by something other than attnlib's "
                                   "patch after this one was installed; restore it first")
            del active[len(active) - 1 - active[::-1].index(self)]  # this patch's latest install
            torch.nn.functional.scaled_dot_product_attention = active[-1]._fn if active else patch_sdpa._base
            if not active:
                patch_sdpa._base = None

    def __enter__(self) -> "patch_sdpa":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

"""The kernel registry: what each kernel supports (as data), selection, explanation, errors.

A kernel module declares a :class:`Kernel` subclass and calls :func:`register` on an
instance. Selection for ``backend="auto"`` takes the highest-ranked kernel of the method
with no reasons against it (``Kernel.rank``: the priority, or a per-call one); a named backend
goes through the same checks and raises them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

from .inputs import BACKENDS, DTYPE_NAMES, AttentionInputs, check_backend
from .recompute import vjp as func_vjp

log = logging.getLogger("attnlib")

METHODS = ("flash", "sage", "block_sparse", "linear", "sla", "asymrnr")


_INSTALLED: dict[str, bool] = {}


def installed(module: str) -> bool:
    """Whether a top-level package can be imported; asked once per process (importlib's search
    walks sys.path on disk: about 30 us a call, which every dispatch paid before)."""
    found = _INSTALLED.get(module)
    if found is None:
        found = _INSTALLED[module] = importlib.util.find_spec(module) is not None
    return found


class NoKernelError(RuntimeError):
    """No registered kernel can run these inputs; the message lists every reason."""


class Kernel:
    """Base class. Subclasses set the capability attributes and implement ``forward``."""

    name: str = "?"
    method: str = "?"
    backend: str = "?"
    priority: int = 0
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    # head dims: an explicit tuple, plus optionally any multiple of head_dim_multiple up to max
    head_dims: tuple[int, ...] = ()
    head_dim_multiple: int | None = 1
    max_head_dim: int = 1 << 30
    layouts: tuple[str, ...] = ("bhsd", "bshd")
    supports_causal: bool = True
    supports_gqa: bool = True
    supports_backward: bool = True
    supports_lse: bool = True
    # whether lse comes at no cost beside the output (a kernel writing its row statistics): the op
    # then always asks for it; otherwise only when the caller or a backward reads it (AsymRnR's
    # inner attention, asked for lse, cannot run on torch SDPA, which returns none)
    lse_is_free: bool = True
    # for AUX_LSE methods: forward returns (out, lse of its softmax part) when inp.requires_grad,
    # and backward reads that lse
    keeps_lse_for_backward: bool = False
    supports_seq_q_ne_seq_k: bool = True
    needs_unit_last_stride: bool = False
    same_head_dim_v: bool = False  # v's head dim must equal q/k's
    min_compute_capability: tuple[int, int] | None = None
    requires: tuple[str, ...] = ()  # importable modules this kernel needs
    interpret_ok: bool = False  # runs on CPU tensors under TRITON_INTERPRET=1
    # keyword options this kernel understands (beyond the common ones)
    options: tuple[str, ...] = ()

    # -- install-level availability --------------------------------------------------
    def unavailable_reasons(self) -> list[str]:
        reasons = []
        for mod in self.requires:
            if not installed(mod):
                reasons.append(f"needs the '{mod}' package, which is not installed")
        return reasons

    def machine_reasons(self) -> list[str]:
        """Why no call could run this kernel on this machine now, beyond missing packages (which
        unavailable_reasons gives): for available_kernels(), so its list agrees with what calls
        are refused. Per-call checks say the same thing in their own words."""
        return []

    # -- per-call support --------------------------------------------------------------
    def head_dim_ok(self, d: int) -> bool:
        if d in self.head_dims:
            return True
        m = self.head_dim_multiple
        return m is not None and d % m == 0 and 0 < d <= self.max_head_dim

    def head_dim_text(self) -> str:
        parts = [str(d) for d in self.head_dims]
        if self.head_dim_multiple is not None:
            parts.append(f"multiples of {self.head_dim_multiple} up to {self.max_head_dim}")
        return ", ".join(parts)

    def rank(self, inp: AttentionInputs) -> int:
        """This kernel's place for one call (higher is tried first); the static priority unless
        a kernel knows it is faster or slower for some inputs (FlashSDPA)."""
        return self.priority

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        r = list(self.unavailable_reasons())
        dev = inp.device.type
        if dev == "cpu" and self.interpret_ok and "cpu" not in self.devices:
            if os.environ.get("TRITON_INTERPRET") != "1":
                r.append("CPU tensors run only under TRITON_INTERPRET=1 for this kernel")
        elif dev not in self.devices:
            r.append(f"device {dev} not supported (supports {', '.join(self.devices)})")
        if dev == "cuda" and self.min_compute_capability is not None:
            cc = torch.cuda.get_device_capability(inp.device)
            if cc < self.min_compute_capability:
                need = "sm_%d%d" % self.min_compute_capability
                r.append(f"needs compute capability {need} or newer, device has sm_{cc[0]}{cc[1]}")
        if inp.dtype not in self.dtypes:
            names = ", ".join(DTYPE_NAMES[d] for d in self.dtypes)
            r.append(f"dtype {DTYPE_NAMES.get(inp.dtype, inp.dtype)} not supported (supports {names})")
        for hd_name, d in (("head_dim", inp.head_dim), ("value head_dim", inp.head_dim_v)):
            if not self.head_dim_ok(d):
                r.append(f"{hd_name} {d} not supported (supports {self.head_dim_text()})")
        if self.same_head_dim_v and inp.head_dim_v != inp.head_dim:
            r.append(f"value head_dim {inp.head_dim_v} differs from query/key head_dim {inp.head_dim} "
                     "(this kernel needs them equal)")
        if inp.layout not in self.layouts:
            r.append(f"layout {inp.layout} not supported")
        if inp.causal and not self.supports_causal:
            r.append("causal=True not supported")
        if inp.is_gqa and not self.supports_gqa:
            r.append(f"GQA/MQA ({inp.heads_q} query heads, {inp.heads_kv} kv heads) not supported")
        if inp.requires_grad and not self.supports_backward:
            r.append("inputs require grad but this kernel has no backward pass")
        if inp.return_lse and not self.supports_lse:
            r.append("return_lse=True not supported")
        if inp.seq_q != inp.seq_k and not self.supports_seq_q_ne_seq_k:
            r.append(f"seq_q ({inp.seq_q}) != seq_k ({inp.seq_k}) not supported")
        if self.needs_unit_last_stride:
            for n, t in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
                if t.shape[-1] > 1 and t.stride(-1) != 1:
                    r.append(f"{n} has last-dim stride {t.stride(-1)} (needs 1; call .contiguous())")
        r.extend(self.extra_reasons(inp))
        return r

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        """Kernel-specific reasons; override."""
        return []

    def supports(self, inp: AttentionInputs) -> bool:
        return not self.not_supported_reasons(inp)

    # -- running -----------------------------------------------------------------------
    def forward(self, inp: AttentionInputs):
        """Return the bhsd output, or (output, lse) when inp.return_lse."""
        raise NotImplementedError

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        """Gradients (dq, dk, dv, d proj_weight, d proj_bias) for bhsd out/dout; None where unused.

        The default recomputes this kernel's forward under autograd, which serves every kernel
        made of differentiable torch operations; fused kernels override it.
        """
        opts = dict(inp.options)
        extra = [n for n in ("proj_weight", "proj_bias") if opts.get(n) is not None]
        with_lse = dlse is not None and self.supports_lse

        def f(q, k, v, *proj):
            o = dict(opts, **dict(zip(extra, proj)))
            res = self.forward(replace(inp, q=q, k=k, v=v, options=o, return_lse=with_lse, grad=True))
            return tuple(res) if with_lse else (res,)

        # torch.func.vjp, not torch.autograd: this runs inside a custom op, where autograd is off
        # (recompute.vjp: also from a TorchDispatchMode's handler)
        outs, vjp = func_vjp(f, inp.q, inp.k, inp.v, *(opts[n] for n in extra))
        cot = (dout.to(outs[0].dtype), dlse.to(outs[1].dtype)) if with_lse else (dout.to(outs[0].dtype),)
        grads = vjp(cot)
        proj = {n: g for n, g in zip(extra, grads[3:])}
        return (grads[0], grads[1], grads[2], proj.get("proj_weight"), proj.get("proj_bias"))

    def __repr__(self) -> str:
        return f"<Kernel {self.name} method={self.method} backend={self.backend} priority={self.priority}>"


# ----------------------------------------------------------------------------------------
_REGISTRY: dict[str, list[Kernel]] = {}
_LOADERS: list[str] = []
_loaded = False
_lock = threading.RLock()
_logged: set[tuple[str, str]] = set()
_override = threading.local()


def register(kernel: Kernel) -> Kernel:
    with _lock:
        lst = _REGISTRY.setdefault(kernel.method, [])
        if any(k.name == kernel.name for k in lst):
            raise ValueError(f"kernel {kernel.name!r} registered twice")
        lst.append(kernel)
        lst.sort(key=lambda k: -k.priority)
    return kernel


def register_module(module_name: str) -> None:
    """Name a module whose import registers kernels; imported lazily on first dispatch."""
    _LOADERS.append(module_name)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for mod in _LOADERS:
            importlib.import_module(mod)
        _loaded = True


def kernels(method: str | None = None) -> list[Kernel]:
    _ensure_loaded()
    if method is None:
        return [k for m in _REGISTRY for k in _REGISTRY[m]]
    return list(_REGISTRY.get(method, []))


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Override backend="auto" within this block (this thread)."""
    check_backend(backend)
    prev = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = prev


def effective_backend(backend: str) -> str:
    check_backend(backend)
    if backend != "auto":
        return backend
    ctx = getattr(_override, "backend", None)
    if ctx is not None:
        return ctx
    env = os.environ.get("ATTNLIB_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable ATTNLIB_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return "auto"


@dataclass
class Explanation:
    """The dispatcher's decision for one call, without running it."""

    inputs: AttentionInputs
    backend: str
    chosen: Kernel | None
    rejected: list[tuple[Kernel, list[str]]]

    def __str__(self) -> str:
        lines = [f"attnlib dispatch for backend={self.backend!r}:", self.inputs.describe()]
        lines.append(f"chosen: {self.chosen.name if self.chosen else 'none'}")
        for k, reasons in self.rejected:
            lines.append(f"  rejected {k.name} ({k.backend}):")
            lines.extend(f"    - {r}" for r in reasons)
        return "\n".join(lines)

    @property
    def reasons(self) -> dict[str, list[str]]:
        return {k.name: r for k, r in self.rejected}


def _ranked(inp: AttentionInputs, backend: str = "auto") -> list[Kernel]:
    """The method's kernels of the backend (all for "auto") in the order a call tries them (stable:
    ties keep priority order). Only those are ranked: a rank may ask torch (FlashSDPA's)."""
    return sorted((k for k in kernels(inp.method) if backend == "auto" or k.backend == backend),
                  key=lambda k: -k.rank(inp))


def explain(inp: AttentionInputs, backend: str = "auto") -> Explanation:
    backend = effective_backend(backend)
    chosen = None
    rejected = []
    cands = _ranked(inp, backend)
    for k in cands:
        reasons = k.not_supported_reasons(inp)
        if reasons:
            rejected.append((k, reasons))
        elif chosen is None:
            chosen = k
    if backend != "auto" and not cands:
        rejected.append((_Placeholder(inp.method, backend), [f"no {backend} kernel registered for {inp.method}"]))
    return Explanation(inp, backend, chosen, rejected)


class _Placeholder(Kernel):
    def __init__(self, method: str, backend: str) -> None:
        self.method, self.backend, self.name = method, backend, f"{method}-{backend}"


def _hint(ex: Explanation) -> str:
    text = " ".join(r for _, rs in ex.rejected for r in rs)
    hints = []
    if "stride" in text:
        hints.append("call .contiguous() on the inputs")
    if "TRITON_INTERPRET" in text:
        hints.append("use backend='torch' on CPU, or set TRITON_INTERPRET=1 to run Triton kernels on CPU")
    if "dtype fp64" in text:
        hints.append("fp64 runs only on the torch backend")
    if "no backward pass" in text and ex.inputs.method == "sage":
        hints.append("sage is forward-only (INT8 rounding has no useful gradient): use "
                     "attnlib.flash_attention for a differentiable attention, or call sage under torch.no_grad()")
    if "not installed" in text:
        hints.append("pip install 'attnlib[cuda]' for the CUDA kernels")
    return ("\nhint: " + "; ".join(hints)) if hints else ""


def select(inp: AttentionInputs, backend: str = "auto") -> Kernel:
    """The kernel explain() would choose. Only the kernels ranked above it are checked: the
    others' reasons are formed (by explain) only for the error when none can run."""
    wanted = effective_backend(backend)
    chosen = None
    for k in _ranked(inp, wanted):
        if not k.not_supported_reasons(inp):
            chosen = k
            break
    if chosen is None:
        ex = explain(inp, backend)
        raise NoKernelError(f"no attnlib kernel can run this call.\n{ex}{_hint(ex)}")
    key = (inp.method, chosen.name)
    if key not in _logged:
        _logged.add(key)
        log.info("attnlib: %s -> %s (%s, %s, hd%d)", inp.method, chosen.name, inp.layout,
                 inp.dtype_name, inp.head_dim)
    return chosen


def run(inp: AttentionInputs, backend: str = "auto"):
    return select(inp, backend).forward(inp)


def available_kernels() -> list[dict[str, Any]]:
    """Every registered kernel: method, backend, priority, available or why not."""
    out = []
    for k in kernels():
        reasons = k.unavailable_reasons()
        if not reasons:
            reasons = k.machine_reasons()
        out.append({
            "name": k.name, "method": k.method, "backend": k.backend, "priority": k.priority,
            "available": not reasons, "reasons": reasons,
        })
    return out

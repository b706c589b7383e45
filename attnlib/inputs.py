"""One dataclass for an attention call's inputs: validation, layout and GQA normalisation.

Everything below the public API sees tensors in the (batch, heads, seq, head_dim) view,
whatever layout the caller used: a "bshd" tensor is viewed through ``transpose(1, 2)``,
never copied. Kernels allocate their output with :meth:`AttentionInputs.new_output`, which
lays the memory out in the caller's layout and returns the bhsd view of it.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

try:  # a NumPy scalar is a valid scale or option; torch runs without NumPy too
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

LAYOUTS = ("bhsd", "bshd")
BACKENDS = ("auto", "cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


def _require_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dense(name: str, x: torch.Tensor) -> torch.Tensor:
    """A strided tensor: sparse, MKL-DNN and nested (jagged) tensors have no strides or storage the
    kernels can read (they failed deep inside a kernel or the op with torch's NotImplementedError)."""
    if x.layout != torch.strided or x.is_nested:
        kind = "nested" if x.is_nested else str(x.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor: call .to_dense() "
                        "(or torch.nested.to_padded_tensor; flash_attention_varlen takes packed sequences)")
    if is_dtensor(x):
        raise TypeError(f"{name} is a DTensor (placements {tuple(x.placements)}): attnlib's op has no sharding "
                        "rules; pass each rank's local tensor (.to_local(): attention sharded over batch or "
                        "heads is local), or use attnlib.ulysses_attention / ring_attention for sequence "
                        "shards")
    return x


def is_dtensor(x: Any) -> bool:
    """Whether x is a DTensor (a plain tensor costs a type comparison)."""
    if type(x) is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(x, DTensor)


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def is_real_number(value: Any) -> bool:
    """A Python or NumPy real scalar (int, float, np.float32, ...); not a bool, tensor or array."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain_number(value: Any, traced_float: bool = True) -> Any:
    """A NumPy scalar as the Python number it holds, anything else unchanged: users pass np.float32
    scales and epsilons read from configs. Eagerly .item() keeps the scalar's own kind for
    validation to judge. Under torch.compile dynamo traces a NumPy scalar as a 0-d array, which
    the op's float arguments refuse; float() of it traces (traced_float: the argument is a float;
    int() of a traced array does not trace, so an int argument stays as given and fails there).
    A NumPy scalar that torch.compile makes a graph input (a function argument, an np.float32
    module attribute) still fails while tracing, as it does for torch's own
    scaled_dot_product_attention: its value is unknown there."""
    if np is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, (np.generic, np.ndarray)):
        return value
    if not torch.compiler.is_compiling():
        return value.item() if isinstance(value, np.generic) else value
    return float(value) if traced_float else value


def check_fraction(name: str, value: Any) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 1.18e-38
# the largest scale: the kernels pass scale * log2(e) as a float32 (base-2 softmax), which must
# stay finite (from 2.36e38 on it rounds to inf, and a masked score -inf * inf is NaN)
SCALE_MAX = FLOAT32_MAX / math.log2(math.e)


def scale_in_range(scale: float) -> bool:
    """The kernels' rule for a real scale: finite, at least float32's smallest normal and at most
    SCALE_MAX (the integrations ask it without raising; check_scale says which end it missed)."""
    return math.isfinite(scale) and FLOAT32_TINY <= scale <= SCALE_MAX


def check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not is_real_number(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale_in_range(scale):
        return scale
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")
    if scale > SCALE_MAX:  # the kernels scale scores in float32: it would overflow to inf, then NaN
        raise ValueError(f"scale must fit in float32 once multiplied by log2(e) (at most {SCALE_MAX:.4g}), "
                         f"got {scale}")
    # below: float32 rounds it to 0 (or a denormal), and a masked score -inf * 0 is NaN
    raise ValueError(f"scale must be at least the smallest normal float32 ({FLOAT32_TINY:.4g}), got {scale}")


def type_name(x: Any) -> str:
    """x's type for an error message, with its module where it is not a builtin: NumPy 2 names
    its bool type "bool", so "must be a bool, got bool" said nothing; "numpy.bool" does."""
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_block_size(block_size: Any) -> tuple[int, int]:
    """(block_q, block_k) as Python ints. Any integral number is taken, NumPy's included (the op's
    argument conversion turns them into ints); a bool or float element is a TypeError, a value that
    is not a pair of positive numbers a ValueError, both naming block_size."""
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise ValueError(f"block_size must be a pair of positive ints (block_q, block_k), got {block_size!r}")
    for b in block_size:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):  # np.bool_ is not Integral
            raise TypeError(f"block_size must be a pair of positive ints (block_q, block_k), got "
                            f"{block_size!r} (a {type(b).__name__} is not an int)")
    bq, bk = operator.index(block_size[0]), operator.index(block_size[1])
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block_size must be a pair of positive ints (block_q, block_k), got {block_size!r}")
    return bq, bk


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy of it when its last dim is strided (a transposed or a [..., ::2]
    view): the fused kernels load head-dim rows as unit-stride vectors, and flash_attn's
    interface copies such inputs the same way, where refusing them would send the call to the
    slow torch kernels. Autograd passes the copy's gradient back to x."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x  # (anything else is for the caller's checks to refuse)
    return x.contiguous()


@dataclass(frozen=True)
class AttentionInputs:
    """A validated attention call. q, k, v are bhsd views of the caller's tensors (contiguous
    copies of those whose last dim is strided: see unit_last_stride)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    method: str
    layout: str = "bhsd"
    causal: bool = False
    scale: float = 1.0
    return_lse: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    # whether a backward pass will follow; None = decide from the tensors and grad mode. Set
    # explicitly inside custom ops, where grad mode is off while the forward runs.
    grad: bool | None = None

    # -- shape facts ---------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def seq_q(self) -> int:
        return self.q.shape[2]

    @property
    def seq_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def requires_grad(self) -> bool:
        if self.grad is not None:
            return self.grad
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))

    def new_output(self, head_dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Empty output in the caller's layout, returned as a bhsd view."""
        d = self.head_dim_v if head_dim is None else head_dim
        dt = self.dtype if dtype is None else dtype
        b, h, s = self.batch, self.heads_q, self.seq_q
        if self.layout == "bhsd":
            return torch.empty(b, h, s, d, dtype=dt, device=self.device)
        return torch.empty(b, s, h, d, dtype=dt, device=self.device).transpose(1, 2)

    def describe(self) -> str:
        def one(name: str, t: torch.Tensor) -> str:
            return (f"  {name}: shape(bhsd view)={tuple(t.shape)} dtype={t.dtype} "
                    f"stride={tuple(t.stride())} device={t.device}")

        lines = [
            f"method={self.method} layout={self.layout} causal={self.causal} "
            f"scale={self.scale:.6g} return_lse={self.return_lse} grad={self.requires_grad}",
            one("q", self.q), one("k", self.k), one("v", self.v),
        ]
        if self.options:
            opts = ", ".join(f"{k}={_short(v)}" for k, v in self.options.items())
            lines.append(f"  options: {opts}")
        return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor{tuple(v.shape)}:{v.dtype}"
    return repr(v)


def validate_qkv(q: Any, k: Any, v: Any, layout: str, *, same_head_dim_v: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check rank, shapes, dtypes and devices; return bhsd views."""
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    layout = check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dense(name, t)
        if t.dim() != 4:
            dims = "(batch, heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    qb, kb, vb = to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout)
    if not (qb.shape[0] == kb.shape[0] == vb.shape[0]):
        raise ValueError(f"batch sizes differ: q={qb.shape[0]}, k={kb.shape[0]}, v={vb.shape[0]}")
    if kb.shape[1] != vb.shape[1] or kb.shape[2] != vb.shape[2]:
        raise ValueError(
            f"k and v must agree on heads and seq: k (heads={kb.shape[1]}, seq={kb.shape[2]}), "
            f"v (heads={vb.shape[1]}, seq={vb.shape[2]})")
    if qb.shape[3] != kb.shape[3]:
        raise ValueError(f"q and k must share head_dim, got q={qb.shape[3]}, k={kb.shape[3]}")
    if same_head_dim_v and vb.shape[3] != qb.shape[3]:
        raise ValueError(f"v must have the head_dim of q ({qb.shape[3]}), got {vb.shape[3]}")
    if qb.shape[3] == 0:
        raise ValueError("q and k must have a positive head_dim, got 0")
    if vb.shape[3] == 0:  # no kernel takes it (it reached dispatch as a NoKernelError)
        raise ValueError(f"v must have a positive head_dim, got 0 (v shape {tuple(v.shape)})")
    if kb.shape[1] == 0:
        raise ValueError(f"k and v must have at least one head, got {tuple(k.shape)} for layout={layout!r}")
    if qb.shape[1] % kb.shape[1] != 0:
        raise ValueError(
            f"query heads ({qb.shape[1]}) must be a multiple of key/value heads ({kb.shape[1]}) for GQA/MQA")
    return qb, kb, vb


def make_inputs(q, k, v, *, method: str, layout: str = "bhsd", causal: bool = False, scale=None,
                return_lse: bool = False, options: Mapping[str, Any] | None = None,
                same_head_dim_v: bool = False) -> AttentionInputs:
    qb, kb, vb = validate_qkv(q, k, v, layout, same_head_dim_v=same_head_dim_v)
    qb, kb, vb = unit_last_stride(qb), unit_last_stride(kb), unit_last_stride(vb)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type_name(causal)}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type_name(return_lse)}")
    return AttentionInputs(
        q=qb, k=kb, v=vb, method=method, layout=layout, causal=causal,
        scale=check_scale(scale, qb.shape[3]), return_lse=return_lse, options=dict(options or {}),
    )

"""Per-method keyword options: names, defaults and validation against the call's inputs."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .asymrnr.config import DISPATCH_OPTIONS as _ASYMRNR_OPTIONS, check_call as _check_asymrnr_call, check_grid_option
from .block_mask import flex_block_mask_hint
from .inputs import AttentionInputs, check_block_size, check_fraction, is_real_number
from .key_mask import check_key_mask
from .reference._common import check_block_mask_shape

FEATURE_MAPS = ("elu", "relu", "softmax", "identity")
_REQUIRED = object()


def check_feature_map(v: Any) -> str:
    """A feature map's name (attention()'s option and SparseLinearAttention's argument)."""
    if not isinstance(v, str):  # before `in`: an array compared with the names raised NumPy's ambiguity error
        raise TypeError(f"feature_map must be a str, one of {FEATURE_MAPS}, got {type(v).__name__}")
    if v not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {v!r}")
    return v


def _feature_map(v: Any, inp: AttentionInputs) -> str:
    return check_feature_map(v)


def _bool(name: str) -> Callable[[Any, AttentionInputs], bool]:
    def check(v: Any, inp: AttentionInputs) -> bool:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        return v
    return check


SAGE_QK_GRANULARITIES = ("per_block", "per_warp")
SAGE_PV_MODES = ("fp16", "fp16_accum", "fp8")


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[Any, AttentionInputs], str]:
    def check(v: Any, inp: AttentionInputs) -> str:
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str, one of {allowed}, got {type(v).__name__}")
        if v not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
        return v
    return check


def _eps(v: Any, inp: AttentionInputs) -> float:
    if not is_real_number(v):  # NumPy scalars too, as the fractions take them
        raise TypeError(f"eps must be a finite number >= 0, got {type(v).__name__}")
    if not math.isfinite(float(v)) or v < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {v!r}")
    return float(v)


def _block_size(v: Any, inp: AttentionInputs) -> tuple[int, int]:
    return check_block_size(v)


def _fraction(name: str) -> Callable[[Any, AttentionInputs], float]:
    return lambda v, inp: check_fraction(name, v)


def check_block_mask(mask: Any, inp: AttentionInputs, block_size: tuple[int, int]) -> torch.Tensor:
    """The canonical bool block mask (B or 1, H or 1, ceil(Sq/bq), ceil(Sk/bk)) on the inputs' device."""
    check_block_mask_shape(mask, inp.batch, inp.heads_q, inp.seq_q, inp.seq_k, block_size,
                           hint=flex_block_mask_hint(mask) if not isinstance(mask, torch.Tensor) else "")
    if mask.device != inp.device:
        raise ValueError(f"block_mask must be on {inp.device}, got {mask.device}")
    return mask


def _proj(name: str, ndim: int) -> Callable[[Any, AttentionInputs], Any]:
    def check(v: Any, inp: AttentionInputs):
        if v is None:
            return None
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
        d = inp.head_dim_v
        want = (d, d) if ndim == 2 else (d,)
        if tuple(v.shape) != want:
            raise ValueError(f"{name} must have shape {want} (value head_dim {d}), got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {v.dtype}")
        if v.device != inp.device:
            raise ValueError(f"{name} must be on {inp.device}, got {v.device}")
        return v
    return check


# method -> {option: (default, validator)}
METHOD_OPTIONS: dict[str, dict[str, tuple[Any, Callable[[Any, AttentionInputs], Any]]]] = {
    "flash": {"deterministic": (True, _bool("deterministic")), "key_mask": (None, check_key_mask)},
    "sage": {
        "smooth_k": (True, _bool("smooth_k")),
        "qk_granularity": ("per_block", _choice("qk_granularity", SAGE_QK_GRANULARITIES)),
        "pv": ("fp16", _choice("pv", SAGE_PV_MODES)),
    },
    "block_sparse": {
        "block_mask": (_REQUIRED, None),  # checked with block_size below
        "block_size": ((64, 64), _block_size),
    },
    "linear": {"feature_map": ("elu", _feature_map), "eps": (1e-6, _eps)},
    "sla": {
        "proj_weight": (None, _proj("proj_weight", 2)),
        "proj_bias": (None, _proj("proj_bias", 1)),
        "critical": (0.05, _fraction("critical")),
        "negligible": (0.10, _fraction("negligible")),
        "block_size": ((64, 64), _block_size),
        "feature_map": ("softmax", _feature_map),
    },
    "asymrnr": {"grid": (_REQUIRED, check_grid_option), **_ASYMRNR_OPTIONS},
}

# How each option travels through the attnlib::attention custom op: its schema type and the
# placeholder sent when the called method does not use it. Tensor options are "Tensor?" with
# placeholder None. A new option is one line here plus its METHOD_OPTIONS entry.
OP_OPTION_TYPES: dict[str, tuple[str, Any]] = {
    "block_mask": ("Tensor?", None),
    "key_mask": ("Tensor?", None),
    "proj_weight": ("Tensor?", None),
    "proj_bias": ("Tensor?", None),
    "smooth_k": ("bool", True),
    "qk_granularity": ("str", "per_block"),
    "pv": ("str", "fp16"),
    "feature_map": ("str", "elu"),
    "eps": ("float", 1e-6),
    "critical": ("float", 0.0),
    "negligible": ("float", 0.0),
    "block_size": ("int[]", (64, 64)),
    "grid": ("int[]", (1, 1, 1)),
    "stride": ("int[]", (2, 2, 2)),
    "q_ratio": ("float", 0.0),
    "kv_ratio": ("float", 0.0),
    "metric": ("str", "euclidean"),
    "mode": ("str", "replace"),
    "text_tokens": ("int", 0),
    "text_side": ("str", "end"),
    "seed": ("int", 0),
    "inner_method": ("str", "flash"),
    "deterministic": ("bool", True),
}
# options whose value is a tuple in Python and a list in the op schema
TUPLE_OPTIONS = ("block_size", "grid", "stride")

# methods whose result has no log-sum-exp / no softmax scale
NO_LSE = ("linear", "sla")
# NO_LSE methods whose kernels may keep a softmax statistic for their own backward (the sparse
# branch's lse for sla): the op carries it in its lse slot when a backward will follow, the public
# API never returns it
AUX_LSE = ("sla",)
NO_SCALE = ("linear",)


def check_option_names(method: str, options: dict[str, Any]) -> None:
    """TypeError for an option the method does not have, or a required one left out. Looks at
    names only: cheap on every call, and under torch.compile too (the op's schema would drop an
    unknown name silently)."""
    spec = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise TypeError(f"unknown option(s) {unknown} for method {method!r} (allowed: {allowed})")
    for name, (default, _check) in spec.items():
        if default is _REQUIRED and name not in options:
            raise TypeError(f"method {method!r} needs the option {name!r}")


def validate_options(method: str, options: dict[str, Any], inp: AttentionInputs) -> dict[str, Any]:
    spec = METHOD_OPTIONS[method]
    check_option_names(method, options)
    out = {}
    for name, (default, check) in spec.items():
        if name not in options:
            out[name] = default
        else:
            out[name] = options[name] if check is None else check(options[name], inp)
    if method == "block_sparse":
        out["block_mask"] = check_block_mask(out["block_mask"], inp, out["block_size"])
    if method == "sla" and out["critical"] + out["negligible"] > 1.0:
        raise ValueError(f"critical + negligible must not exceed 1, got {out['critical']} + {out['negligible']}")
    if method == "asymrnr":
        _check_asymrnr_call(out, inp)
    return out


class _NeedsInputs(Exception):
    """Raised by :class:`_NoInputs`: the option's check reads the call's tensors."""


class _NoInputs:
    """Stands in for AttentionInputs when options are checked before any call: a check that
    reads it (a projection's shape or device) can only run per call."""

    def __getattr__(self, name: str):
        raise _NeedsInputs(name)


def check_method_options(method: str, options: dict[str, Any]) -> None:
    """Check a method's option names and values before any call, so patch_sdpa and
    diffusers.apply raise at setup, not at the first call: every check of METHOD_OPTIONS that
    does not read the call's tensors, and the rules across options (sla: critical + negligible
    <= 1). Tensor-dependent checks (sla's proj_weight shape, block_sparse's block_mask shape)
    still run at each call."""
    spec = METHOD_OPTIONS[method]
    no_inputs = _NoInputs()
    deferred = set()
    for name, value in options.items():
        if name not in spec:  # check_option_names names unknown options below
            continue
        check = spec[name][1]
        if check is None:  # checked together with other options and the inputs (block_mask)
            deferred.add(name)
            continue
        try:
            check(value, no_inputs)
        except _NeedsInputs:
            deferred.add(name)
    check_option_names(method, options)
    if any(spec[name][0] is _REQUIRED for name in deferred):
        return  # validate_options would call the deferred required option missing
    try:  # the cross-option rules
        validate_options(method, {n: v for n, v in options.items() if n not in deferred}, no_inputs)
    except _NeedsInputs:
        pass

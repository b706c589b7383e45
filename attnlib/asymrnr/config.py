"""AsymRnR's option checks, shared by the module (AsymRnR) and the dispatcher (options.py).

Each check raises TypeError (wrong kind of value) or ValueError (wrong value) naming the argument.
This module imports nothing heavy: attnlib.options imports it.
"""
from __future__ import annotations

import math
from typing import Any

from ..inputs import check_fraction

METRICS = ("euclidean", "cosine", "dot")
MODES = ("replace", "mean")
TEXT_SIDES = ("start", "end")
INNER_METHODS = ("flash", "sage")  # softmax methods with no required option of their own


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_triple(name: str, v: Any) -> tuple[int, int, int]:
    """Three positive ints (F, H, W)."""
    if not isinstance(v, (tuple, list)) or len(v) != 3 or not all(_is_int(x) for x in v):
        raise TypeError(f"{name} must be three ints (F, H, W), got {v!r}")
    if not all(x > 0 for x in v):
        raise ValueError(f"{name} must be three positive ints (F, H, W), got {tuple(v)}")
    return int(v[0]), int(v[1]), int(v[2])


def check_ratio(name: str, v: Any) -> float:
    """A ratio in [0, 1]: any real number (numpy scalars too), not bool, not NaN."""
    return check_fraction(name, v)


def check_choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def check_count(name: str, v: Any, *, minimum: int = 0) -> int:
    if not _is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def check_seed(v: Any) -> int:
    if not _is_int(v):
        raise TypeError(f"seed must be an int, got {type(v).__name__}")
    if not (0 <= v < 2 ** 63):
        raise ValueError(f"seed must lie in [0, 2**63), got {v}")
    return int(v)


def resolve_text_tokens(text_tokens: Any, text_side: Any = "end") -> tuple[int, str]:
    """(count, side) from None, an int count (placed at text_side), or a slice touching one end:
    slice(0, n) / slice(None, n) = the first n tokens, slice(-n, None) = the last n."""
    check_choice("text_side", text_side, TEXT_SIDES)
    if text_tokens is None:
        return 0, text_side
    if isinstance(text_tokens, slice):
        s = text_tokens
        if s.step not in (None, 1):
            raise ValueError(f"text_tokens slice must have step 1, got {s!r}")
        if s.start in (None, 0) and _is_int(s.stop) and s.stop >= 0:
            return s.stop, "start"
        if _is_int(s.start) and s.start < 0 and s.stop is None:
            return -s.start, "end"
        raise ValueError("text_tokens slice must cover the start (slice(0, n)) or the end (slice(-n, None)) "
                         f"of the sequence, got {s!r}")
    return check_count("text_tokens", text_tokens), text_side


def check_sequence(grid: tuple[int, int, int], text_tokens: int, seq_len: int, what: str = "the sequence") -> None:
    n = math.prod(grid)
    if n + text_tokens != seq_len:
        raise ValueError(f"grid {tuple(grid)} gives {n} video tokens + text_tokens {text_tokens} = "
                         f"{n + text_tokens}, but {what} has {seq_len} tokens")


def removed_count(n_video: int, n_dst: int, ratio: float) -> int:
    """Sources removed at this ratio: reduced video length = max(n_dst, floor(N (1 - r)))."""
    # the small slack keeps floor(10 * (1 - 0.3)) at 7 despite binary rounding
    kept = max(n_dst, math.floor(n_video * (1.0 - ratio) + 1e-7))
    return n_video - min(kept, n_video)


# ---- through the dispatcher: attnlib.attention(..., method="asymrnr", grid=..., ...) ----------
# option -> (default, check(value, inputs)); "grid" (required) is declared in attnlib.options
def _with_inputs(check):
    return lambda v, inp: check(v)


DISPATCH_OPTIONS = {
    "stride": ((2, 2, 2), _with_inputs(lambda v: check_triple("stride", v))),
    "q_ratio": (0.5, _with_inputs(lambda v: check_ratio("q_ratio", v))),
    "kv_ratio": (0.3, _with_inputs(lambda v: check_ratio("kv_ratio", v))),
    "metric": ("euclidean", _with_inputs(lambda v: check_choice("metric", v, METRICS))),
    "mode": ("replace", _with_inputs(lambda v: check_choice("mode", v, MODES))),
    "text_tokens": (0, _with_inputs(lambda v: check_count("text_tokens", v))),
    "text_side": ("end", _with_inputs(lambda v: check_choice("text_side", v, TEXT_SIDES))),
    "seed": (0, _with_inputs(check_seed)),
    "inner_method": ("flash", _with_inputs(lambda v: check_choice("inner_method", v, INNER_METHODS))),
}


def check_grid_option(v: Any, inp) -> tuple[int, int, int]:
    return check_triple("grid", v)


def check_call(opts: dict, inp) -> None:
    """Cross-option checks once every option is validated: the grid and text tokens must tile
    the sequence, which Q and K/V share."""
    if inp.seq_q != inp.seq_k:
        raise ValueError(f"method 'asymrnr' is self-attention over one token grid: q has {inp.seq_q} tokens, "
                         f"k/v {inp.seq_k}")
    check_sequence(opts["grid"], opts["text_tokens"], inp.seq_q, "q")

"""Integer arithmetic for launcher (host) code.

triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.6: called from Python,
each goes through JITCallable.__call__ (its arguments unwrapped from constexpr), about 1.8 us a
call on the CI CPU against 0.02 us for the arithmetic itself, and a launcher computes up to a
dozen per call (the linear forward 17). Kernels keep tl.cdiv and friends; these are for Python.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """triton.cdiv's result: ceil(a / b) for b > 0."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2's result: the smallest power of two >= n (0 for n = 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()

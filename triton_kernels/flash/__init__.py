"""Triton FlashAttention-2 kernels."""

"""Triton kernels, one folder per method; installed as attnlib.triton_kernels."""

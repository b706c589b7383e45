"""Triton block-sparse attention: the flash kernels' main-loop steps, visiting listed blocks only."""

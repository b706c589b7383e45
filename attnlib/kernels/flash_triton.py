"""Method flash on Triton (placeholder until the Triton kernels land)."""

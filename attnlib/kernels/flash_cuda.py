"""Method flash in CUDA C++ (placeholder until the CUDA kernels land)."""

"""attnlib's CUDA C++ sources (package data, compiled at first use by attnlib.cuda; not Python)."""

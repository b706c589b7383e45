"""attnlib's benchmarks: the shared runner (runner.py), one bench_<method>.py per method, and
the GPU script (gpu_check.py). Not part of the installed package; run from the repository."""

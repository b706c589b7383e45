"""Run a gloo job of ``world`` spawned ranks for the multi-process tests (test_distributed*.py,
test_integration_edges.py).

Each rank runs ``worker(rank, world, init_file, out_dir)`` and writes ``out_dir/rank{r}.json``;
:func:`run_job` waits at most ``timeout_s`` seconds, kills the ranks past it, and returns
({rank: results read back}, failure text or None). A rank that died or never wrote its file is
missing from the results, so a test can say which ranks did not report.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

import torch.multiprocessing as mp


def run_job(worker: Callable, world: int, timeout_s: float, prefix: str = "attnlib-sp-") -> tuple[dict, str | None]:
    tmp = tempfile.mkdtemp(prefix=prefix)
    ctx = mp.start_processes(worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=False,
                             start_method="spawn")
    deadline, failure = time.monotonic() + timeout_s, None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                failure = f"job timed out after {timeout_s} s"
                break
    except Exception as e:  # a worker died
        failure = f"job failed: {e}"
    results = {}
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[rank] = json.load(f)
    return results, failure

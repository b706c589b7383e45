"""What attnlib's Python layer does around its kernels, per call, without a GPU.

    TRITON_INTERPRET=1 python bench/host_audit.py

Each public call runs on small CPU tensors with every Triton launch stubbed (the launch is counted,
the kernel does not run), under torch.profiler. Per call it reports the aten ops (on a GPU most
are a kernel launch, about 5-10 us of host time each), the Triton launches, and any op that
synchronises the host with a CUDA device (``.item()``, ``nonzero``, ``masked_select``,
``unique``...): such an op stalls the host on every call and breaks CUDA-graph capture. The
wall time per call is the host's own (stubbed launches cost nothing), so compare it only between
runs on one machine. ``tests/test_host_audit.py`` keeps the sync-free property and op budgets.

The stub leaves outputs unwritten; launches whose output later indexes memory (AsymRnR's match)
get their index output zeroed (STUB_FILLS).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_overhead import us_per_call  # noqa: E402

# aten ops that wait for a CUDA device when their input lives on one
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
                      "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal"})
# kernel name -> positional index of an integer output the host later uses as indices
STUB_FILLS = {"match_kernel": 4}


@contextlib.contextmanager
def stubbed_launches(counts: collections.Counter) -> Iterator[None]:
    """Within: interpreted Triton launches are counted into ``counts`` by kernel name, not run."""
    from unittest import mock

    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", str(self.fn))
        counts[name] += 1
        if name in STUB_FILLS:
            args[STUB_FILLS[name]].zero_()

    with mock.patch.object(InterpretedFunction, "run", run):
        yield


def audit(fn: Callable[[], object], reps: int = 20) -> dict:
    """{aten_ops, aten (Counter by op), triton_launches, triton (Counter by kernel), sync_ops
    (Counter), us_per_call} of one call of fn, after a warm-up call (caches filled)."""
    from torch.profiler import ProfilerActivity, profile

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("host_audit needs TRITON_INTERPRET=1 (set before triton is imported)")
    launches: collections.Counter = collections.Counter()
    with stubbed_launches(launches):
        fn()
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = collections.Counter(e.name[len("aten::"):] for e in prof.events() if e.name.startswith("aten::"))
        one = collections.Counter(launches)
        us = us_per_call(fn, torch.device("cpu"), reps=reps, warmup=0, rounds=1)
    return {"aten_ops": sum(ops.values()), "aten": ops, "triton_launches": sum(one.values()), "triton": one,
            "sync_ops": collections.Counter({k: v for k, v in ops.items() if k in SYNC_OPS}), "us_per_call": us}


def calls() -> list[tuple[str, Callable[[], object]]]:
    """The inference-time forward of every method (no autograd graph), on 16-bit CPU tensors."""
    import attnlib

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen).half() for _ in range(3))
    mask = torch.rand(1, 2, 4, 4, generator=gen) < 0.5
    w = (torch.randn(64, 64, generator=gen) * 0.1).half()
    grid = (4, 8, 8)
    return [
        ("flash", lambda: attnlib.flash_attention(q, k, v, backend="triton")),
        ("block_sparse", lambda: attnlib.block_sparse_attention(q, k, v, mask, block_size=(64, 64), backend="triton")),
        ("sage", lambda: attnlib.sage_attention(q, k, v, backend="triton")),
        ("linear", lambda: attnlib.linear_attention(q, k, v, backend="triton")),
        ("sla (with W)", lambda: attnlib.sla_attention(q, k, v, w, None, block_size=(32, 32), backend="triton")),
        ("predict_block_mask", lambda: attnlib.predict_block_mask(q, k, topk=0.5)),
        ("asymrnr", lambda: attnlib.attention(q, k, v, method="asymrnr", grid=grid, q_ratio=0.5, kv_ratio=0.3,
                                              backend="triton")),
    ]


def main() -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print("| call | aten ops | Triton launches | host-sync ops | us per call (this machine, launches stubbed) |")
    print("|---|---:|---:|---|---:|")
    for name, fn in calls():
        r = audit(fn)
        syncs = ", ".join(f"{k} x{n}" for k, n in r["sync_ops"].items()) or "none"
        print(f"| {name} | {r['aten_ops']} | {r['triton_launches']} | {syncs} | {r['us_per_call']:.0f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    raise SystemExit(main())

"""The host side of each method's inference call (bench/host_audit.py): Triton launches stubbed,
aten ops counted under torch.profiler.

- No op that synchronises a CUDA host (``.item()``, ``nonzero``, ...) in any forward: it would
  stall every call and break CUDA-graph capture (issue 4: "the host never synchronised").
- The Triton launches per call are what the kernels' design says (a new launch is a decision).
- The aten ops per call stay within a budget about 20% above today's counts (each is a kernel
  launch and 5-10 us of host time on a GPU), so a change that adds torch glue to a hot path shows.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("needs TRITON_INTERPRET=1", allow_module_level=True)

from bench.host_audit import audit, calls  # noqa: E402

# call -> (Triton launches, aten-op budget); counts on torch 2.13 (CPU) when written:
# flash 3, block_sparse 3, sage 10, linear 15, sla 37, predict 34, asymrnr 168
EXPECTED = {
    "flash": (1, 4),
    "block_sparse": (1, 4),
    "sage": (5, 12),
    "linear": (2, 18),
    "sla (with W)": (7, 45),
    "predict_block_mask": (3, 41),
    "asymrnr": (7, 200),
}
CALLS = dict(calls())


def test_every_call_is_listed():
    assert set(CALLS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_forward_host_work(name):
    r = audit(CALLS[name], reps=1)
    launches, budget = EXPECTED[name]
    assert not r["sync_ops"], f"{name}: host-synchronising ops {dict(r['sync_ops'])}"
    assert r["triton_launches"] == launches, f"{name}: Triton launches {dict(r['triton'])}"
    assert r["aten_ops"] <= budget, f"{name}: {r['aten_ops']} aten ops > {budget}: {r['aten'].most_common(12)}"

"""Host time per call: what attnlib's Python layer (validation, dispatch, launch) adds to a call.

Calls on tiny inputs, back to back, then one synchronisation: the device work of each call takes
a few microseconds, so the wall time per call is the host's (Python, dispatch, the launcher),
next to torch's own scaled_dot_product_attention on the same tensors. On an H100 (2026-11-27) a
block_sparse call at density 0.05 took 0.638 ms eager against 0.416 ms replayed from a CUDA
graph: about 0.2 ms of host time per call, which FlexAttention, compiled, does not pay.

``run_overhead_suite(budget_s, log)`` is used by gpu_check.py (suite "overhead"); on the CPU it
times the torch backend, whose own float32 arithmetic is then part of each call
(``python bench/bench_overhead.py``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = dict(batch=1, heads=2, seq=64, head_dim=64)
BLOCK = (64, 64)
SUITE_BUDGET_S = 10.0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def us_per_call(fn: Callable[[], object], dev: torch.device, *, reps: int = 200, warmup: int = 20,
                rounds: int = 3) -> float:
    """Best of `rounds` rounds of `reps` back-to-back calls, in microseconds per call."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(dev)
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def cases(q, k, v, mask, on_gpu: bool) -> list[tuple[str, Callable[[], object]]]:
    import attnlib

    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = "auto" if on_gpu else "torch"
    out = [("torch sdpa", lambda: sdpa(q, k, v)),
           (f"attnlib flash ({backend})", lambda: attnlib.flash_attention(q, k, v, backend=backend)),
           (f"attnlib block_sparse ({backend})",
            lambda: attnlib.block_sparse_attention(q, k, v, mask, block_size=BLOCK, backend=backend))]
    if on_gpu:
        qg = q.detach().clone().requires_grad_()  # builds a graph: the call goes through the op
        d = q.shape[-1]
        w = torch.randn(d, d, device=q.device, dtype=q.dtype) * 0.02
        out += [("attnlib flash (triton)", lambda: attnlib.flash_attention(q, k, v, backend="triton")),
                ("attnlib flash (triton, needs grad)", lambda: attnlib.flash_attention(qg, k, v, backend="triton")),
                # several launches each: what their Python and torch glue add per call
                ("attnlib sage (triton)", lambda: attnlib.sage_attention(q, k, v, backend="triton")),
                ("attnlib sla (triton, W)", lambda: attnlib.sla_attention(q, k, v, w, None, block_size=(16, 16),
                                                                         backend="triton")),
                ("attnlib predict_block_mask", lambda: attnlib.predict_block_mask(q, k, block_size=BLOCK, topk=0.5))]
    return out


PROFILED_CALLS = ("attnlib flash (triton)", "attnlib flash (triton, needs grad)", "attnlib sage (triton)",
                  "attnlib block_sparse (auto)")
PROFILE_REPS = 100


def profile_calls(named: list[tuple[str, Callable[[], object]]], dev: torch.device, *, reps: int = PROFILE_REPS,
                  top: int = 25, skipped: Optional[dict] = None) -> str:
    """cProfile of `reps` back-to-back calls of each call named (PROFILED_CALLS first, then the
    other attnlib calls): the functions with the most own time, as markdown. On a CPU with the
    launches stubbed, torch.library's fill_defaults (the op's schema walked once per argument, 32
    arguments: quadratic) took 265 of 420 us of a graph-building flash call; this says where a GPU
    host spends the rest. ``skipped``: call name -> why it is not profiled (listed as such)."""
    import cProfile
    import io
    import pstats

    skipped = dict(skipped or {})
    order = [n for n in PROFILED_CALLS if any(n == m for m, _ in named)]
    order += [n for n, _ in named if n.startswith("attnlib") and n not in order]
    fns = dict(named)
    parts = [f"# Host profile per call ({dev}; {reps} calls each, cProfile, top {top} by own time)\n",
             "Profiled: " + (", ".join(f"`{n}`" for n in order if n not in skipped) or "none") + "\n"]
    for name in order:
        if name in skipped:
            parts.append(f"## {name}\n\nnot profiled: {skipped[name]}\n")
            continue
        fn = fns[name]
        try:
            fn()
            _sync(dev)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reps):
                fn()
            _sync(dev)
            prof.disable()
        except Exception as e:  # noqa: BLE001 - one call's failure leaves the others' profiles
            parts.append(f"## {name}\n\nfailed: {type(e).__name__}: {str(e)[:300]}\n")
            continue
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        parts.append(f"## {name}\n\n```\n{buf.getvalue().strip()}\n```\n")
    return "\n".join(parts)


def run_overhead_suite(budget_s: float = SUITE_BUDGET_S, log: Callable[[str], None] = print,
                       device: Optional[str] = None, *, reps: int = 200, out: Optional[Path] = None) -> list[dict]:
    """One record per call kind: us per call, and the excess over torch SDPA's on the same tensors;
    with `out`, also host_profile.md there (profile_calls)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    s = SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s["batch"], s["heads"], s["seq"], s["head_dim"], device=device, dtype=dtype,
                           generator=gen) for _ in range(3))
    nb = -(-s["seq"] // BLOCK[0])
    mask = torch.ones(s["batch"], s["heads"], nb, nb, dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    records: list[dict] = []
    base = None
    named = cases(q, k, v, mask, on_gpu)
    for name, fn in named:
        rec = dict(suite="overhead", call=name, device=device, dtype=str(dtype).replace("torch.", ""), **s)
        if time.perf_counter() - t0 > budget_s:
            rec["skipped"] = "time budget spent"
        else:
            try:
                us = us_per_call(fn, dev, reps=reps)
                rec["us_per_call"] = us
                if base is None:
                    base = us
                rec["excess_us_vs_sdpa"] = us - base
                log(f"{name:<36} {us:8.1f} us per call ({us - base:+.1f} vs torch sdpa)")
            except Exception as e:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                log(f"{name}: failed: {rec['error']}")
        records.append(rec)
    if out is not None:
        # always written (run 1's 15 s budget ended before it): only calls that ran above, whose
        # kernels are compiled, so each profile costs reps x the call's host time; fewer reps
        # once the budget is spent
        skipped = {r["call"]: r.get("skipped") or r.get("error") for r in records
                   if "us_per_call" not in r}
        reps_p = PROFILE_REPS if time.perf_counter() - t0 < budget_s else max(10, PROFILE_REPS // 5)
        try:
            (Path(out) / "host_profile.md").write_text(profile_calls(named, dev, reps=reps_p, skipped=skipped))
            log(f"host profile written to host_profile.md ({reps_p} calls each)")
        except Exception as e:  # noqa: BLE001 - the timings above stand
            log(f"host profile failed: {type(e).__name__}: {e}")
    return records


if __name__ == "__main__":
    run_overhead_suite(60.0)

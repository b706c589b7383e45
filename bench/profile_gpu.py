"""Where the time goes, for the cases the benchmarks left unexplained (GPU only).

    python bench/profile_gpu.py [--out DIR]      # writes profile.md (and prints it)

For each case: the call's median time with CUDA events (as the benchmarks time it), the same call
replayed from a CUDA graph (no host work: the gap to the eager time is Python / launch overhead),
and the device kernels it launches with their summed time from torch.profiler. Cases:

- sla at critical 0.05 on the Wan2.1-1.3B shape, forward, at block sizes (64, 64) and (128, 64):
  the linear branch took 62% of the forward at stop 19 (the per-tile aggregation, 1.75x slower
  there, is no longer profiled); then at (64, 64) with the linear branch off (negligible 0.95:
  the same critical blocks, no marginal ones), so the difference is the linear branch's cost;
- the SLA forward and backward together (a training step of the attention alone), and the same
  with the linear branch off;
- flash auto vs torch SDPA (bf16, no grad) at the Wan2.1-1.3B shape: auto should now be SDPA;
- block_sparse at density 0.05 and 0.1 (bench_block_sparse's shape): the H100 run of 2026-11-27
  measured 0.65 ms at 0.05, no less than 0.62 ms at 0.1, where FlexAttention took 0.34 ms;
- the linear forward at 128k tokens (run 1: 27% of the copy bandwidth);
- AsymRnR at the Wan2.1-1.3B shape, whole call and the matching alone (run 2: 4.25 ms of 9.18).
Cases that may fail CUDA-graph capture (a host sync inside the call) come last. gpu_check.py runs
it as its last suite ("profile"), within a time budget: cases past it are listed as not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _median_ms(fn: Callable[[], object], reps: int = 30) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _graph_ms(fn: Callable[[], object]) -> float | str:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
    except Exception as e:  # noqa: BLE001 - a host sync inside the call makes capture fail: say so
        return f"capture failed: {type(e).__name__}: {str(e)[:120]}"
    return _median_ms(g.replay)


def _kernels(fn: Callable[[], object], top: int = 8) -> list[tuple[str, int, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith("cuda"):
            rows.append((e.key[:70], e.count // 5, t / 5 / 1e3))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


LINEAR_SHAPE = (1, 16, 131072, 128)


def cases(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, *, sla_shape=None, sparse_shape=None,
          linear_shape=LINEAR_SHAPE, grid=None):
    """(name, call) per case, inputs made as each is reached.
    The keyword arguments (shapes, the AsymRnR grid, whose product must equal sla_shape's seq)
    and device / dtype are for the CPU smoke test; the defaults are the benchmarks' shapes."""
    import attnlib
    from bench import bench_block_sparse as bbs
    from bench import bench_sla as bsla
    from bench import bench_asymrnr as barn

    gen = torch.Generator(device=device).manual_seed(0)
    w = sla_shape or bsla.SHAPE
    grid = grid or barn.WAN_GRID
    q, k, v = (torch.randn(w["batch"], w["heads"], w["seq"], w["head_dim"], device=device, dtype=dtype,
                           generator=gen) for _ in range(3))
    pw = torch.randn(w["head_dim"], w["head_dim"], device=device, dtype=dtype, generator=gen) * 0.02
    pb = torch.zeros(w["head_dim"], device=device, dtype=dtype)
    # issue 7's first (where its time goes is what the next change needs), then the others
    for block in (bsla.BLOCK, bsla.WIDE_BLOCK):
        yield (f"sla fwd critical 0.05 Wan2.1-1.3B, block_size {block}",
               lambda b=block: attnlib.sla_attention(q, k, v, pw, pb, critical=0.05, negligible=bsla.NEGLIGIBLE,
                                                     block_size=b, backend="triton"))
    # the same critical blocks with no marginal ones (negligible = 1 - critical): _runs_linear is
    # false, so no key-block states, no row-state sums and sla_fwd_kernel without LINEAR; the gap
    # to the (64, 64) case above is the linear branch's cost, each kernel's share in its table
    yield (f"sla fwd critical 0.05 Wan2.1-1.3B, block_size {bsla.BLOCK}, linear branch off (negligible 0.95)",
           lambda: attnlib.sla_attention(q, k, v, pw, pb, critical=0.05, negligible=0.95, block_size=bsla.BLOCK,
                                         backend="triton"))
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pwg = pw.detach().clone().requires_grad_()
    dout = torch.randn_like(q)

    def sla_train_step(negligible=bsla.NEGLIGIBLE):  # run 1: backward 3.36x faster than dense, target 5x
        with torch.enable_grad():
            out = attnlib.sla_attention(qg, kg, vg, pwg, pb, critical=0.05, negligible=negligible,
                                        block_size=bsla.BLOCK, backend="triton")
            out.backward(dout)
        for t in (qg, kg, vg, pwg):
            t.grad = None
    yield ("sla fwd+bwd critical 0.05 Wan2.1-1.3B (row states)", sla_train_step)
    yield ("sla fwd+bwd critical 0.05 Wan2.1-1.3B, linear branch off (negligible 0.95)",
           lambda: sla_train_step(0.95))
    yield ("flash auto (bf16, no grad) Wan2.1-1.3B", lambda: attnlib.flash_attention(q, k, v))
    yield ("flash triton Wan2.1-1.3B", lambda: attnlib.flash_attention(q, k, v, backend="triton"))
    yield ("torch SDPA default Wan2.1-1.3B", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    s = sparse_shape or bbs.SHAPE
    qs, ks, vs = (torch.randn(s["batch"], s["heads"], s["seq"], s["head_dim"], device=device, dtype=dtype,
                              generator=gen) for _ in range(3))
    for density in (0.05, 0.1):
        mask = bbs.random_block_mask(density, device=device, shape=s)
        yield (f"block_sparse triton density {density} ({s['heads']}x{s['seq']}, hd{s['head_dim']}, block {bbs.BLOCK})",
               lambda m=mask: attnlib.block_sparse_attention(qs, ks, vs, m, block_size=bbs.BLOCK, backend="triton"))
    ql, kl, vl = (torch.randn(*linear_shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    yield ("linear fwd non-causal elu (1x16x131072, hd128; the linear bench's largest shape)",
           lambda: attnlib.linear_attention(ql, kl, vl, backend="triton"))
    from attnlib.asymrnr import match, partition

    rq, rkv = barn.PAPER_RATIOS
    part = partition(grid, device=device)
    yield (f"asymrnr q {rq} kv {rkv} Wan2.1-1.3B (matching every call)",
           lambda: attnlib.attention(q, k, v, method="asymrnr", grid=grid, q_ratio=rq, kv_ratio=rkv))
    yield ("asymrnr matching of Q and V alone Wan2.1-1.3B", lambda: (match(q, part), match(v, part)))


def run_profile_suite(budget_s: float = 60.0, log: Callable[[str], None] = print, out: str = "gpu-results",
                      records: list | None = None) -> list[dict]:
    """gpu_check's "profile" suite: main() within budget_s; one record per case run, appended to
    records (default a new list) as each case ends, so an interrupt leaves those done."""
    done: list[dict] = [] if records is None else records
    main(["--out", str(out), "--budget", str(budget_s)], log=log, records=done)
    return done


def main(argv=None, log: Callable[[str], None] = print, records: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--budget", type=float, default=None, help="seconds; cases past it are listed as not run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("profile_gpu: no CUDA device; nothing to profile")
        return 0
    t0 = time.perf_counter()
    lines = [f"# Kernel profile: {torch.cuda.get_device_name()}", "",
             "eager: median of 30 calls with CUDA events; graph: the same call replayed from a CUDA graph "
             "(no host work); kernels: torch.profiler device time per call.", ""]
    try:
        _profile_cases(args.budget, t0, lines, log, records)
    except KeyboardInterrupt:  # SIGINT / SIGTERM of gpu_check: profile.md still says what was done
        lines += ["## interrupted", "", f"stopped by an interrupt {time.perf_counter() - t0:.0f} s in; "
                  "the cases above it ran, the rest did not", ""]
        raise
    finally:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.md").write_text("\n".join(lines))
    return 0


def _profile_cases(budget, t0: float, lines: list, log: Callable[[str], None], records: list | None) -> None:
    """main's loop: each case's eager and graph times and kernels, as markdown into lines."""
    with torch.no_grad():
        for name, fn in cases():
            if budget is not None and time.perf_counter() - t0 > budget:
                lines += [f"## {name}", "", "not run: the profile's time budget was spent", ""]
                continue
            try:
                fn()
                torch.cuda.synchronize()
                eager = _median_ms(fn)
                graph = _graph_ms(fn)
                ks = _kernels(fn)
            except Exception as e:  # noqa: BLE001 - record and go on
                lines += [f"## {name}", "", f"failed: {type(e).__name__}: {str(e)[:300]}", ""]
                log(lines[-2])
                continue
            g = f"{graph:.3f} ms" if isinstance(graph, float) else graph
            lines += [f"## {name}", "", f"eager {eager:.3f} ms; graph {g}; kernel time "
                      f"{sum(r[2] for r in ks):.3f} ms in the top {len(ks)}", "",
                      "| kernel | launches per call | ms per call |", "|---|---:|---:|"]
            lines += [f"| `{k}` | {n} | {t:.3f} |" for k, n, t in ks]
            lines.append("")
            log("\n".join(lines[-(len(ks) + 6):]))
            if records is not None:
                records.append({"case": name, "eager_ms": eager, "graph_ms": graph if isinstance(graph, float) else None,
                                "kernels": [{"kernel": k, "launches": n, "ms": t} for k, n, t in ks]})


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU benchmark of the sparse torch-backend kernels against dense attention, side by side in one
run: block_sparse-torch-chunked in its two forms (masked: dense chunks with the block mask applied;
gathered: only the listed blocks, attnlib/kernels/block_sparse_gather.py) at densities 0.5, 0.2,
0.1, 0.05, and sla-torch-chunked (critical 0.05, negligible 0.10) in both forms, next to torch's
SDPA (attnlib's flash on a CPU runs it, fp32 training included). Forward, and forward + backward
at density 0.1.

Shape: a real model's (bench/runner.load_workloads), by default FLUX.1-dev at 1024 px (24 heads, hd128,
4608 tokens), float32 (CPUs have no fast half-precision attention), block size (64, 64), random
per-head masks. `python bench/bench_torch_cpu.py [--workload NAME] [--seq N] [--threads N] [--out DIR]`
writes torch-cpu.json and torch-cpu.md under DIR (default bench/results/cpu). --seq cuts the
sequence (the result names it) for a quick run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import runner  # noqa: E402

DENSITIES = (0.5, 0.2, 0.1, 0.05)
BLOCK = (64, 64)
DEFAULT_WORKLOAD = "flux.1-1024"


def _median_ms(step, reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _forced(form: str):
    """A context forcing block_sparse_gather's form (masked or gathered), restoring the threshold."""
    from attnlib.kernels import block_sparse_gather as gather

    return mock.patch.object(gather, "GATHER_MAX_DENSITY", 0.0 if form == "masked" else 1.0)


def _chunked_training():
    """A context in which fp32 CPU training calls of flash run flash-torch-chunked (attnlib's own
    backward), not torch SDPA with its autograd (kernels/flash_sdpa.py: cpu_backward_ok)."""
    from attnlib.kernels import flash_sdpa

    return mock.patch.object(flash_sdpa, "cpu_backward_ok", lambda inp: False)


def run(workload: str = DEFAULT_WORKLOAD, seq: int | None = None, reps: int = 3, log=print) -> dict:
    import attnlib

    w = next((x for x in runner.load_workloads() if x["name"] == workload), None)
    if w is None:
        raise SystemExit(f"no workload named {workload!r} in the workloads file")
    b, h, d, s = w["batch"], w["heads"], w["head_dim"], seq or w["seq"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    mq, mk = -(-s // BLOCK[0]), -(-s // BLOCK[1])
    records = []

    def record(name: str, mode: str, ms: float, **extra) -> None:
        records.append(dict(name=name, mode=mode, ms=round(ms, 2), **extra))
        log(f"{name:40s} {mode:8s} {ms:10.1f} ms")

    def fwd_bwd(fn):
        def step():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
        return step

    with torch.no_grad():
        dense = _median_ms(lambda: attnlib.attention(q, k, v), reps)
    record("dense (torch SDPA via attnlib flash)", "fwd", dense)
    dense_bwd = _median_ms(fwd_bwd(lambda a, b_, c: attnlib.attention(a, b_, c)), reps)
    record("dense (attnlib flash: torch SDPA and its backward)", "fwd+bwd", dense_bwd)
    with _chunked_training():
        chunked_bwd = _median_ms(fwd_bwd(lambda a, b_, c: attnlib.attention(a, b_, c, backend="torch")), reps)
    record("dense (flash-torch-chunked)", "fwd+bwd", chunked_bwd, speedup_vs_dense=round(dense_bwd / chunked_bwd, 2))
    sdpa_bwd = _median_ms(fwd_bwd(torch.nn.functional.scaled_dot_product_attention), reps)
    record("dense (torch SDPA called directly)", "fwd+bwd", sdpa_bwd, speedup_vs_dense=round(dense_bwd / sdpa_bwd, 2))
    for density in DENSITIES:
        mask = torch.rand(b, h, mq, mk, generator=gen) < density
        for form in ("masked", "gathered"):
            with _forced(form), torch.no_grad():
                ms = _median_ms(lambda: attnlib.block_sparse_attention(q, k, v, mask, block_size=BLOCK,
                                                                       backend="torch"), reps)
            record(f"block_sparse {form} density {density}", "fwd", ms, density=density, form=form,
                   speedup_vs_dense=round(dense / ms, 2))
            if density == 0.1:
                with _forced(form):
                    ms = _median_ms(fwd_bwd(lambda a, b_, c: attnlib.block_sparse_attention(
                        a, b_, c, mask, block_size=BLOCK, backend="torch")), reps)
                record(f"block_sparse {form} density {density}", "fwd+bwd", ms, density=density, form=form,
                       speedup_vs_dense=round(dense_bwd / ms, 2))
    sla_kw = dict(critical=0.05, negligible=0.10, block_size=BLOCK, backend="torch")
    wt = torch.randn(d, d, generator=gen) * d ** -0.5
    for form in ("masked", "gathered"):
        with _forced(form), torch.no_grad():
            ms = _median_ms(lambda: attnlib.sla_attention(q, k, v, wt, **sla_kw), reps)
        record(f"sla {form} critical 0.05", "fwd", ms, form=form, speedup_vs_dense=round(dense / ms, 2))
        with _forced(form):
            ms = _median_ms(fwd_bwd(lambda a, b_, c: attnlib.sla_attention(a, b_, c, wt, **sla_kw)), reps)
        record(f"sla {form} critical 0.05", "fwd+bwd", ms, form=form, speedup_vs_dense=round(dense_bwd / ms, 2))
    return dict(workload=workload, shape=dict(batch=b, heads=h, seq=s, head_dim=d), block_size=BLOCK,
                dtype="float32", threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__, reps=reps, records=records)


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "torch-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    sh = result["shape"]
    lines = [
        "# Sparse torch-backend kernels on a CPU",
        "",
        f"{result['workload']} shape (batch {sh['batch']}, {sh['heads']} heads, {sh['seq']} tokens, hd{sh['head_dim']}), "
        f"float32, block size {tuple(result['block_size'])}, random per-head masks; {result['threads']} torch "
        f"threads on {result['cpu_count']} cores ({result['cpu']}), torch {result['torch']}; median of "
        f"{result['reps']} calls after one warm-up, all measured in one run (bench/bench_torch_cpu.py).",
        "",
        "| kernel | mode | ms | speed-up over dense |",
        "|---|---|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(f"| {r['name']} | {r['mode']} | {r['ms']:.1f} | {r.get('speedup_vs_dense', 1.0):.2f}x |")
    lines += ["", "Dense: what attnlib's flash runs on a CPU in fp32, torch SDPA's CPU flash kernel, for the "
              "forward and, with its own backward, for forward + backward (kernels/flash_sdpa.py: "
              "cpu_backward_ok); every ratio is against those. flash-torch-chunked (attnlib's backward, which "
              "fp16/bf16 training on a CPU runs, and the loop the masked form shares) and torch SDPA called "
              "directly are listed beside them."]
    (out_dir / "torch-cpu.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default=DEFAULT_WORKLOAD)
    ap.add_argument("--seq", type=int, default=None, help="cut the sequence to N tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    write(run(a.workload, a.seq, a.reps), a.out)


if __name__ == "__main__":
    main()

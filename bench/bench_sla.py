"""Benchmarks for method sla: effective TFLOP/s (dense FLOPs / time), forward and backward, at
critical 0.05 / 0.10 / 0.20 (negligible 0.10) on the Wan2.1-1.3B shape (12 heads, hd128, 32760
tokens, bf16, block (64, 64)), against attnlib's dense flash on Triton and the fastest torch SDPA
backend, plus the sparse-only variant (negligible = 1 - critical: no marginal blocks, so the
launchers skip the linear branch entirely: no key-block states, pre-aggregation, projection or
linear backward kernels) to show what the linear branch costs, and at critical 0.05 SLA with
block_size (128, 64) (variant "block-128x64": half the query blocks, so half the marginal row
states to form and read).
Issue 7 targets (H100): forward >= 10x dense flash at critical 0.05, backward >= 5x.

Backward times the whole backward call (attnlib's re-forms the block map and recomputes O_l). FLOPs
are runner.flops of the dense problem for every provider, so the ratios are speed-ups.

``run_sla_suite(budget_s, log)`` is used by gpu_check.py; ``python bench/bench_sla.py`` prints a
table. GPU only.
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

from bench import runner  # noqa: E402

WORKLOAD = "wan2.1-1.3b-480p-81f"
SHAPE = dict(batch=1, heads=12, seq=32760, head_dim=128)  # bench/workloads.json, Wan2.1 T2V 1.3B
BLOCK = (64, 64)
WIDE_BLOCK = (128, 64)  # the other block size
NEGLIGIBLE = 0.10
CRITICALS = (0.05, 0.10, 0.20)
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
SUITE_BUDGET_S = 40.0


def _shape_from_workloads() -> dict:
    for w in runner.load_workloads():
        if w["name"] == WORKLOAD:
            return dict(batch=w["batch"], heads=w["heads"], seq=w["seq"], head_dim=w["head_dim"])
    return dict(SHAPE)


def _forward(provider: str, q, k, v, w, b, critical: float, negligible: float,
             block: tuple = BLOCK) -> Callable[[], torch.Tensor]:
    import attnlib

    if provider == "attnlib-sla":
        return lambda: attnlib.sla_attention(q, k, v, w, b, critical=critical, negligible=negligible,
                                             block_size=block, backend="triton")
    if provider == "attnlib-flash":
        return lambda: attnlib.flash_attention(q, k, v, backend="triton")
    if provider.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, provider.split("-", 1)[1])

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return run
    raise ValueError(provider)


def _step(fwd: Callable[[], torch.Tensor], mode: str, leaves) -> Callable[[], object]:
    if mode == "fwd":
        return fwd
    out = fwd()
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def _time(step, dev, cfg) -> float:
    step()
    ms, _reps, _ = runner.time_step(step, lambda: None, dev, cfg)
    return ms


def run_sla_suite(budget_s: float = SUITE_BUDGET_S, log: Callable[[str], None] = print, *, device: str = "cuda",
                  shape: Optional[dict] = None, dtype: torch.dtype = torch.bfloat16,
                  timing: Optional[runner.TimingConfig] = None, criticals: tuple = CRITICALS,
                  records: Optional[list[dict]] = None) -> list[dict]:
    """The GPU suite (Wan2.1-1.3B shape, bf16). device="cpu" with a small shape, fp32, a short
    timing config and fewer criticals is the CPU smoke test of every provider path
    (tests/test_bench_suites.py). records: a list the rows are appended to as they are measured
    (gpu_check keeps what an interrupt leaves; default a new one)."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    t0 = time.perf_counter()
    dev = torch.device(device)
    shape = shape or _shape_from_workloads()
    dtype_name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape["batch"], shape["heads"], shape["seq"], shape["head_dim"], generator=gen)
               .to(dev, dtype).requires_grad_() for _ in range(3))
    d = shape["head_dim"]
    w = (torch.randn(d, d, generator=gen) * d ** -0.5).to(dev).requires_grad_()
    b = torch.zeros(d, device=dev, requires_grad=True)
    cfg = timing or runner.TimingConfig(target_s=0.05, max_reps=5)
    records = [] if records is None else records

    def measure(provider: str, mode: str, critical=None, negligible=None, variant="sla", block=BLOCK) -> None:
        rec = dict(method="sla", workload=WORKLOAD, provider=provider, mode=mode, variant=variant,
                   critical=critical, negligible=negligible, block_size=list(block), dtype=dtype_name, **shape)
        if time.perf_counter() - t0 > budget_s:
            rec["skipped"] = "time budget spent"
            records.append(rec)
            return
        dense = runner.flops(shape["batch"], shape["heads"], shape["seq"], shape["seq"], d, mode=mode)
        try:
            fwd = _forward(provider, q, k, v, w, b, critical, negligible, block)
            leaves = (q, k, v, w, b) if provider == "attnlib-sla" else (q, k, v)
            ms = _time(_step(fwd, mode, leaves), dev, cfg)
            rec.update(ms=ms, effective_tflops=dense / ms / 1e9)
            what = f"{provider} {variant} c={critical}" if critical is not None else provider
            log(f"{what:<34} {mode}  {ms:9.3f} ms  {dense / ms / 1e9:8.1f} eff. TFLOP/s")
        except Exception as e:  # noqa: BLE001 - record and go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{provider} {mode} failed: {rec['error']}")
        records.append(rec)

    # most important first, so a short budget still yields the targets: at the headline critical,
    # SLA, its sparse-only twin (the linear branch's cost), dense flash and SLA on 128-query blocks
    # (block_size (128, 64): half the query blocks, so half the row states to form, write and read,
    # and 128-row attention tiles; the classification is coarser); then the other criticals; then
    # the SDPA backends (no Triton compile, quick). The per-tile aggregation (ATTNLIB_SLA_ROW_STATES
    # =0) is no longer timed: 1.75x slower forward and 3.9x slower backward than the row states at
    # stop 19 (bench/results/nvidia-h100-80gb-hbm3/sla.json)
    for crit in criticals:
        for mode in ("fwd", "bwd"):
            measure("attnlib-sla", mode, crit, NEGLIGIBLE)
            measure("attnlib-sla", mode, crit, round(1.0 - crit, 6), variant="sparse-only")
            if crit == criticals[0]:
                measure("attnlib-flash", mode)
                measure("attnlib-sla", mode, crit, NEGLIGIBLE, variant="block-128x64", block=WIDE_BLOCK)
    for mode in ("fwd", "bwd"):
        for sdpa in SDPA_BACKENDS:
            measure(f"sdpa-{sdpa}", mode)
    _targets(records, log, criticals)
    return records


def _targets(records: list[dict], log, criticals: tuple = CRITICALS) -> None:
    def ms(provider, mode, crit=None, variant="sla"):
        for r in records:
            if (r["provider"], r["mode"], r.get("critical"), r.get("variant")) == (provider, mode, crit, variant):
                return r.get("ms")
        return None

    for mode, want in (("fwd", 10.0), ("bwd", 5.0)):
        sla, flash = ms("attnlib-sla", mode, criticals[0]), ms("attnlib-flash", mode)
        sdpa = [m for m in (ms(f"sdpa-{s}", mode) for s in SDPA_BACKENDS) if m]
        if sla and flash:
            log(f"target: sla {mode} at critical {criticals[0]} is {flash / sla:.2f}x dense attnlib flash "
                f"(>= {want:g}x)" + (f", {min(sdpa) / sla:.2f}x the fastest SDPA" if sdpa else ""))
        wide = ms("attnlib-sla", mode, criticals[0], "block-128x64")
        if wide and flash:
            log(f"target with block_size {WIDE_BLOCK}: sla {mode} at critical {criticals[0]} is {flash / wide:.2f}x "
                f"dense attnlib flash (>= {want:g}x)" + (f"; {BLOCK}: {sla:.3f} ms, {WIDE_BLOCK}: {wide:.3f} ms" if sla else ""))
        for crit in criticals:
            full, sparse = ms("attnlib-sla", mode, crit), ms("attnlib-sla", mode, crit, "sparse-only")
            if full and sparse:
                log(f"linear branch at critical {crit} ({mode}): {full - sparse:.3f} ms "
                    f"({100 * (full - sparse) / full:.0f}% of the SLA time)")


if __name__ == "__main__":
    run_sla_suite(budget_s=600.0)

"""Benchmarks for method block_sparse: time and effective TFLOP/s (dense FLOPs / time) against
mask density (1.0, 0.5, 0.2, 0.1, 0.05) at hd128, seq 16k, bf16, block (128, 64), next to
attnlib's dense flash on the same backend and FlexAttention (torch.compile'd) with the same
block mask. Issue 6 targets (H100): at density 0.1, >= 7x faster than dense flash on the same
backend, and at least as fast as FlexAttention at equal density.

``run_block_sparse_suite(budget_s, log)`` is used by gpu_check.py; ``python bench/bench_block_sparse.py``
prints a table. GPU only.
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

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
SHAPE = dict(batch=1, heads=16, seq=16384, head_dim=128)
BLOCK = (128, 64)
PROVIDERS = ("attnlib-triton", "attnlib-cuda", "flash-triton", "flash-cuda", "flex")
SUITE_BUDGET_S = 40.0


def random_block_mask(density: float, seed: int = 0, device="cuda", shape: Optional[dict] = None) -> torch.Tensor:
    shape = shape or SHAPE
    b, h, s = shape["batch"], shape["heads"], shape["seq"]
    mq, mk = -(-s // BLOCK[0]), -(-s // BLOCK[1])
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, mq, mk, generator=gen) < density).to(device)


def _step(provider: str, q, k, v, mask):
    import attnlib

    if provider.startswith("attnlib-"):
        backend = provider.split("-", 1)[1]
        return lambda: attnlib.block_sparse_attention(q, k, v, mask, block_size=BLOCK, backend=backend)
    if provider.startswith("flash-"):
        backend = provider.split("-", 1)[1]
        return lambda: attnlib.flash_attention(q, k, v, backend=backend)
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        bm = attnlib.to_flex_block_mask(mask, BLOCK, seq_q=q.shape[2], seq_k=k.shape[2])
        fn = torch.compile(flex_attention, dynamic=False)
        return lambda: fn(q, k, v, block_mask=bm)
    raise ValueError(provider)


def run_block_sparse_suite(budget_s: float = SUITE_BUDGET_S, log: Callable[[str], None] = print, *,
                           device: str = "cuda", shape: Optional[dict] = None, dtype: torch.dtype = torch.bfloat16,
                           timing: Optional[runner.TimingConfig] = None,
                           records: Optional[list[dict]] = None) -> list[dict]:
    """The GPU suite (SHAPE, bf16). device="cpu" with a small shape, fp32 and a short timing
    config is the CPU smoke test of every provider path (tests/test_bench_suites.py). records: a
    list the rows are appended to as they are measured (gpu_check keeps what an interrupt
    leaves; default a new one)."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    t0 = time.perf_counter()
    dev = torch.device(device)
    shape = shape or SHAPE
    dtype_name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape["batch"], shape["heads"], shape["seq"], shape["head_dim"], generator=gen)
               .to(dev, dtype) for _ in range(3))
    dense_flops = runner.flops(shape["batch"], shape["heads"], shape["seq"], shape["seq"], shape["head_dim"])
    cfg = timing or runner.TimingConfig(target_s=0.1, max_reps=20)
    records = [] if records is None else records
    for density in DENSITIES:
        mask = random_block_mask(density, device=device, shape=shape)
        for prov in PROVIDERS:
            if prov.startswith("flash-") and density != DENSITIES[0]:
                continue  # dense baselines once
            rec = dict(method="block_sparse", provider=prov, density=density, block_size=list(BLOCK), **shape,
                       dtype=dtype_name)
            if time.perf_counter() - t0 > budget_s:
                rec["skipped"] = "time budget spent"
                records.append(rec)
                continue
            try:
                step = _step(prov, q, k, v, mask)
                step()
                ms, reps, _ = runner.time_step(step, lambda: None, dev, cfg)
                rec.update(ms=ms, reps=reps, effective_tflops=dense_flops / ms / 1e9)
                log(f"{prov:<15} density {density:<5} {ms:8.3f} ms  {dense_flops / ms / 1e9:7.1f} eff. TFLOP/s")
            except Exception as e:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"{prov:<15} density {density:<5} failed: {rec['error']}")
            records.append(rec)
    _targets(records, log)
    return records


def _targets(records: list[dict], log) -> None:
    ms = {(r["provider"], r["density"]): r.get("ms") for r in records}
    for be in ("triton", "cuda"):
        sparse, dense, flex = ms.get((f"attnlib-{be}", 0.1)), ms.get((f"flash-{be}", 1.0)), ms.get(("flex", 0.1))
        if sparse and dense:
            log(f"target: attnlib-{be} at density 0.1 is {dense / sparse:.2f}x faster than dense flash-{be} (>= 7x)")
        if sparse and flex:
            log(f"target: attnlib-{be} at density 0.1 takes {sparse / flex:.2f}x FlexAttention's time (<= 1x)")


if __name__ == "__main__":
    run_block_sparse_suite(budget_s=600.0)

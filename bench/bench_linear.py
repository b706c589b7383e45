"""Benchmarks for method linear: forward time against sequence length 4k..128k (linear scaling)
and achieved GB/s (bytes of q, k, v read + out written, per pass) against the card's measured
copy bandwidth, next to flash-linear-attention (fla-core) where importable. Issue 6 target:
>= 60% of measured copy bandwidth at seq 32k. Then forward + backward (attnlib only) at seq 32k,
its GB/s over the least bytes a backward can move (q, k, v, out, dout read, dq, dk, dv written,
plus the forward's four tensors).

The causal kernels also move their chunk states (fp32, (D * Dv + D) per super-chunk and kv head,
written, prefixed and read: see triton_kernels/linear/kernels.py); they are not counted, so the
GB/s here is the useful bandwidth.

``run_linear_suite(budget_s, log)`` is used by gpu_check.py; ``python bench/bench_linear.py``
prints a table. GPU only.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import runner  # noqa: E402

SEQS = (4096, 8192, 16384, 32768, 65536, 131072)
BWD_SEQ = 32768
SHAPE = dict(batch=1, heads=16, head_dim=128)
SUITE_BUDGET_S = 30.0


def copy_bandwidth_gbs(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms, _, _ = runner.time_step(lambda: dst.copy_(src), lambda: None, dev, runner.TimingConfig(target_s=0.1))
    return 2 * nbytes / ms / 1e6


def _fla_step(q, k, v, causal: bool):
    """(step, None) running flash-linear-attention's chunked kernel on the same tensors, or
    (None, why not). fla's linear attention is causal only (chunk_linear_attn and
    fused_chunk_linear_attn both are), so it has no non-causal counterpart."""
    if not causal:
        return None, "fla-core's linear attention is causal only"
    try:
        from fla.ops.linear_attn import chunk_linear_attn as f
    except ImportError:
        return None, "fla-core not installed (carry its wheel: see bench/gpu_check.py)"
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla takes (B, T, H, D)
    return (lambda: f(qt, kt, vt, normalize=True)), None


def run_linear_suite(budget_s: float = SUITE_BUDGET_S, log: Callable[[str], None] = print) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    import attnlib

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(dev)
    log(f"measured copy bandwidth {copy_gbs:.0f} GB/s")
    cfg = runner.TimingConfig(target_s=0.1, max_reps=20)
    records = []
    for causal in (False, True):
        for seq in SEQS:
            gen = torch.Generator().manual_seed(seq)
            q, k, v = (torch.randn(SHAPE["batch"], SHAPE["heads"], seq, SHAPE["head_dim"], generator=gen)
                       .to(dev, torch.bfloat16) for _ in range(3))
            nbytes = 4 * q.numel() * q.element_size()  # q, k, v read once, out written once
            fla_step, fla_why = _fla_step(q, k, v, causal)
            for prov, step in (("attnlib-triton", lambda: attnlib.linear_attention(q, k, v, causal=causal,
                                                                                   backend="triton")),
                               ("fla", fla_step)):
                rec = dict(method="linear", provider=prov, direction="fwd", seq=seq, causal=causal, dtype="bf16", **SHAPE,
                           copy_gbs=copy_gbs)
                if step is None:
                    rec["skipped"] = fla_why
                elif time.perf_counter() - t0 > budget_s:
                    rec["skipped"] = "time budget spent"
                else:
                    try:
                        step()
                        ms, reps, _ = runner.time_step(step, lambda: None, dev, cfg)
                        gbs = nbytes / ms / 1e6
                        rec.update(ms=ms, reps=reps, gbs=gbs, frac_copy=gbs / copy_gbs)
                        log(f"{prov:<15} {'causal' if causal else 'full':<6} seq {seq:<7} {ms:8.3f} ms "
                            f"{gbs:7.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)")
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        log(f"{prov} seq {seq} failed: {rec['error']}")
                records.append(rec)
    records += _fwd_bwd_records(dev, copy_gbs, cfg, t0, budget_s, log)
    return records


def _fwd_bwd_records(dev, copy_gbs: float, cfg, t0: float, budget_s: float, log) -> list[dict]:
    import attnlib

    records = []
    for causal in (False, True):
        gen = torch.Generator().manual_seed(BWD_SEQ)
        q, k, v = (torch.randn(SHAPE["batch"], SHAPE["heads"], BWD_SEQ, SHAPE["head_dim"], generator=gen)
                   .to(dev, torch.bfloat16).requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)
        nbytes = 12 * q.numel() * q.element_size()  # forward 4 tensors, backward 5 read + 3 written

        def step():
            attnlib.linear_attention(q, k, v, causal=causal, backend="triton").backward(dout)

        rec = dict(method="linear", provider="attnlib-triton", direction="fwd+bwd", seq=BWD_SEQ, causal=causal,
                   dtype="bf16", **SHAPE, copy_gbs=copy_gbs)
        if time.perf_counter() - t0 > budget_s:
            rec["skipped"] = "time budget spent"
        else:
            try:
                step()
                ms, reps, _ = runner.time_step(step, lambda: None, dev, cfg)
                gbs = nbytes / ms / 1e6
                rec.update(ms=ms, reps=reps, gbs=gbs, frac_copy=gbs / copy_gbs)
                log(f"{'attnlib-triton':<15} {'causal' if causal else 'full':<6} seq {BWD_SEQ:<7} fwd+bwd {ms:8.3f} ms "
                    f"{gbs:7.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)")
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"fwd+bwd seq {BWD_SEQ} failed: {rec['error']}")
        records.append(rec)
    return records


if __name__ == "__main__":
    run_linear_suite(budget_s=600.0)

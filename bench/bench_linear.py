"""Benchmarks for method linear: forward time against sequence length 4k..128k (linear scaling)
and achieved GB/s (bytes of q, k, v read + out written, per pass) against the card's measured
copy bandwidth, next to flash-linear-attention (fla-core) where importable, each eager (CUDA
events around the call) and replayed from a CUDA graph (the kernels alone). Issue 6 target:
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
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import runner  # noqa: E402

SEQS = (4096, 8192, 16384, 32768, 65536, 131072)
BWD_SEQ = 32768
ZDOT_SEQ = 32768  # issue 6's length: the forward there also with kernels.STATE_Z_DOT
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
    except Exception as e:  # noqa: BLE001 - a skip with the cause (fla itself missing, or a need of
        # it such as einops, or its import failing here), never the end of the suite's rows
        what = ("fla-core not installed (carry its wheel: see bench/gpu_check.py)"
                if getattr(e, "name", None) == "fla" else "fla-core is installed but does not import")
        return None, f"{what}: {type(e).__name__}: {str(e)[:200]}"
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla takes (B, T, H, D)
    return (lambda: f(qt, kt, vt, normalize=True)), None


def workload_shapes(workloads: list[dict], near_seq: int) -> list[dict]:
    """The workloads (runner.load_workloads) whose sequence is within a factor 2 of near_seq, for
    the forward rows at real models' shapes (multi-head, non-causal ones: kv_heads == heads)."""
    return [w for w in workloads if near_seq / 2 <= w["seq"] <= near_seq * 2
            and w.get("kv_heads", w["heads"]) == w["heads"] and not w.get("causal")]


def _with_z_dot(fn: Callable[[], object]):
    """fn() with the non-causal state kernel's z formed by a product (kernels.STATE_Z_DOT)."""
    from attnlib.triton_kernels.linear import kernels

    kernels.STATE_Z_DOT = True
    try:
        return fn()
    finally:
        kernels.STATE_Z_DOT = False


def run_linear_suite(budget_s: float = SUITE_BUDGET_S, log: Callable[[str], None] = print,
                     device: str = "cuda", *, seqs: tuple = SEQS, bwd_seq: int = BWD_SEQ,
                     shape: Optional[dict] = None, dtype: torch.dtype = torch.bfloat16,
                     timing: Optional[runner.TimingConfig] = None, copy_bytes: int = 1 << 30,
                     workloads: Optional[list[dict]] = None, zdot_seq: int = ZDOT_SEQ,
                     records: Optional[list[dict]] = None) -> list[dict]:
    """Forward GB/s over seqs (attnlib next to fla), then at the real models' shapes near bwd_seq
    tokens (workloads: those shapes; default workload_shapes of runner.load_workloads()), fwd+bwd
    at bwd_seq; at zdot_seq the non-causal forward also with kernels.STATE_Z_DOT; [] without CUDA.
    records: a list the rows are appended to as they are measured (gpu_check keeps what an
    interrupt leaves; default a new one). (device
    "cpu" with small seqs, shape and copy_bytes is the smoke test, under TRITON_INTERPRET=1:
    tests/test_bench_suites.py.)"""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    import attnlib

    t0 = time.perf_counter()
    dev = torch.device(device)
    copy_gbs = copy_bandwidth_gbs(dev, copy_bytes)
    log(f"measured copy bandwidth {copy_gbs:.0f} GB/s")
    cfg = timing or runner.TimingConfig(target_s=0.1, max_reps=20)
    shape = shape or SHAPE
    dtype_name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    records = [] if records is None else records

    def timed(rec: dict, step, nbytes: int, reset=lambda: None, why_not: Optional[str] = None,
              graph: bool = False) -> None:
        """Time step into rec (ms, GB/s, fraction of copy bandwidth; with graph also replayed from
        a CUDA graph, graph_ms ...), or say why it was not."""
        what = f"{rec['provider']:<15} {'causal' if rec['causal'] else 'full':<6} seq {rec['seq']:<7} {rec['direction']:<7}"
        if "workload" in rec:
            what += f" {rec['workload']} (B{rec['batch']} H{rec['heads']} hd{rec['head_dim']})"
        if step is None:
            rec["skipped"] = why_not
        elif time.perf_counter() - t0 > budget_s:
            rec["skipped"] = "time budget spent"
        else:
            try:
                step()
                ms, reps, _ = runner.time_step(step, reset, dev, cfg)
                gbs = nbytes / ms / 1e6
                rec.update(ms=ms, reps=reps, gbs=gbs, frac_copy=gbs / copy_gbs)
                log(f"{what} {ms:8.3f} ms {gbs:7.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)")
                if graph and dev.type == "cuda":
                    # the same call replayed from a CUDA graph: the kernels' time without the host's
                    # (which bounds eager calls below ~32k tokens: run 1 on H200 timed 0.45 ms at 4k)
                    from bench.profile_gpu import _graph_ms
                    g = _graph_ms(step)
                    if isinstance(g, float):
                        g_gbs = nbytes / g / 1e6
                        rec.update(graph_ms=g, graph_gbs=g_gbs, graph_frac_copy=g_gbs / copy_gbs)
                        log(f"{what} {g:8.3f} ms {g_gbs:7.0f} GB/s from a CUDA graph "
                            f"({100 * g_gbs / copy_gbs:.0f}% of copy)")
                    else:
                        rec["graph_ms"] = g
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"{what} failed: {rec['error']}")
        records.append(rec)

    def record(provider: str, direction: str, seq: int, causal: bool) -> dict:
        return dict(method="linear", provider=provider, direction=direction, seq=seq, causal=causal,
                    dtype=dtype_name, **shape, copy_gbs=copy_gbs)

    def inputs(seq: int, grad: bool = False, of: Optional[dict] = None):
        of = of or shape  # (batch, heads, head_dim)
        gen = torch.Generator().manual_seed(seq)
        return [torch.randn(of["batch"], of["heads"], seq, of["head_dim"], generator=gen)
                .to(dev, dtype).requires_grad_(grad) for _ in range(3)]

    def forward_rows(causal: bool) -> None:
        for seq in seqs:
            q, k, v = inputs(seq)
            nbytes = 4 * q.numel() * q.element_size()  # q, k, v read once, out written once
            fla_step, fla_why = _fla_step(q, k, v, causal)
            timed(record("attnlib-triton", "fwd", seq, causal),
                  lambda: attnlib.linear_attention(q, k, v, causal=causal, backend="triton"), nbytes, graph=True)
            if not causal and seq == zdot_seq:  # the state kernel's z by a product (kernels.STATE_Z_DOT)
                timed(record("attnlib-triton-zdot", "fwd", seq, causal),
                      lambda: _with_z_dot(lambda: attnlib.linear_attention(q, k, v, backend="triton")), nbytes,
                      graph=True)
            timed(record("fla", "fwd", seq, causal), fla_step, nbytes, why_not=fla_why, graph=True)

    forward_rows(False)
    # the real models' shapes near bwd_seq tokens (non-causal, as DiTs attend), before the causal
    # rows so that the suite's budget reaches them: the rows above keep one (batch, heads), to show
    # the scaling with length alone
    for w in workload_shapes(runner.load_workloads(), bwd_seq) if workloads is None else workloads:
        q, k, v = inputs(w["seq"], of=w)
        rec = dict(record("attnlib-triton", "fwd", w["seq"], False), workload=w["name"],
                   batch=w["batch"], heads=w["heads"], head_dim=w["head_dim"])
        timed(rec, lambda: attnlib.linear_attention(q, k, v, backend="triton"), 4 * q.numel() * q.element_size(),
              graph=True)
        del q, k, v
    forward_rows(True)
    for causal in (False, True):  # forward + backward at bwd_seq
        q, k, v = inputs(bwd_seq, grad=True)
        dout = torch.randn_like(q)
        nbytes = 12 * q.numel() * q.element_size()  # forward 4 tensors, backward 5 read + 3 written

        def reset():
            for t in (q, k, v):
                t.grad = None
        timed(record("attnlib-triton", "fwd+bwd", bwd_seq, causal),
              lambda: attnlib.linear_attention(q, k, v, causal=causal, backend="triton").backward(dout), nbytes,
              reset)
    return records


if __name__ == "__main__":
    run_linear_suite(budget_s=600.0)

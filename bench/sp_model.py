"""Analytic scaling model for sequence-parallel attention (Ulysses, ring, USP). A model, not a measurement.

For one self-attention call of shape (B, H, Hkv, S, D) in ``bytes`` per element on P = N x G
GPUs (N machines of G GPUs), with single-GPU attention throughput F (FLOP/s, measured: pass
``--tflops``), per-GPU link bandwidth W_in inside a machine and W_out between machines
(bytes/s each GPU can send):

    FLOPs        = 4 B H S^2 D            (QK^T and PV, 2 S^2 D each per head; x 1/2 if causal)
    T_1          = FLOPs / F              (one GPU)
    T_comp       = T_1 / P                (both schemes split the work evenly; zigzag for causal)

Ulysses (4 all-to-alls: q, k, v, o; each rank keeps 1/P of its shard and sends the rest):

    shard(x)     = B (S/P) H_x D bytes    (H_x = H for q, o; H_kv' for k, v, kv heads
                                           replicated up to lcm(H_kv, P))
    bytes_U      = (P-1)/P (2 shard(q) + 2 shard(k))            per rank per call
    T_comm_U     = max(bytes_U (P-G)/(P-1) / W_out, bytes_U (G-1)/(P-1) / W_in)
                   (the share of peers on other machines goes over the slower link)
    T_U          = T_comp + T_comm_U      (the all-to-alls sit on the critical path)
    needs H % P == 0.

Ring (K/V shards pass P-1 times; the next shard is received while the current one is used):

    bytes_R      = (P-1) 2 B (S/P) H_kv D bytes                 per rank per call
    t_c          = 2 B (S/P) H_kv D bytes / W    (W = W_out when N > 1: every step waits for
                                                   the slowest hop of the ring)
    t_b          = T_comp / P             (one block per step)
    T_R          = (P-1) max(t_b, t_c) + t_b

USP (Ulysses over the G GPUs of a machine, ring over the N machines, U = G, R = N):

    T_USP        = T_comm_U(P=G, W_in)  on the local shard   +   ring of R steps over W_out
                   with H/G heads and S/N tokens per ring shard:
                   t_b = T_comp / R,  t_c = 2 B (S/N) (H_kv'/G) D bytes / W_out
    bytes_USP    = bytes_U(P=G) + (R-1) 2 B (S/N) (H_kv'/G) D bytes

Efficiency = T_comp / T_scheme (1.0 = perfect scaling). Per step = per call x layers (one
DiT forward; classifier-free guidance batching is in B). What the model leaves out: all-to-all
latency and imperfect bandwidth (real NCCL all-to-all reaches perhaps 60-80 % of W), the
attention kernel running slower on the shorter blocks of a ring step, the rest of the layer
(projections, MLP) and its own communication, and for ring the compute stream slowing when it
shares SMs with NCCL. Note that NVLink's "900 GB/s" for H100 counts both directions; pass 450
for a stricter unidirectional figure.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence

DEFAULT_WORKLOADS = ("wan2.1-14b-720p-81f", "hunyuanvideo-720p-129f")
# (label, machines, GPUs per machine, W_in GB/s, W_out GB/s)
EXAMPLES = (("8 GPUs, NVLink 900 GB/s", 1, 8, 900.0, 900.0),
            ("2x8 GPUs, 400 Gb/s between", 2, 8, 900.0, 400.0 / 8))


@dataclass
class Shape:
    name: str
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq: int
    layers: int
    causal: bool = False


@dataclass
class Row:
    scheme: str
    layout: str
    t_comp: float
    t_total: Optional[float]
    bytes_per_rank: float
    t_comm: float
    note: str = ""

    @property
    def efficiency(self) -> Optional[float]:
        return None if self.t_total is None else self.t_comp / self.t_total


def load_workloads(path: Optional[str] = None) -> dict:
    """Shapes by name, found as the benchmark runner finds them (../shared, else bench/'s copy)."""
    try:
        from bench.runner import load_workloads as workload_list
    except ImportError:  # run as a script from inside bench/
        from runner import load_workloads as workload_list
    return {w["name"]: Shape(w["name"], w["batch"], w["heads"], w["kv_heads"], w["head_dim"], w["seq"],
                             w["layers"], bool(w.get("causal", False))) for w in workload_list(path)}


def flops(s: Shape) -> float:
    f = 4.0 * s.batch * s.heads * s.seq ** 2 * s.head_dim
    return f / 2 if s.causal else f


def _kv_heads_sent(s: Shape, p: int) -> int:
    return math.lcm(s.kv_heads, p)


def _a2a(s: Shape, p: int, g: int, w_in: float, w_out: float, nbytes: int) -> tuple[float, float]:
    """(bytes per rank, seconds) of Ulysses' four all-to-alls over p ranks, g per machine."""
    tok = s.batch * (s.seq / p) * s.head_dim * nbytes
    total = (p - 1) / p * tok * (2 * s.heads + 2 * _kv_heads_sent(s, p))
    if p == 1:
        return 0.0, 0.0
    local_peers, remote_peers = min(g, p) - 1, p - min(g, p)
    t = max(total * remote_peers / (p - 1) / w_out, total * local_peers / (p - 1) / w_in)
    return total, t


def _ring(t_comp: float, steps: int, shard_bytes: float, w: float) -> tuple[float, float, float]:
    """(bytes per rank, comm seconds if not hidden, total seconds) of a ring of ``steps`` ranks."""
    t_b, t_c = t_comp / steps, shard_bytes / w
    return (steps - 1) * shard_bytes, (steps - 1) * t_c, (steps - 1) * max(t_b, t_c) + t_b


def model(s: Shape, machines: int, gpus: int, w_in: float, w_out: float, tflops: float,
          nbytes: int = 2) -> list[Row]:
    p = machines * gpus
    t_comp = flops(s) / (tflops * 1e12) / p
    w_ring = w_out if machines > 1 else w_in
    rows = []
    if s.heads % p:
        rows.append(Row("ulysses", f"U={p}", t_comp, None, 0.0, 0.0, f"n/a: {s.heads} heads not a multiple of {p}"))
    else:
        b, t = _a2a(s, p, gpus, w_in, w_out, nbytes)
        rows.append(Row("ulysses", f"U={p}", t_comp, t_comp + t, b, t))
    shard = 2 * s.batch * (s.seq / p) * s.kv_heads * s.head_dim * nbytes
    b, t_c, t = _ring(t_comp, p, shard, w_ring)
    hidden = shard / w_ring <= t_comp / p  # one pass no slower than one block of compute
    rows.append(Row("ring", f"R={p}", t_comp, t, b, t_c, "comm hidden" if hidden else "comm-bound"))
    if machines > 1:
        if s.heads % gpus:
            rows.append(Row("usp", f"U={gpus} x R={machines}", t_comp, None, 0.0, 0.0,
                            f"n/a: {s.heads} heads not a multiple of {gpus}"))
        else:
            # Ulysses all-to-all inside the machine on the local shard (S/P tokens of every head)
            b_u, t_u = _a2a(Shape(s.name, s.batch, s.heads, s.kv_heads, s.head_dim, s.seq * gpus // p, s.layers),
                            gpus, gpus, w_in, w_in, nbytes)
            kv_heads = _kv_heads_sent(s, gpus) // gpus
            shard = 2 * s.batch * (s.seq / machines) * kv_heads * s.head_dim * nbytes
            b_r, t_c, t_r = _ring(t_comp, machines, shard, w_out)
            rows.append(Row("usp", f"U={gpus} x R={machines}", t_comp, t_u + t_r, b_u + b_r, t_u + t_c))
    return rows


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:9.1f}"


def print_rows(s: Shape, label: str, rows: Sequence[Row], tflops: float) -> None:
    t1 = flops(s) / (tflops * 1e12)
    print(f"\n{s.name}: B={s.batch} H={s.heads} Hkv={s.kv_heads} S={s.seq} D={s.head_dim} "
          f"{'causal ' if s.causal else ''}layers={s.layers} | {label}")
    print(f"  one GPU: {flops(s) / 1e12:.1f} TFLOP per call, {t1 * 1e3:.1f} ms per call, "
          f"{t1 * s.layers:.2f} s per step at {tflops:.0f} TFLOP/s")
    print(f"  {'scheme':8} {'layout':14} {'compute ms':>10} {'MB/rank':>9} {'comm ms':>8} {'total ms':>9} "
          f"{'step s':>7} {'eff':>6}  note")
    for r in rows:
        total = "n/a" if r.t_total is None else f"{r.t_total * 1e3:9.2f}"
        step = "n/a" if r.t_total is None else f"{r.t_total * s.layers:7.3f}"
        eff = "n/a" if r.efficiency is None else f"{r.efficiency * 100:5.1f}%"
        print(f"  {r.scheme:8} {r.layout:14} {r.t_comp * 1e3:10.2f} {_fmt_bytes(r.bytes_per_rank)} "
              f"{r.t_comm * 1e3:8.2f} {total:>9} {step:>7} {eff:>6}  {r.note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", help="name in workloads.json (repeatable); "
                    f"default {', '.join(DEFAULT_WORKLOADS)}")
    ap.add_argument("--workloads-file", default=None, help="default: ../shared/workloads.json, else bench's copy")
    ap.add_argument("--machines", type=int, help="machines (omit for the two example set-ups)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per machine")
    ap.add_argument("--bw-in", type=float, default=900.0, help="GB/s per GPU inside a machine")
    ap.add_argument("--bw-out", type=float, default=400.0, help="Gb/s (bits) per GPU between machines")
    ap.add_argument("--tflops", type=float, default=400.0, help="measured single-GPU attention TFLOP/s")
    ap.add_argument("--bytes", type=int, default=2, help="bytes per element (2 for bf16/fp16)")
    args = ap.parse_args(argv)

    shapes = load_workloads(args.workloads_file)
    names = args.workload or list(DEFAULT_WORKLOADS)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {', '.join(shapes)}")
    if args.machines is None:
        setups = EXAMPLES
    else:
        setups = ((f"{args.machines}x{args.gpus} GPUs, {args.bw_in:g} GB/s in, {args.bw_out:g} Gb/s out",
                   args.machines, args.gpus, args.bw_in, args.bw_out / 8),)
    print("attnlib sequence-parallel scaling MODEL (analytic, not a measurement; formulas: "
          "python bench/sp_model.py --help)")
    for name in names:
        for label, machines, gpus, w_in, w_out in setups:
            rows = model(shapes[name], machines, gpus, w_in * 1e9, w_out * 1e9, args.tflops, args.bytes)
            print_rows(shapes[name], label, rows, args.tflops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

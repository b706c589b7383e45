"""Launch-config sweep of the non-causal linear kernels (state, then apply), measured on a GPU.

The H200 run of 2026-11-27 (bench/results/nvidia-h200/) timed the two kernels at 1.4 TB/s
together at 128k tokens (state 0.84 ms, apply 0.70 ms for B1 H16 hd128 bf16), a third of the
copy bandwidth, with one 8-warp program per SM (176 and 163 registers). This sweep times every
(rows per step, value block, warps, stages) of each kernel and the number of programs per SM
(row splits of the state, row ranges of the apply), each against the launcher's default on the
same inputs (outputs compared), so the default can be chosen from measurements. The state kernel
is swept in both forms (``vt_first``: V^T phi(K), both wgmma operands in shared memory, which
compiles on sm_90 without ptxas's wgmma-serialization warning C7515 that the default form draws).

    python bench/sweep_linear.py --out DIR          # GPU: times, writes DIR/sweep_linear.json
    python bench/sweep_linear.py --compile-only     # CPU: registers / spills of each config on sm_90

``--causal`` sweeps the causal kernels instead (written to sweep_linear_causal.json): the output
kernel's (value block, warps, chunk), the dq kernel's (key block, warps, chunk) and the dk / dv
kernels' (key block, value block, warps, chunk), each by patching its config function
(kernels.fwd_config, dq_config, dkv_config) and timing the whole causal forward or backward,
with the relative max difference from the default's result: on an H200 (2026-11-27) the output
kernel ran 3x faster at (128, 8, 64) than its default, and (32, 4, 64) gave wrong outputs, so a
config is taken only with its difference at the level of the others.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attnlib.triton_kernels.linear import kernels as lk  # noqa: E402

# (rows per step, value block, warps, stages); four warps on tiles of 64 x 128 elements or more
# spilled on sm_90 (`--compile-only`, 2026-11-27: 8 to 876 bytes), so those are left out
_TILES = [c for c in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3, 4))
          if not (c[2] == 4 and c[0] * c[1] >= 64 * 128)]
# the state kernel's also in its V^T phi(K) form (vt_first, which compiles without ptxas's wgmma
# serialization; first, so that a spent budget cuts the form timed in run 2)
STATE_CONFIGS = [c + (True,) for c in _TILES] + [c + (False,) for c in _TILES]
APPLY_CONFIGS = list(_TILES)  # (BLOCK_M, value block, warps, stages), the same rule
PER_SM = (1, 2, 4, 8)  # programs per SM the rows are cut for
SEQS = (32768, 131072)
SHAPE = dict(batch=1, heads=16, head_dim=128)
FEATURE = "elu"


def state(k, v, block_n, bv, warps, stages, vt_first=False, *, per_sm):
    """(S, z) from kernels.state with the launch config given, per_sm row splits per SM."""
    return lk.state(k, v, FEATURE, vt_first=vt_first, config=(bv, warps, block_n, stages), splits_per_sm=per_sm)


def apply(q, s, z, out, block_m, bv, warps, stages, *, per_sm):
    """kernels.apply with the launch config given, per_sm programs per SM."""
    return lk.apply(q, s, z, out, FEATURE, 1e-6, config=(block_m, bv, warps, stages), programs_per_sm=per_sm)


def print_compile_record(r: dict, **tags) -> None:
    """One JSON line: tags, then what tests/triton_sm90.py read off the sm_90 compile."""
    keys = ("registers", "shared", "spill_bytes", "async_waits", "wgmma_serialized", "error")
    print(json.dumps({**tags, **{key: r.get(key) for key in keys}}), flush=True)


def compile_only() -> None:
    """Compile each config for sm_90 on the CPU (tests/triton_sm90.py) and print registers,
    shared memory and spills: the configs that spill need no GPU time."""
    sys.path.insert(0, str(REPO / "tests"))
    from triton_sm90 import compile_launches

    d = SHAPE["head_dim"]
    q, k, v = (torch.randn(1, 2, 1024, d).to(torch.bfloat16) for _ in range(3))
    s, z = torch.zeros(1, 2, d, d), torch.zeros(1, 2, d)
    for name, configs in (("state", STATE_CONFIGS), ("apply", APPLY_CONFIGS)):
        for cfg in configs:
            records: list = []
            with compile_launches(records):
                if name == "state":
                    state(k, v, *cfg, per_sm=2)
                else:
                    apply(q, s, z, torch.empty_like(q), *cfg, per_sm=2)
            print_compile_record(records[0], kernel=name, config=cfg)


def timer(device: torch.device, warmup: int, rep: int):
    """ms of one call: triton.testing.do_bench on CUDA (median, L2 cleared between calls); on
    the CPU (the smoke test, Triton's interpreter) one call's wall time."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep)

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


def sweep(out_dir: Path, budget_s: float, *, device: str = "cuda", seqs=SEQS, shape=None,
          dtype=torch.bfloat16, configs=None, per_sm_values=PER_SM) -> list[dict]:
    """Every state / apply config at each seq against the default; records also written to
    out_dir/sweep_linear.json after each kernel's sweep. ``configs`` ({"state": [...], "apply":
    [...]}), per_sm_values, shape, seqs, device and dtype are for the CPU smoke test."""
    dev = torch.device(device)
    shape = shape or SHAPE
    configs = configs or {"state": STATE_CONFIGS, "apply": APPLY_CONFIGS}
    t0 = time.perf_counter()
    records: list[dict] = []
    path = out_dir / "sweep_linear.json"
    bench = timer(dev, 5, 25)

    for seq in seqs:
        if time.perf_counter() - t0 > budget_s:
            records.append(dict(seq=seq, skipped="budget spent"))
            continue
        b, h, d = shape["batch"], shape["heads"], shape["head_dim"]
        gen = torch.Generator(device=dev).manual_seed(seq)
        q, k, v = (torch.randn(b, h, seq, d, generator=gen, device=dev, dtype=dtype) for _ in range(3))
        o = torch.empty_like(q)
        s_ref, z_ref = lk.state(k, v, FEATURE)
        o_ref = lk.apply(q, s_ref, z_ref, torch.empty_like(q), FEATURE, 1e-6)
        nbytes = 2 * q.numel() * q.element_size()  # each kernel reads two tensors (apply: one read, one written)
        base = {"state": bench(lambda: lk.state(k, v, FEATURE)),
                "apply": bench(lambda: lk.apply(q, s_ref, z_ref, o, FEATURE, 1e-6))}
        for name, ms in base.items():
            records.append(dict(seq=seq, kernel=name, config="default", ms=ms, gbs=nbytes / ms / 1e6))
            print(f"seq {seq} {name} default {ms:.3f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)
        for i, name in enumerate(("state", "apply")):
            # each kernel gets an even share of what is left at this seq (in turn, the state
            # kernel's 54 configs x 4 would take the whole budget and leave the apply kernel none)
            left = budget_s - (time.perf_counter() - t0)
            deadline = time.perf_counter() + left / (2 - i)
            for cfg in configs[name]:
                for per_sm in per_sm_values:
                    if time.perf_counter() > deadline:
                        records.append(dict(seq=seq, kernel=name, config=list(cfg), per_sm=per_sm,
                                            skipped="budget spent"))
                        continue
                    rec = dict(seq=seq, kernel=name, config=list(cfg), per_sm=per_sm)
                    try:
                        if name == "state":
                            fn = lambda: state(k, v, *cfg, per_sm=per_sm)  # noqa: E731
                            s, z = fn()
                            err = max(((s - s_ref).abs().max() / s_ref.abs().max()).item(),
                                      ((z - z_ref).abs().max() / z_ref.abs().max()).item())
                        else:
                            fn = lambda: apply(q, s_ref, z_ref, o, *cfg, per_sm=per_sm)  # noqa: E731
                            fn()
                            err = ((o.float() - o_ref.float()).abs().max() / o_ref.float().abs().max()).item()
                        ms = bench(fn)
                        rec.update(ms=ms, gbs=nbytes / ms / 1e6, vs_default=base[name] / ms, rel_err=err)
                    except Exception as e:  # noqa: BLE001 - a config that does not launch is a result
                        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    records.append(rec)
            best = sorted((r for r in records if r.get("kernel") == name and r.get("seq") == seq and "ms" in r
                           and r.get("config") != "default"), key=lambda r: r["ms"])[:5]
            for r in best:
                print(f"seq {seq} {name} best {r['config']} per_sm {r['per_sm']}: {r['ms']:.3f} ms "
                      f"{r['gbs']:.0f} GB/s {r['vs_default']:.2f}x default, rel err {r['rel_err']:.1e}", flush=True)
            path.write_text(json.dumps(records, indent=1))
    return records


# (name, config function patched, candidates)
CAUSAL_CONFIGS = (
    ("fwd", "fwd_config", [c for c in itertools.product((32, 64, 128), (4, 8), (32, 64))]),
    ("dq", "dq_config", [c for c in itertools.product((32, 64, 128), (4, 8), (16, 32, 64))]),
    ("dkv", "dkv_config", [c for c in itertools.product((64, 128), (64, 128), (4, 8), (32, 64))]),
    # software-pipelining stages of each kernel with its default tiles (kernels.causal_stages: 1
    # until measured; compiled for sm_90 at stop 22, 2 and 3 stages fit and give async copies)
    ("fwd", "causal_stages", [(2,), (3,)]),
    ("dq", "causal_stages", [(2,), (3,)]),
    ("dkv", "causal_stages", [(2,), (3,)]),
)
CAUSAL_SEQ = 32768


def patched(fn_name: str, which: str, cfg: tuple):
    """A context in which kernels.<fn_name> gives cfg: the config function itself, or for
    causal_stages the stages of the one kernel ``which`` names (the others keep theirs)."""
    from unittest import mock

    if fn_name == "causal_stages":
        real = lk.causal_stages
        return mock.patch.object(lk, fn_name, lambda w, cfg=cfg: cfg[0] if w == which else real(w))
    return mock.patch.object(lk, fn_name, lambda *a, cfg=cfg: cfg)


def default_config(fn_name: str, which: str, d: int, dtype: torch.dtype) -> tuple:
    if fn_name == "causal_stages":
        return (lk.causal_stages(which),)
    return getattr(lk, fn_name)(lk.pad(d), d if which == "fwd" else lk.pad(d), dtype,
                                *(() if which == "fwd" else (FEATURE,)))


def causal_call(which: str, q, k, v, out, dout):
    """The causal forward (which == "fwd") or backward; returns the tensors a config changes."""
    if which == "fwd":
        o = torch.empty_like(q)
        lk.causal(q, k, v, o, FEATURE, offset=0, eps=1e-6)
        return (o,)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lk.causal_bwd(dout, q, k, v, out, dq, dk, dv, FEATURE, offset=0, eps=1e-6)
    return (dq,) if which == "dq" else (dk, dv)


def causal_compile_only() -> None:
    sys.path.insert(0, str(REPO / "tests"))

    from triton_sm90 import compile_launches

    d = SHAPE["head_dim"]
    q, k, v, o, do = (torch.randn(1, 2, 1024, d).to(torch.bfloat16) for _ in range(5))
    for which, fn_name, cands in CAUSAL_CONFIGS:
        kernels = {"fwd": ("linear_chunk_fwd_kernel",), "dq": ("linear_chunk_dq_kernel",),
                   "dkv": ("linear_chunk_dk_kernel", "linear_chunk_dv_kernel")}[which]
        for cfg in cands:
            records: list = []
            with patched(fn_name, which, cfg), compile_launches(records):
                causal_call(which, q, k, v, o, do)
            for r in records:
                if r["kernel"] in kernels:
                    print_compile_record(r, which=which, kernel=r["kernel"], config=cfg)


def causal_sweep(out_dir: Path, budget_s: float, *, device: str = "cuda", seq: int = CAUSAL_SEQ, shape=None,
                 dtype=torch.bfloat16, configs=CAUSAL_CONFIGS) -> list[dict]:
    """Each causal kernel's candidates against its default (records also written to
    out_dir/sweep_linear_causal.json after each kernel); device, seq, shape, dtype and configs
    are for the CPU smoke test."""

    dev = torch.device(device)
    shape = shape or SHAPE
    bench = timer(dev, 3, 20)
    t0 = time.perf_counter()
    records: list[dict] = []
    path = out_dir / "sweep_linear_causal.json"
    b, h, d = shape["batch"], shape["heads"], shape["head_dim"]
    gen = torch.Generator(device=dev).manual_seed(7)
    q, k, v, dout = (torch.randn(b, h, seq, d, generator=gen, device=dev, dtype=dtype)
                     for _ in range(4))
    out = causal_call("fwd", q, k, v, None, None)[0]
    for i, (which, fn_name, cands) in enumerate(configs):
        if time.perf_counter() - t0 > budget_s:
            records.append(dict(which=which, config="default", skipped="budget spent"))
            continue
        # an even share of what is left for each kernel, so the last one is reached too
        deadline = time.perf_counter() + (budget_s - (time.perf_counter() - t0)) / (len(configs) - i)
        ref = causal_call(which, q, k, v, out, dout)
        base = bench(lambda: causal_call(which, q, k, v, out, dout))
        default = default_config(fn_name, which, d, q.dtype)
        records.append(dict(which=which, config="default", knob=fn_name, default=list(default), ms=base))
        print(f"causal {which} {fn_name} default {list(default)} {base:.3f} ms", flush=True)
        for cfg in cands:
            rec = dict(which=which, knob=fn_name, config=list(cfg))
            if time.perf_counter() > deadline:
                rec["skipped"] = "budget spent"
                records.append(rec)
                continue
            try:
                with patched(fn_name, which, cfg):
                    got = causal_call(which, q, k, v, out, dout)
                    err = max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
                              for g, r in zip(got, ref))
                    ms = bench(lambda: causal_call(which, q, k, v, out, dout))
                rec.update(ms=ms, vs_default=base / ms, rel_diff=err)
                print(f"causal {which} {list(cfg)} {ms:.3f} ms {base / ms:.2f}x default, rel diff {err:.1e}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not launch is a result
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
        path.write_text(json.dumps(records, indent=1))
    return records


def run_sweep_suite(budget_s: float, log=print, *, out, causal: bool = False, **kw) -> list[dict]:
    """gpu_check's suites sweep_linear / sweep_linear_causal: the sweep's records (also written
    under out); [] without CUDA unless ``device`` is given (kw: the CPU smoke test's sizes)."""
    if not torch.cuda.is_available() and "device" not in kw:
        return []
    return (causal_sweep if causal else sweep)(Path(out), budget_s, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--causal", action="store_true", help="sweep the causal kernels' configs instead")
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=150.0)
    args = ap.parse_args()
    if args.compile_only:
        causal_compile_only() if args.causal else compile_only()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (causal_sweep if args.causal else sweep)(out, args.budget)


if __name__ == "__main__":
    main()

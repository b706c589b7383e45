"""One causal/non-causal linear-attention case on the GPU, forward and backward against float64,
each case in its own process (a kernel fault poisons the CUDA context of the process it runs in)
with CUDA_LAUNCH_BLOCKING=1, so a fault is reported at the launch that made it.

Written after the H100 run of 2026-11-27 (stop 19): test_gpu_head_dims_each_launch_config
[64-32-causal-fp16] raised "illegal memory access" (bf16 of the same shape passed).

    python bench/debug_linear_case.py                      # the driver: every case, 2 repeats
    python bench/debug_linear_case.py --one 64 32 1 fp16    # one case in this process
    python bench/debug_linear_case.py --one 64 32 1 fp16 --dkv-chunk 32   # with a config override
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

DEVICE = os.environ.get("DEBUG_DEVICE", "cuda")  # cpu: a check of this script only
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = [(64, 32, 1, "fp16"), (64, 32, 1, "bf16"), (40, 72, 1, "bf16"), (40, 72, 1, "fp16"),
         (32, 32, 1, "fp16"), (64, 64, 1, "fp16"), (128, 64, 1, "fp16"), (96, 96, 1, "fp16"),
         (64, 32, 0, "fp16"), (128, 32, 1, "fp16"), (128, 32, 1, "bf16")]


def one(dk: int, dv: int, causal: bool, dtype_name: str, dkv_chunk: int | None, dkv_bv: int | None,
        dq_chunk: int | None) -> int:
    import torch

    import attnlib
    from attnlib.reference import linear_reference
    from attnlib.testing import make_qkv
    from triton_kernels.linear import kernels

    if dkv_chunk or dkv_bv:
        base = kernels.dkv_config

        def dkv(*a, **k):
            bk, bv, w, c = base(*a, **k)
            return bk, dkv_bv or bv, w, dkv_chunk or c
        kernels.dkv_config = dkv
    if dq_chunk:
        base_q = kernels.dq_config

        def dq(*a, **k):
            bk, w, c = base_q(*a, **k)
            return bk, w, dq_chunk
        kernels.dq_config = dq
    def sync():
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    q, k, v = make_qkv(1, 4, 1999, dk, kv_heads=2, head_dim_v=dv, dtype=dtype, device=DEVICE,
                       requires_grad=True, seed=dk + dv)
    dk_pad = kernels.pad(dk)
    v_pad = kernels.causal_value_pad(dk_pad, dv)
    cfg = dict(fwd=kernels.fwd_config(dk_pad, dv, dtype), dq=kernels.dq_config(dk_pad, v_pad, dtype, "elu"),
               dkv=kernels.dkv_config(dk_pad, v_pad, dtype, "elu"), v_pad=v_pad)
    try:
        out = attnlib.linear_attention(q, k, v, causal=causal)
        sync()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = linear_reference(*leaves, causal=causal)
        dout = torch.randn_like(out)
        out.backward(dout)
        sync()
        ref.backward(dout.double())

        def rel(a, b):
            return float((a.double() - b).norm() / b.norm())
        errs = [rel(out, ref)] + [rel(t.grad, leaf.grad) for t, leaf in zip((q, k, v), leaves)]
        print(f"RESULT ok {cfg} rel out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
        return 0
    except Exception as e:  # noqa: BLE001
        frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
        inner = [f for f in frames if "kernels.py" in f or "attention.py" in f]
        print(f"RESULT FAULT {cfg} {type(e).__name__}: {str(e)[:120]} at {inner[-3:]}")
        return 1


def driver(repeats: int, extra: list[str], picks: list[int]) -> None:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for case in [CASES[i] for i in picks]:
        for r in range(repeats):
            args = [sys.executable, __file__, "--one", *map(str, case), *extra]
            t0 = time.perf_counter()
            p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            msg = lines[-1] if lines else f"no result (rc {p.returncode}): {p.stderr.strip()[-300:]}"
            print(f"dk {case[0]:>3} dv {case[1]:>3} {'causal' if case[2] else 'full  '} {case[3]} "
                  f"#{r} {time.perf_counter() - t0:5.1f}s {' '.join(extra)} {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4, metavar=("DK", "DV", "CAUSAL", "DTYPE"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dkv-chunk", type=int)
    ap.add_argument("--dkv-bv", type=int)
    ap.add_argument("--dq-chunk", type=int)
    ap.add_argument("--cases", default=",".join(map(str, range(len(CASES)))), help="indices into CASES")
    a = ap.parse_args()
    if a.one:
        dk, dv, causal, dt = a.one
        sys.exit(one(int(dk), int(dv), bool(int(causal)), dt, a.dkv_chunk, a.dkv_bv, a.dq_chunk))
    extra = [x for n, v in (("--dkv-chunk", a.dkv_chunk), ("--dkv-bv", a.dkv_bv), ("--dq-chunk", a.dq_chunk))
             if v for x in (n, str(v))]
    driver(a.repeats, extra, [int(i) for i in a.cases.split(",")])


if __name__ == "__main__":
    main()

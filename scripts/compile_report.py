"""Registers, spills and shared memory of every kernel as compiled for a GPU target, without one.

    python scripts/compile_report.py [--out bench/results/compile-report-sm90.md]

CUDA C++ (csrc/): each specialisation of attnlib.cuda.specs through nvcc --resource-usage, for
sm_80 and sm_90. Triton (triton_kernels/): each kernel through Triton's own sm_90 pipeline and
ptxas (tests/triton_sm90.py): the flash kernels' default H100 configs, the descriptor forward,
and every other family's launches at hd 64/128. These are compiler facts, not speed: they say
what fits and what spills, per specialisation (issue 4 asks for them in the benchmark notes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def cuda_rows() -> list[str]:
    from attnlib.cuda import specs, toolchain

    lines = ["## CUDA C++ (nvcc " + (toolchain.find_nvcc() or "not found") + ")", "",
             "| specialisation | arch | registers | spill bytes | static smem | dynamic smem |",
             "|---|---|---:|---:|---:|---:|"]
    if toolchain.find_nvcc() is None:
        return lines + ["", "nvcc not found: skipped", ""]
    for arch in ("80", "90"):
        for r in toolchain.compile_report(specs.ALL_SPECS, arch):
            lines.append(f"| {r['name']} | {r['arch']} | {r['registers']} | {r['spill_bytes'] or 0} | "
                         f"{r['static_smem_bytes']} | {r['dynamic_smem_bytes']} |")
    return lines + [""]


def triton_rows() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(REPO, "tests", "triton_sm90.py")
    lines = ["## Triton (sm_90, Triton's pipeline and bundled ptxas)", "",
             "The last column lists each TTGIR `async_wait`'s depth (copies left in flight; "
             "tests/triton_sm90.py async_waits): a streaming loop should show one above 0. "
             "*wgmma serialized*: ptxas's warning C7515 (a non-wgmma instruction defines a wgmma "
             "accumulator inside its pipeline stage, so each wgmma completes before what follows).", "",
             "| family | case / kernel | dtype | hd | causal | config (BM, BN, warps, stages) | shared bytes | "
             "registers | spill bytes | async waits | wgmma serialized |",
             "|---|---|---|---:|---|---|---:|---:|---:|---|---|"]
    for args in (["--suite", "flash"], ["--suite", "flash", "--tma"], ["--suite", "extra"]):
        out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, check=True).stdout
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            what = r.get("case", "") + (" " if r.get("case") else "") + str(r.get("kernel"))
            if "error" in r:
                lines.append(f"| {r.get('family')} | {what} | {r.get('dtype')} | {r.get('head_dim')} | "
                             f"{r.get('causal')} | {r.get('config')} | error: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {r.get('family')} | {what} | {r.get('dtype')} | {r.get('head_dim')} | "
                         f"{'yes' if r.get('causal') else 'no'} | {tuple(r.get('config', []))} | {r['shared']} | "
                         f"{r['registers']} | {r['spill_bytes']} | {r.get('async_waits', '')} | "
                         f"{'yes' if r.get('wgmma_serialized') else ''} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "compile-report-sm90.md"))
    ap.add_argument("--skip-triton", action="store_true")
    args = ap.parse_args()
    import triton
    text = ["# Kernel resources as compiled (no GPU involved)", "",
            f"{datetime.date.today()}; triton {triton.__version__}. H100 limits: 255 registers per thread, "
            "232448 bytes (227 KB) of shared memory per block. fp32 Triton launches serve accuracy and may "
            "spill; fp16/bf16 launches must not (tests/test_triton_sm90_compile.py).", ""]
    text += cuda_rows()
    if not args.skip_triton:
        text += triton_rows()
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

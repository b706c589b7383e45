"""Ahead-of-time compilation of Triton kernels for a GPU target on a machine without one.

triton.compile runs its whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled
ptxas) for a named target, so the CPU machine can check what the interpreter cannot: that a
kernel lowers for sm_90 with a given config, how much shared memory it takes, and whether ptxas
spills registers. Arguments are specialised the way the JIT specialises contiguous inputs:
unit last-dim strides are constants, pointers and other strides are multiples of 16.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

H100_SMEM_BYTES = 227 * 1024  # per thread block, opt-in maximum on sm_90
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

_TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
_FP32_POINTERS = ("LSE", "DELTA")


def _signature(fn, dtype: str, const: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = "*" + dtype
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.startswith("CU_"):
            sig[name] = "*i32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_sm90(kernel, dtype: str, constexprs: dict, block_m: int, block_n: int, num_warps: int,
                 num_stages: int) -> dict:
    """Compile for sm_90; returns shared memory bytes, registers and spill bytes per thread."""
    fn = getattr(kernel, "fn", kernel)  # under @triton.autotune, the JIT function
    const = dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
    for name in fn.arg_names:
        if name.startswith("stride") and name.endswith("d"):
            const[name] = 1
    sig = _signature(fn, dtype, const)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or (name.startswith("stride") and sig[name] != "constexpr")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"shared": compiled.metadata.shared, "registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) if spills else 0, "report": report}


def flash_cases():
    from attnlib.triton_kernels.flash import backward, configs, forward

    kernels = {"fwd": (forward.flash_fwd_kernel, configs.FWD_H100, "M"),
               "dkdv": (backward.flash_bwd_dkdv_kernel, configs.BWD_DKDV_H100, "N"),
               "dq": (backward.flash_bwd_dq_kernel, configs.BWD_DQ_H100, "M")}
    for which, (kernel, table, resident) in kernels.items():
        for head_dim in (64, 128, 256):
            for dtype, elem in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
                # the config the launcher uses with autotuning off (the first candidate)
                config = configs.candidates(table, head_dim, elem, resident)[0]
                for causal in (False, True):
                    yield which, kernel, dtype, head_dim, causal, config


def main() -> None:
    for which, kernel, dtype, head_dim, causal, (bm, bn, warps, stages) in flash_cases():
        const = dict(HEAD_DIM=head_dim, D_PAD=head_dim, CAUSAL=causal, VARLEN=False,
                     PREC="tf32x3" if dtype == "fp32" else "tf32")
        try:
            r = compile_sm90(kernel, dtype, const, bm, bn, warps, stages)
        except Exception as e:  # reported per case, the test fails on it
            r = {"error": f"{type(e).__name__}: {e}"}
        r.update(kernel=which, dtype=dtype, head_dim=head_dim, causal=causal, config=[bm, bn, warps, stages])
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

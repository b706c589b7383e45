"""Ahead-of-time compilation of Triton kernels for a GPU target on a machine without one.

triton.compile runs its whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled
ptxas) for a named target, so the CPU machine can check what the interpreter cannot: that a
kernel lowers for sm_90 with a given config, how much shared memory it takes, and whether ptxas
spills registers. Arguments are specialised the way the JIT specialises contiguous inputs:
unit last-dim strides are constants, pointers and other strides are multiples of 16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

H100_SMEM_BYTES = 227 * 1024  # per thread block, opt-in maximum on sm_90
SM90 = GPUTarget("cuda", 90, 32)


def _ptxas_for_sm90() -> str:
    """The ptxas Triton itself runs for sm_90: its bundled `ptxas` up to 3.8; from 3.9 the newer
    `ptxas-blackwell` (the plain one, CUDA 12.9, rejects the PTX 9.x that 3.9 emits)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


PTXAS = _ptxas_for_sm90()

_TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
_FP32_POINTERS = ("LSE", "DELTA", "DQ_ACC", "KEY_BIAS")


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


def compile_kernel(kernel, dtype: str, const: dict, num_warps: int, num_stages: int, target=None):
    """triton.compile for sm_90 (or target) with the JIT's specialisation of contiguous inputs
    (unit head-dim strides constant, pointers and other strides multiples of 16); returns the
    compiled kernel."""
    fn = getattr(kernel, "fn", kernel)  # under @triton.autotune, the JIT function
    const = dict(const)
    if "HAS_KEY_BIAS" in fn.arg_names:  # the flash kernels: no key bias unless the case says so
        const.setdefault("HAS_KEY_BIAS", False)
        const.setdefault("BIAS_PER_HEAD", False)
    for name in fn.arg_names:
        if name.startswith("stride") and name.endswith("d"):
            const[name] = 1
    sig = _signature(fn, dtype, const)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or (name.startswith("stride") and sig[name] != "constexpr")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=target or SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_sm90(kernel, dtype: str, constexprs: dict, block_m: int, block_n: int, num_warps: int,
                 num_stages: int) -> dict:
    """Compile for sm_90; returns _ptxas_report's record."""
    return _ptxas_report(compile_kernel(kernel, dtype, dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n),
                                        num_warps, num_stages))


def _ptxas_report(compiled) -> dict:
    """Shared memory, registers and spill bytes (ptxas), and the TTGIR's async_wait depths."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    # ptxas's C7515: wgmma instructions serialized (a non-wgmma instruction defines accumulator
    # registers inside the pipeline stage), so no wgmma overlaps the instructions after it
    return {"shared": compiled.metadata.shared, "registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) if spills else 0, "report": report,
            "async_waits": async_waits(compiled.asm["ttgir"]), "wgmma_serialized": "C7515" in report,
            "copy_bytes": copy_widths(compiled.asm["ptx"])}


def copy_widths(ptx: str) -> list[int]:
    """The distinct sizes (bytes) of the PTX's async global-to-shared copies: 16 where tiles copy in
    vectors; 4 or 2 where a tile is copied element by element (e.g. transposed for an operand
    layout the tensor cores need, or unaligned)."""
    copy = r"cp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)"
    return sorted({int(n, 0) for n in re.findall(copy, ptx)})


def flash_cases(all_candidates: bool = False, tma: bool = False):
    """(kernel name, kernel, dtype, head dim, causal, config, candidate index). By default the
    config each launcher uses with autotuning off (the first candidate) at head dims 64, 128 and
    256, fp16/bf16/fp32; with all_candidates, every fp16/bf16 candidate of every table, at the
    table's head dim and one it pads up to it (the head-dim tail masks take registers too).
    tma: the tensor-descriptor forward (forward_tma.py, ATTNLIB_FLASH_TMA=1) instead, fp16/bf16
    only (its configs have a fifth entry, warp_specialize)."""
    from attnlib.triton_kernels.flash import backward, configs, forward

    if tma:
        from attnlib.triton_kernels.flash import forward_tma
        kernels = {"fwd_tma": (forward_tma.flash_fwd_tma_kernel, configs.FWD_TMA_H100, "M")}
    else:
        kernels = {"fwd": (forward.flash_fwd_kernel, configs.FWD_H100, "M"),
                   "dkdv": (backward.flash_bwd_dkdv_kernel, configs.BWD_DKDV_H100, "N"),
                   "dkdv_dq": (backward.flash_bwd_dkdv_dq_kernel, configs.BWD_DKDV_DQ_H100, "N"),
                   "dq": (backward.flash_bwd_dq_kernel, configs.BWD_DQ_H100, "M")}
    for which, (kernel, table, resident) in kernels.items():
        if all_candidates:
            for key, cands in table.items():
                for head_dim in (key, key * 3 // 4):
                    for dtype in ("fp16", "bf16"):
                        for i, config in enumerate(cands):
                            for causal in (False, True):
                                yield which, kernel, dtype, head_dim, causal, config, i
            continue
        for head_dim in (64, 128, 256):
            if tma:
                for dtype in ("fp16", "bf16"):
                    config = configs.tma_candidates(head_dim)[0]
                    for causal in (False, True):
                        yield which, kernel, dtype, head_dim, causal, config, 0
                continue
            for dtype, elem in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
                # the config the launcher uses with autotuning off (the first candidate)
                config = configs.candidates(table, head_dim, elem, resident)[0]
                for causal in (False, True):
                    yield which, kernel, dtype, head_dim, causal, config, 0


# cards with less opt-in shared memory per block than an H100: A100 (sm_80) and the sm_89 cards
# (RTX 4090, L40, L4); sm_86 (RTX 3090, A6000) has sm_89's 99 KB
SMALL_SMEM_TARGETS = {"sm_80": (GPUTarget("cuda", 80, 32), 166912), "sm_89": (GPUTarget("cuda", 89, 32), 101376)}


def small_smem_records():
    """The flash kernels' first candidate (what a launch takes with autotuning off) for each card
    of SMALL_SMEM_TARGETS, head dims 64 / 128 / 256, 16- and 32-bit, compiled for that card: the
    shared memory Triton allocates, against the card's limit."""
    from attnlib.triton_kernels.flash import backward, configs, forward

    kernels = {"fwd": (forward.flash_fwd_kernel, configs.FWD_H100, "M", True),
               "dkdv": (backward.flash_bwd_dkdv_kernel, configs.BWD_DKDV_H100, "N", False),
               "dkdv_dq": (backward.flash_bwd_dkdv_dq_kernel, configs.BWD_DKDV_DQ_H100, "N", False),
               "dq": (backward.flash_bwd_dq_kernel, configs.BWD_DQ_H100, "M", False)}
    for arch, (target, limit) in SMALL_SMEM_TARGETS.items():
        for which, (kernel, table, resident, exact) in kernels.items():
            for head_dim in (64, 128, 256):
                for dtype, elem in (("fp16", 2), ("fp32", 4)):
                    if which == "dkdv_dq" and elem == 4:
                        continue  # flash_bwd runs the deterministic kernels there (backward._atomic_fits)
                    config = configs.candidates(table, head_dim, elem, resident, limit if exact else None, limit)[0]
                    bm, bn, warps, stages = config
                    const = dict(HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), CAUSAL=False,
                                 VARLEN=False, PREC="tf32x3" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn)
                    if which.startswith("dkdv"):
                        const["ATOMIC_DQ"] = which == "dkdv_dq"
                    r = dict(arch=arch, limit=limit, kernel=which, dtype=dtype, head_dim=head_dim, config=list(config))
                    try:
                        r["shared"] = compile_kernel(kernel, dtype, const, warps, stages, target=target).metadata.shared
                    except Exception as e:  # reported per case, the test fails on it
                        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    yield r
        yield from _block_sparse_small_smem(arch, target, limit)


def _block_sparse_small_smem(arch: str, target, limit: int):
    """The block-sparse forward and backward launchers at hd128, mask blocks (64, 64) and (128, 64),
    fp16, compiled for the card with its shared memory limit as the launchers read it."""
    from unittest import mock

    import torch
    from attnlib.triton_kernels.block_sparse import backward, forward
    from attnlib.triton_kernels.flash import configs

    for blk in ((64, 64), (128, 64)):
        b, h, s, d = 1, 2, 256, 128
        q, k, v, o, do = (_t(b, h, s, d, dtype=torch.float16) for _ in range(5))
        lse = torch.zeros(b, h, s)
        mq, mk = s // blk[0], s // blk[1]
        num = torch.full((1, 1, mq), mk, dtype=torch.int32)
        idx = torch.arange(mk, dtype=torch.int32).expand(1, 1, mq, mk).contiguous()
        cnum = torch.full((1, 1, mk), mq, dtype=torch.int32)
        cidx = torch.arange(mq, dtype=torch.int32).expand(1, 1, mk, mq).contiguous()
        records: list = []
        shared = lambda compiled: {"shared": compiled.metadata.shared}  # noqa: E731
        with mock.patch.object(configs, "device_smem_limit", lambda t: limit), \
                compile_launches(records, target=target, report=shared):
            forward.block_sparse_fwd(q, k, v, o, lse, num, idx, block_size=blk, causal=False, scale=d ** -0.5)
            backward.block_sparse_bwd(do, q, k, v, o, lse, (num, idx), (cnum, cidx), block_size=blk, causal=False,
                                      scale=d ** -0.5)
        for r in records:
            yield dict(r, arch=arch, limit=limit, dtype="fp16", head_dim=d, block=list(blk))


def async_waits(ttgir: str) -> list[int]:
    """The `num` of every ttg.async_wait in a kernel's TTGIR: how many async copies may stay in
    flight at that wait. A pipelined loop's wait keeps num_stages - 2 (or more) tiles' copies
    in flight; one that waits with num = 0 at the top of each iteration overlaps no load with
    compute (what a block index loaded inside the loop did to the block-sparse loops)."""
    return [int(n) for n in re.findall(r"ttg\.async_wait[^{]*\{num = (\d+)", ttgir)]


def run_uninterpreted(args: list, timeout: float) -> "subprocess.CompletedProcess":
    """`python *args` with TRITON_INTERPRET taken out of the environment (triton.compile needs
    triton.jit out of interpreter mode, which the test process is in), its output captured as text.
    Asserts it exited 0 (the failure shows its stderr's tail) and returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def json_lines(text: str) -> list[dict]:
    """The records a compile subprocess printed: each stdout line that starts with '{', parsed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@contextlib.contextmanager
def compile_launches(records: list, target=None, report=None):
    """Within: a Triton launch compiles for sm_90 instead of running. The arguments are the
    launcher's own (CPU tensors, its block sizes, warps and stages), specialised by the JIT's
    binder for the sm_90 backend; an autotuned kernel takes its first pruned candidate (its config
    with autotuning off). Kernels do not run, so their outputs are garbage: fine for shapes."""
    from unittest import mock

    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = target or SM90
    report = report or _ptxas_report
    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.update(debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, spec, _ = create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        options, sig, const, attrs = self._pack_args(backend, kwargs, bound, spec, None)
        blocks = {k[0] if isinstance(k, tuple) else k: v for k, v in const.items()}
        config = [blocks[n] for n in self.arg_names if n.startswith("BLOCK") and (n,) in const]
        try:
            r = report(triton.compile(ASTSource(self, sig, const, attrs), target=target, options=options.__dict__))
        except Exception as e:  # reported per case, the test fails on it
            r = {"error": f"{type(e).__name__}: {e}"}
        r.update(kernel=self.__name__, config=config + [options.num_warps, options.num_stages])
        records.append(r)

    def tune(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        return self.fn.run(*args, **kwargs, **self.prune_configs(kwargs)[0].all_kwargs())

    with mock.patch.object(JITFunction, "run", run), mock.patch.object(Autotuner, "run", tune):
        yield


def _t(*shape, dtype):
    import torch
    return torch.randn(*shape).to(dtype)


def _block_sparse(which, dtype, d, causal):
    import torch
    from attnlib.triton_kernels.block_sparse import backward, forward, predict
    b, h, s, blk = 1, 2, 256, 64  # the API's default block size (64, 64)
    q, k, v, o, do = (_t(b, h, s, d, dtype=dtype) for _ in range(5))
    lse = torch.zeros(b, h, s)
    m = s // blk
    num = torch.full((1, 1, m), m, dtype=torch.int32)
    idx = torch.arange(m, dtype=torch.int32).expand(1, 1, m, m).contiguous()
    if which == "fwd":
        forward.block_sparse_fwd(q, k, v, o, lse, num, idx, block_size=(blk, blk), causal=causal, scale=d ** -0.5)
    elif which == "bwd":
        backward.block_sparse_bwd(do, q, k, v, o, lse, (num, idx), (num, idx), block_size=(blk, blk), causal=causal,
                                  scale=d ** -0.5)
    else:
        pq, pk = predict.mean_pool(q, blk), predict.mean_pool(k, blk)
        predict.block_probabilities(pq, pk, block_size=(blk, blk), seq_q=s, seq_k=s, scale=d ** -0.5, causal=causal)


def _sage(pv, dtype, d, causal):
    """The forward with smoothing (K: block sums, their fold, quantization; V likewise for fp8),
    then K's quantization without smoothing (the same kernel's other specialisation)."""
    from attnlib.triton_kernels.sage.forward import sage_forward
    from attnlib.triton_kernels.sage.quant import quantize_k
    q, k, v = (_t(1, 2, 256, d, dtype=dtype) for _ in range(3))
    sage_forward(q, k, v, causal=causal, scale=d ** -0.5, smooth_k=True, pv=pv, q_block=128, k_block=64,
                 return_lse=True)
    quantize_k(k, 64, smooth=False)


def _linear(which, dtype, d, causal):
    """Long enough (2048 rows, 64 programs) for several causal super-chunks: every kernel launches."""
    from attnlib.triton_kernels.linear.attention import linear_bwd, linear_fwd
    q, k, v, o, do = (_t(1, 2, 2048, d, dtype=dtype) for _ in range(5))
    if which == "fwdzdot":  # the non-causal state kernel with z by a product (kernels.STATE_Z_DOT)
        from attnlib.triton_kernels.linear import kernels
        kernels.state(k, v, "elu", z_dot=True)
    elif which == "fwd":
        linear_fwd(q, k, v, o, feature="elu", causal=causal, eps=1e-6)
    else:
        linear_bwd(do, q, k, v, o, feature="elu", causal=causal, eps=1e-6)


def _sla(which, dtype, d, causal):
    """"fwd": the forward with its projection; "bwd": that forward keeping lse, the backward from
    it (O_l-only forward, delta kernel), the re-walking backward, each on the row states (the
    default) and on the per-tile aggregation (ATTNLIB_SLA_ROW_STATES=0): every SLA kernel."""
    from unittest import mock

    import torch
    from attnlib.triton_kernels.sla.attention import sla_backward, sla_forward
    q, k, v, do = (_t(1, 2, 256, d, dtype=dtype) for _ in range(4))
    kw = dict(critical=0.25, negligible=0.25, block_size=(64, 64), feature="softmax", scale=d ** -0.5, causal=causal)
    w, b = _t(d, d, dtype=dtype), _t(d, dtype=dtype)
    out, lse = sla_forward(q, k, v, torch.empty_like(q), w, b, with_lse=True, **kw)
    if d == 128:  # every key-block candidate the GPU autotuner may pick
        from attnlib.triton_kernels.sla.classify import KEY_BLOCK_CANDIDATES, key_blocks
        from attnlib.triton_kernels.sla.row_states import MASKED_SUM_CANDIDATES, _masked_sum
        for config in KEY_BLOCK_CANDIDATES:
            key_blocks(k, v, block_n=64, feature="softmax", linear=True, config=config)
        classes = torch.zeros(1, 2, 4, 4, dtype=torch.int8)
        for config in MASKED_SUM_CANDIDATES:  # and every masked-sum candidate
            _masked_sum(classes, torch.randn(1, 2, 4, d * d), "tf32", 2, transpose=False, config=config)
    if which == "fwd":
        with mock.patch.dict(os.environ, {"ATTNLIB_SLA_ROW_STATES": "0"}):
            sla_forward(q, k, v, torch.empty_like(q), w, b, with_lse=True, **kw)
    if which == "bwd":
        sla_backward(do, q, k, v, w, b, out=out, lse=lse, **kw)
        sla_backward(do, q, k, v, w, None, **kw)
        with mock.patch.dict(os.environ, {"ATTNLIB_SLA_ROW_STATES": "0"}):  # the per-tile path
            sla_backward(do, q, k, v, w, b, out=out, lse=lse, **kw)


def _asymrnr(which, dtype, d, causal):
    import torch
    from attnlib.triton_kernels.asymrnr import gather, match
    x = _t(1, 2, 256, d, dtype=dtype)
    idx = torch.randint(0, 64, (1, 2, 256))
    gather.gather_rows(x, idx[:, :, :64])
    gather.merge_rows(x, idx, 64)
    src, dst = torch.arange(0, 256, 2), torch.arange(1, 256, 2)
    match.match_fwd(x, src, dst, "cosine")
    if x.element_size() == 2:  # every candidate the GPU autotuner may pick must compile without spills
        for config in match.CANDIDATES_16BIT:
            match.match_fwd(x, src, dst, "euclidean", config=config)


DTYPES = ("fp16", "bf16")
# (family, entry, dtypes, causal variants); every head dim 64 and 128. Non-causal launches the
# same code minus the diagonal masking, so it is compiled only where a kernel differs more.
EXTRA = [("block_sparse", w, DTYPES + ("fp32",), (False, True)) for w in ("fwd", "bwd")] + [
    ("block_sparse", "predict", ("bf16",), (True,)),
    *[("sage", pv, DTYPES, (True,)) for pv in ("fp16", "fp16_accum", "fp8")],
    *[("linear", w, DTYPES + ("fp32",), (False, True)) for w in ("fwd", "bwd")],
    ("linear", "fwdzdot", DTYPES, (False,)),
    ("sla", "bwd", DTYPES, (True,)),
    ("asymrnr", "all", DTYPES + ("fp32",), (False,)),
]
RUNNERS = {"block_sparse": _block_sparse, "sage": _sage, "linear": _linear, "sla": _sla, "asymrnr": _asymrnr}


def extra_cases():
    for family, entry, dtypes, causals in EXTRA:
        for d in (64, 128):
            for dtype in dtypes:
                for causal in causals:
                    yield f"{family}-{entry}-{'causal' if causal else 'full'}-hd{d}-{dtype}", (family, entry, dtype,
                                                                                               d, causal)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=("all", "flash", "extra", "small-smem"), default="all")
    parser.add_argument("--only", help="run only the extra cases whose id is one of these (comma-separated)")
    parser.add_argument("--all-candidates", action="store_true",
                        help="flash: every fp16/bf16 autotune candidate, not only the default config")
    parser.add_argument("--varlen", action="store_true", help="flash: compile the packed-sequence (varlen) variants")
    parser.add_argument("--key-bias", action="store_true", help="flash: compile the variants with a key bias "
                        "(the option key_mask, HAS_KEY_BIAS)")
    parser.add_argument("--bias-per-head", action="store_true", help="flash: with --key-bias, a bias per query "
                        "head (BIAS_PER_HEAD)")
    parser.add_argument("--tma", action="store_true",
                        help="flash: compile the tensor-descriptor forward (ATTNLIB_FLASH_TMA=1) instead of the "
                             "default kernels; records also count TMA copies and wgmma in the PTX")
    args = parser.parse_args()
    suite = args.suite
    if suite == "small-smem":
        for r in small_smem_records():
            print(json.dumps(r), flush=True)
        return
    only = set(args.only.split(",")) if args.only else None
    if suite in ("all", "extra"):
        import torch
        torch.manual_seed(0)
        for case, (family, entry, dtype, d, causal) in extra_cases():
            if only is not None and case not in only:
                continue
            records = []
            with compile_launches(records):
                RUNNERS[family](entry, getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]),
                                d, causal)
            seen = set()
            for r in records:  # a launcher may launch one kernel twice with the same specialisation
                key = (r["kernel"], r.get("shared"), r.get("registers"), str(r["config"]))
                if key not in seen:
                    seen.add(key)
                    r.update(family=family, case=case, dtype=dtype, head_dim=d, causal=causal)
                    print(json.dumps(r), flush=True)
    if suite not in ("all", "flash"):
        return
    from attnlib.triton_kernels.flash.configs import padded_head_dim

    def compile_tma(kernel, dtype, const, config):
        """compile_sm90 for the descriptor forward, plus what its PTX shows: TMA bulk-tensor
        loads and stores, wgmma, and whether Triton's warp specialization partitioned it."""
        bm, bn, warps, stages, ws = config
        compiled = compile_kernel(kernel, dtype, dict(const, WARP_SPEC=ws, BLOCK_M=bm, BLOCK_N=bn), warps, stages)
        ptx = compiled.asm["ptx"]
        r = _ptxas_report(compiled)
        r.update(tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cluster|cta)\.global", ptx)),
                 tma_stores=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
                 wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), ld_global=len(re.findall(r"ld\.global", ptx)),
                 total_warps=compiled.metadata.num_warps, setmaxnreg=len(re.findall(r"setmaxnreg", ptx)))
        return r

    for which, kernel, dtype, head_dim, causal, config, i in flash_cases(args.all_candidates, args.tma):
        const = dict(HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), CAUSAL=causal)
        try:
            if args.tma:
                r = compile_tma(kernel, dtype, const, config)
            else:
                bm, bn, warps, stages = config
                const.update(VARLEN=args.varlen, PREC="tf32x3" if dtype == "fp32" else "tf32",
                             HAS_KEY_BIAS=args.key_bias, BIAS_PER_HEAD=args.key_bias and args.bias_per_head)
                if which.startswith("dkdv"):
                    const["ATOMIC_DQ"] = which == "dkdv_dq"
                r = compile_sm90(kernel, dtype, const, bm, bn, warps, stages)
        except Exception as e:  # reported per case, the test fails on it
            r = {"error": f"{type(e).__name__}: {e}"}
        r.update(family="flash", kernel=which, dtype=dtype, head_dim=head_dim, causal=causal, config=list(config))
        if args.all_candidates:
            r.update(candidate=i, varlen=args.varlen)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

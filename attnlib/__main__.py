"""Command line: python -m attnlib info | demo | bench."""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path


def kernel_source_dirs() -> dict[str, str]:
    """Where the installed package finds its kernel sources."""
    import attnlib

    out = {"attnlib": str(Path(attnlib.__file__).parent)}
    for name in ("attnlib._csrc", "attnlib.triton_kernels"):
        spec = importlib.util.find_spec(name)
        locs = list(spec.submodule_search_locations or []) if spec else []
        out[name] = locs[0] if locs else "(missing)"
    return out


def cmd_info(_args) -> int:
    import torch

    import attnlib

    print(f"attnlib {attnlib.__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for mod in ("triton", "cupy", "numpy"):
        spec = importlib.util.find_spec(mod)
        ver = "not installed"
        if spec is not None:
            try:
                ver = importlib.import_module(mod).__version__
            except Exception as e:  # a broken install is worth showing, not crashing on
                ver = f"import failed: {e}"
        print(f"{mod}: {ver}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
          f"ATTNLIB_BACKEND={os.environ.get('ATTNLIB_BACKEND', '')!r}")
    print("kernel sources:")
    for k, v in kernel_source_dirs().items():
        print(f"  {k}: {v}")
    print("kernels:")
    for k in attnlib.available_kernels():
        state = "available" if k["available"] else "unavailable: " + "; ".join(k["reasons"])
        print(f"  {k['method']:<13} {k['backend']:<7} {k['name']:<30} prio {k['priority']:>3}  {state}")
    return 0


def _demo_cases(device, dtype):
    """(method, options, float64 reference function) for a small problem per method."""
    import torch

    from attnlib import reference as ref
    from attnlib.asymrnr.module import asymrnr_attention

    bq = bk = 64
    seq = 256
    mq = mk = seq // bq
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 1, mq, mk, generator=gen) < 0.5
    mask[..., torch.arange(mq), torch.arange(mk)] = True  # keep the diagonal so no row is empty
    mask = mask.to(device)
    return [
        ("flash", {}, lambda q, k, v: ref.flash_reference(q, k, v)),
        ("flash", {"causal": True}, lambda q, k, v: ref.flash_reference(q, k, v, causal=True)),
        # sage is judged against exact attention: that is its accuracy contract
        ("sage", {}, lambda q, k, v: ref.flash_reference(q, k, v)),
        ("block_sparse", {"block_mask": mask, "block_size": (bq, bk)},
         lambda q, k, v: ref.block_sparse_reference(q, k, v, mask, block_size=(bq, bk))),
        ("linear", {}, lambda q, k, v: ref.linear_reference(q, k, v)),
        ("linear", {"causal": True}, lambda q, k, v: ref.linear_reference(q, k, v, causal=True)),
        ("sla", {}, lambda q, k, v: ref.sla_reference(q, k, v)),
        # asymrnr against its own pipeline in float64 (its accuracy against full attention
        # depends on how redundant the tokens are: see bench/bench_asymrnr.py)
        ("asymrnr", {"grid": (4, 8, 8)},
         lambda q, k, v: asymrnr_attention(q, k, v, grid=(4, 8, 8), backend="torch")),
    ], seq


def failure_details(lines: list[str]) -> list[str]:
    """The lines of a dispatch error (NoKernelError) worth a line each under a failed method: why
    each kernel was rejected and the hint. The first line alone ("no attnlib kernel can run this
    call.") does not say why, e.g. --backend triton on a CPU without TRITON_INTERPRET=1."""
    out, kernel = [], None
    for line in lines:
        text = line.strip()
        if text.startswith("rejected ") and text.endswith(":"):
            kernel = text[len("rejected "):-1]
        elif text.startswith("- ") and kernel is not None:
            out.append(f"{kernel}: {text[2:]}")
        elif text.startswith("hint:"):
            out.append(text)
    return out


def cmd_demo(args) -> int:
    import torch

    import attnlib
    from attnlib.testing import make_qkv, metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cases, seq = _demo_cases(device, dtype)
    heads, head_dim = 4, 64
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    try:
        backend = attnlib.dispatch.effective_backend(args.backend)  # --backend, else ATTNLIB_BACKEND
    except ValueError as e:  # a bad ATTNLIB_BACKEND: one line, not a traceback or 8 failures
        print(f"python -m attnlib demo: {e}", file=sys.stderr)
        return 2
    print(f"attnlib demo on {device} ({name}), {dtype}, backend {backend}, batch 1, {heads} heads, seq {seq}, "
          f"head_dim {head_dim}")
    print(f"{'method':<22} {'kernel':<30} {'max err':>10} {'cos sim':>10} {'time ms':>9}")
    failures = 0
    for method, opts, ref_fn in cases:
        q, k, v = make_qkv(1, heads, seq, head_dim, dtype=dtype, device=device, seed=1, k_bias=1.0)
        label = method + (" causal" if opts.get("causal") else "")
        try:
            inp = attnlib.api.build_inputs(q, k, v, method=method, **opts)
            kernel = attnlib.dispatch.select(inp, args.backend)
            out = attnlib.attention(q, k, v, method=method, backend=args.backend, **opts)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                out = attnlib.attention(q, k, v, method=method, backend=args.backend, **opts)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3 / reps
            m = metrics(out, ref_fn(q.double(), k.double(), v.double()))
            print(f"{label:<22} {kernel.name:<30} {m['max_abs']:>10.2e} {m['cos_sim']:>10.6f} {ms:>9.2f}")
            if not m["finite"] or m["cos_sim"] < 0.99:
                failures += 1
        except BrokenPipeError:  # the reader went away (| head): nothing more to say
            raise
        except Exception as e:  # the demo reports every method, it does not stop at the first problem
            failures += 1
            lines = str(e).splitlines() or [""]
            print(f"{label:<22} FAILED: {type(e).__name__}: {lines[0]}")
            for line in failure_details(lines[1:]):
                print(f"{'':<24}{line}")
    print("all methods ran" if not failures else f"{failures} method(s) failed or were inaccurate")
    return 1 if failures else 0


def cmd_bench(args) -> int:
    return run_bench(args.rest)


def run_bench(rest: list[str]) -> int:
    """bench/runner.py's command line with every argument after "bench" (its own options and
    --help): argparse's REMAINDER does not take arguments that start with "-", so the top-level
    parser never sees them."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "runner.py").exists():
        print("python -m attnlib bench needs a source checkout (the bench/ folder is not installed)")
        return 2
    sys.path.insert(0, str(repo))
    from bench.runner import main_cli

    return main_cli(list(rest))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnlib", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, kernel sources and every kernel's availability")
    d = sub.add_parser("demo", help="every method on a small problem, checked against float64")
    d.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "torch"))
    b = sub.add_parser("bench", help="micro-benchmarks (from a source checkout)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # its options are bench/runner.py's, parsed there
        return run_bench(argv[1:])
    args = p.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench}[args.cmd](args)


def run_main() -> int:
    """main() for the command line: output piped into a reader that stops early (``| head``) ends
    quietly with status 141, as other command-line tools do, not with a BrokenPipeError traceback."""
    try:
        return main()
    except BrokenPipeError:
        # stdout's buffered rest would fail again at exit: point it at devnull first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(run_main())

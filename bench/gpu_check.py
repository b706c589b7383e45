"""The one command a GPU task runs: environment, GPU tests, flash benchmarks, results by card.

    pip install --no-deps --no-build-isolation -e .
    python bench/gpu_check.py            # results under $OUT, else ./gpu-results/

On a lent device machine (no network), the baselines sageattention 1.0.6 and fla-core travel as
wheels: run ``scripts/fetch_gpu_wheels.sh`` here, then carry ``.whl`` and start the command with
``python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
export PYTHONPATH=/tmp/site;`` (without them those providers are recorded as skipped, with why).

Steps, each bounded in time so the whole run ends inside about 8 minutes on an H100:

1. print the environment (GPU, driver, CUDA, torch / triton / cupy versions, SM count, kernels);
2. ``pytest -m gpu -v tests/`` in a subprocess (xdist workers when pytest-xdist is there, each
   kernel's default config: autotuning off), output teed to ``pytest-gpu.log``; at most
   ``--pytest-budget`` seconds (killed after); failures are counted and the run goes on;
   then compute-sanitizer memcheck and racecheck on a small launch of the default 128-row CUDA
   flash tile (``sanitizer.log``);
3. the flash benchmarks (:func:`bench.bench_flash.run_flash_suite`, quick list) with a time
   budget: cases past it are recorded as skipped, and say so;
   then the AsymRnR suite (:func:`bench.bench_asymrnr.run_asymrnr_suite`: accuracy vs random
   dropping, time vs full flash at the Wan2.1-1.3B shape) in its own budget, written to
   ``asymrnr.json`` / ``asymrnr.md``; then the sage suite (:func:`bench.bench_sage.run_sage_suite`,
   end-to-end TOPS with quantization, cos / rel L1 per row) in ``SAGE_BUDGET_S``; then the host
   time per call (:mod:`bench.bench_overhead`), block_sparse, linear and sla
   (:func:`bench.bench_sla.run_sla_suite`: Wan2.1-1.3B fwd / bwd vs dense flash and SDPA) in small
   budgets, each to its own JSON file (``--suites`` picks which run); last the kernel profile
   (:mod:`bench.profile_gpu`: eager vs CUDA-graph time and the kernels of each case, profile.md);
   Launch-config sweeps (``SWEEPS``) run only when ``--suites`` names them:
   ``--skip-tests --suites sweep_linear,sweep_linear_causal,sweep_block_sparse``;
4. ``results.json`` (environment, test counts, every record) and ``summary.md`` (a markdown
   table with the speed of each attnlib provider relative to the fastest SDPA backend), written
   after every measurement so a run cut short still leaves its numbers, then copied into
   ``bench/results/<gpu-name-slug>/``.

On a lent device machine only $OUT comes back; afterwards, on the development machine,
``python bench/gpu_check.py --import <fetched folder>`` files those results under
``bench/results/<gpu-name-slug>/``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import runner  # noqa: E402

TOTAL_TARGET_S = 385.0      # pytest + sanitizer + flash benchmarks end by here (one measurement may overrun)
# Budgets, in the order the steps run; each later step also stops at its END_S mark so the
# whole script stays inside about 8 minutes (470 s of steps plus start-up and writing).
PYTEST_BUDGET_S = 140.0
SANITIZER_BUDGET_S = 40.0   # memcheck + racecheck on a small launch of the 128-row CUDA flash tile
BENCH_BUDGET_S = 100.0
ASYMRNR_BUDGET_S = 30.0     # AsymRnR accuracy + Wan2.1 timing; never past ASYMRNR_END_S into the run
ASYMRNR_END_S = 325.0
SAGE_BUDGET_S = 40.0        # sage end to end vs SDPA / flash / sageattention 1.0.6; never past SAGE_END_S
SAGE_END_S = 370.0
SPARSE_LINEAR_END_S = 425.0  # block_sparse (30 s) and linear (20 s) share what is left up to here
SLA_END_S = 470.0            # sla (issue 7: Wan2.1-1.3B fwd/bwd vs flash / SDPA), 40 s, never past this mark
PROFILE_END_S = 505.0        # bench/profile_gpu.py: eager vs CUDA graph and the kernels of each case, 35 s
PER_TEST_TIMEOUT_S = 120
SUITES = ("flash", "cuda_compile", "asymrnr", "sage", "overhead", "block_sparse", "linear", "sla", "profile")
# launch-config sweeps, run only when named in --suites (each to its own JSON beside the rest):
# bench/sweep_linear.py (non-causal, then --causal) and bench/sweep_block_sparse.py
SWEEPS = ("sweep_linear", "sweep_linear_causal", "sweep_block_sparse")
SWEEP_END_S = 540.0
MAX_FAILURES = 40            # keep going past failures: one run must show as many of them as it can
RESULT_FILES = ("results.json", "summary.md", "pytest-gpu.log", "pytest-failures.log", "sanitizer.log",
                "asymrnr.json", "asymrnr.md", "overhead.json", "block_sparse.json", "linear.json", "sla.json",
                "cuda_compile.json", "profile.md", "profile.json", "host_profile.md")


def say(*args) -> None:
    print(*args, flush=True)


def output_dir() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else REPO / "gpu-results"


# ----------------------------------------------------------------------------------------------
def print_environment(env: dict) -> None:
    say("== environment")
    for key in ("gpu", "compute_capability", "sm_count", "gpu_memory_gib", "l2_cache_mib", "driver",
                "sm_clock_max", "power_limit",
                "torch", "torch_cuda", "cudnn", "triton", "cupy", "attnlib", "python", "platform", "time"):
        say(f"  {key:<18} {env.get(key)}")
    try:
        import attnlib
        for k in attnlib.available_kernels():
            if k["method"] == "flash":
                why = "" if k["available"] else "  (" + "; ".join(k["reasons"]) + ")"
                say(f"  kernel {k['name']:<24} backend={k['backend']:<7} "
                    f"{'available' if k['available'] else 'unavailable'}{why}")
    except Exception as e:  # noqa: BLE001
        say(f"  attnlib kernels: could not list ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


_VERBOSE_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_OUTCOME_WORD = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error",
                 "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest_counts(text: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 1 failed, 2 skipped in 4.2s'); when the
    run was killed before it (no summary), counted from the verbose per-test lines, with
    ``incomplete: 1``."""
    for line in reversed(text.splitlines()):
        found = _COUNT.findall(line)
        if found and re.search(r" in [\d.]+s", line):
            counts: dict = {}
            for n, word in found:
                word = "error" if word.startswith("error") else word
                counts[word] = counts.get(word, 0) + int(n)
            return counts
    counts = {}
    for line in text.splitlines():
        if "::" not in line:
            continue
        m = _VERBOSE_OUTCOME.search(line)
        if m:
            word = _OUTCOME_WORD[m.group(1)]
            counts[word] = counts.get(word, 0) + 1
    if counts:
        counts["incomplete"] = 1
    return counts


def xdist_workers() -> int:
    """pytest-xdist workers for the GPU tests (0: run in one process). The GPU tests are small;
    their time goes to compiling kernels (Triton, NVRTC) on the CPU, which parallelises across
    processes, and the disk caches are safe to share between them."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def test_environment(out: Path) -> dict:
    """The GPU tests check correctness with each kernel's default config (autotuning off: it
    compiles and times every candidate, which costs minutes and tests nothing more); the
    benchmarks run with autotuning and compare each autotuned output with SDPA (runner.check_output)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", ATTNLIB_FLASH_AUTOTUNE="0", ATTNLIB_SAGE_AUTOTUNE="0",
                ATTNLIB_SLA_AUTOTUNE="0", ATTNLIB_ASYMRNR_AUTOTUNE="0",
                ATTNLIB_FAILURE_LOG=str(out / "pytest-failures.log"),
                ATTNLIB_TEST_INTERLEAVE="1")  # round robin over files (tests/conftest.py): a cut-off run covers every file


def run_pytest(out: Path, budget_s: float, extra_args: Sequence[str] = (), paths: Sequence[str] = ("tests/",)) -> dict:
    """``pytest -m gpu`` on ``paths`` (verbose, spread over xdist workers, at most MAX_FAILURES
    failures) with its output teed to out/pytest-gpu.log; killed after ``budget_s`` seconds."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", f"--maxfail={MAX_FAILURES}", *paths,
           "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    workers = xdist_workers()
    if workers:
        cmd += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    cmd += list(extra_args)
    say("== tests: " + " ".join(cmd[2:]))
    log_path = out / "pytest-gpu.log"
    (out / "pytest-failures.log").unlink(missing_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    env = test_environment(out)
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env, start_new_session=True)

        def tee():
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                sys.stdout.write("  | " + line)
                sys.stdout.flush()
        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the pytest process group this script started
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n[gpu_check] pytest stopped after its budget of {budget_s:.0f} s\n")
    text = "".join(lines)
    result = {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "timed_out": timed_out,
              "seconds": round(time.perf_counter() - t0, 1), "counts": parse_pytest_counts(text)}
    say(f"== tests done: {describe_pytest(result)}")
    return result


# A small launch of the CUDA flash forward (the default 128-row tile), run under compute-sanitizer.
SANITIZER_SNIPPET = """
import torch, attnlib
from attnlib.testing import make_qkv
for hd, causal, dt in ((128, True, torch.bfloat16), (64, False, torch.float16)):
    q, k, v = make_qkv(1, 2, 200, hd, kv_heads=1, seq_k=150, dtype=dt, device="cuda", seed=1)
    attnlib.flash_attention(q, k, v, causal=causal, backend="cuda")
torch.cuda.synchronize()
print("sanitizer snippet ran")
"""
SANITIZER_TOOLS = ("memcheck", "racecheck")


def run_sanitizer(out: Path, budget_s: float) -> list[str]:
    """compute-sanitizer memcheck and racecheck on the 128-row CUDA flash tile (the default):
    notes for the summary, the full output in sanitizer.log."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return ["compute-sanitizer not found: sanitizer step skipped"]
    notes = []
    t0 = time.perf_counter()
    env = dict(os.environ, ATTNLIB_CUDA_FLASH_TILE_M="128", ATTNLIB_CUDA_LINEINFO="1")
    with open(out / "sanitizer.log", "w") as log:
        for tool in SANITIZER_TOOLS:
            left = budget_s - (time.perf_counter() - t0)
            if left < 10:
                notes.append(f"sanitizer {tool}: skipped, budget spent")
                continue
            cmd = [exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", SANITIZER_SNIPPET]
            log.write(f"==== ATTNLIB_CUDA_FLASH_TILE_M=128 {' '.join(cmd[:5])} python -c <snippet>\n")
            log.flush()
            try:
                r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=left)
                log.write(r.stdout + r.stderr + "\n")
                errs = re.search(r"ERROR SUMMARY: (\d+) error", r.stdout + r.stderr)
                notes.append(f"sanitizer {tool} (flash-cuda 128-row tile): exit {r.returncode}, "
                             f"{errs.group(0) if errs else 'no summary'}")
            except subprocess.TimeoutExpired:
                notes.append(f"sanitizer {tool}: timed out after {left:.0f} s")
            say("   " + notes[-1])
    return notes


def describe_pytest(p: Optional[dict]) -> str:
    if not p:
        return "not run"
    counts = ", ".join(f"{n} {w}" for w, n in p.get("counts", {}).items()) or "no summary line"
    extra = " — TIMED OUT, killed" if p.get("timed_out") else ""
    return f"{counts} (exit code {p.get('returncode')}, {p.get('seconds')} s){extra}"


# ----------------------------------------------------------------------------------------------
def write_summary(path: os.PathLike, records: Sequence[dict], env: Optional[dict] = None,
                  pytest_result: Optional[dict] = None, notes: Sequence[str] = ()) -> str:
    """Write summary.md (header, test counts, speed ratios, the full table); returns the text."""
    env = env or {}
    gpu = env.get("gpu") or "no GPU"
    lines = [f"# attnlib GPU check: {gpu}", "",
             f"{env.get('time', '')}; {env.get('sm_count')} SMs, {env.get('compute_capability')}, "
             f"driver {env.get('driver')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
             f"cuDNN {env.get('cudnn')}), triton {env.get('triton')}, cupy {env.get('cupy')}, "
             f"attnlib {env.get('attnlib')}", "",
             f"**Tests** (`{(pytest_result or {}).get('command', 'pytest -m gpu tests/')}`): "
             f"{describe_pytest(pytest_result)}", ""]
    ok = sum(r.get("status") == "ok" for r in records)
    skipped = sum(r.get("status") == "skipped" for r in records)
    errors = sum(r.get("status") == "error" for r in records)
    lines += ["## Flash benchmarks", "",
              ("Median of CUDA-event timings after warm-up, L2 flushed before each call; " if env.get("gpu")
               else "Median of wall-clock (perf_counter) timings on the CPU after warm-up; ") + "TFLOP/s from "
              "`bench.runner.flops` (4·B·H·Sq·Sk·D forward, halved when causal; full = fwd+bwd = 3.5x). "
              "*Speed vs fastest SDPA* = fastest SDPA backend's ms / attnlib's ms on the same shape "
              "(above 1: attnlib faster). Peak MiB = memory allocated by one call at its peak.", "",
              f"{len(records)} measurements: {ok} ok, {skipped} skipped, {errors} failed.", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    ratios = runner.speed_ratios(records)
    if ratios:
        lines += ["### attnlib vs fastest SDPA backend", "",
                  "| provider | workload | shape | causal | mode | attnlib ms | fastest SDPA | SDPA ms | speed |",
                  "|---|---|---|---|---|---:|---|---:|---:|"]
        for x in ratios:
            lines.append(f"| {x['provider']} | {x['workload']} | {x['shape']} | {'yes' if x['causal'] else 'no'} | "
                         f"{x['mode']} | {x['ms']:.3f} | {x['baseline']} | {x['baseline_ms']:.3f} | "
                         f"{x['ratio']:.2f}x |")
        lines.append("")
    lines += ["### All measurements", "", runner.markdown_table(records), ""]
    text = "\n".join(lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def save(out: Path, records: Sequence[dict], env: dict, pytest_result: Optional[dict],
         notes: Sequence[str] = (), complete: bool = True) -> None:
    runner.write_json(out / "results.json", records, env, pytest=pytest_result, notes=list(notes),
                      complete=complete)
    write_summary(out / "summary.md", records, env, pytest_result, notes)


def file_results(src: Path, slug: Optional[str] = None) -> Path:
    """Copy results.json, summary.md and pytest-gpu.log from src into bench/results/<slug>/."""
    if slug is None:
        data = json.loads((src / "results.json").read_text())
        slug = runner.device_slug(data.get("env", {}).get("gpu"))
    dest = REPO / "bench" / "results" / slug
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dest / name).resolve():
            shutil.copyfile(src / name, dest / name)
    return dest


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="attnlib GPU check: env, GPU tests, flash benchmarks")
    ap.add_argument("--pytest-budget", type=float, default=PYTEST_BUDGET_S)
    ap.add_argument("--bench-budget", type=float, default=BENCH_BUDGET_S)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-sanitizer", action="store_true", help="skip compute-sanitizer on the CUDA flash tile")
    ap.add_argument("--skip-asymrnr", action="store_true", help="skip the AsymRnR evaluation and timing")
    ap.add_argument("--skip-sage", action="store_true", help="skip the sage benchmarks")
    ap.add_argument("--providers", default=None, help="comma list (default: bench_flash.GPU_PROVIDERS)")
    ap.add_argument("--tests", default="tests/",
                    help="comma list of test files or node ids for pytest -m gpu (a follow-up run re-checks a few)")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma list of benchmark suites to run, of {','.join(SUITES)} (default: all), "
                         f"or the sweeps {','.join(SWEEPS)} (only when named)")
    ap.add_argument("--import", dest="import_dir", default=None,
                    help="only file the results fetched into this folder under bench/results/<gpu>/")
    args = ap.parse_args(argv)
    suites = {s for s in args.suites.split(",") if s}
    if suites - set(SUITES + SWEEPS):
        ap.error(f"--suites: unknown {sorted(suites - set(SUITES + SWEEPS))}; choose from "
                 f"{','.join(SUITES + SWEEPS)}")
    if args.skip_bench:
        suites = set()
    suites -= {name for name, skip in (("asymrnr", args.skip_asymrnr), ("sage", args.skip_sage)) if skip}
    if args.import_dir:
        dest = file_results(Path(args.import_dir))
        say(f"filed {args.import_dir} under {dest}")
        return 0

    t_start = time.perf_counter()
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    env = runner.environment()
    print_environment(env)
    notes: list[str] = []
    if not torch.cuda.is_available():
        notes.append("CUDA is not available: GPU tests are skipped and benchmarks run the CPU shape only")
        say("!! " + notes[-1])

    pytest_result = None
    if not args.skip_tests:
        try:
            pytest_result = run_pytest(out, args.pytest_budget, paths=[t for t in args.tests.split(",") if t])
        except Exception as e:  # noqa: BLE001
            pytest_result = {"command": "pytest -m gpu tests/", "error": f"{type(e).__name__}: {e}",
                             "counts": {}}
            say(f"!! could not run pytest: {pytest_result['error']}")
    if not args.skip_tests and not args.skip_sanitizer and torch.cuda.is_available():
        say(f"== compute-sanitizer (budget {SANITIZER_BUDGET_S:.0f} s)")
        try:
            notes.extend(run_sanitizer(out, SANITIZER_BUDGET_S))
        except Exception as e:  # noqa: BLE001
            notes.append(f"sanitizer step failed: {type(e).__name__}: {e}")
    save(out, [], env, pytest_result, notes, complete=False)

    records: list[dict] = []
    if "flash" in suites:
        from bench.bench_flash import run_flash_suite

        left = TOTAL_TARGET_S - (time.perf_counter() - t_start) - 20
        budget = max(30.0, min(args.bench_budget, left))
        say(f"== flash benchmarks (budget {budget:.0f} s)")
        t0 = time.perf_counter()
        live: list[dict] = []

        def on_record(rec: dict) -> None:
            live.append(rec)
            try:
                save(out, live, env, pytest_result, notes, complete=False)
            except Exception as e:  # noqa: BLE001
                say(f"!! could not write partial results: {e}")
        try:
            records = run_flash_suite(quick=True, budget_s=budget, on_record=on_record,
                                      providers=args.providers.split(",") if args.providers else None,
                                      log=lambda s: say("  " + s))
        except Exception as e:  # noqa: BLE001 - keep what was measured
            import traceback
            records = runner.annotate_ratios(live)
            notes.append(f"the benchmark suite stopped early: {type(e).__name__}: {e}")
            say("!! " + notes[-1] + "\n" + traceback.format_exc())
        for r in records:
            if r.get("check_ok") is False:
                notes.append(f"WRONG OUTPUT: {r['provider']} ({r.get('kernel')}) on {r.get('shape')} "
                             f"{'causal' if r.get('causal') else 'full'} {r.get('dtype')}: max |o - o_sdpa| "
                             f"{r['check_max_abs']:.2e} > {r['check_atol']:.0e}")
                say("!! " + notes[-1])
        over = [r for r in records if "time budget" in (r.get("reason") or "")]
        if over:
            notes.append(f"{len(over)} measurements skipped: the benchmark budget of {budget:.0f} s was spent")
        notes.append(f"benchmarks took {time.perf_counter() - t0:.0f} s (budget {budget:.0f} s)")
    if "cuda_compile" in suites and torch.cuda.is_available():
        say("== flash-cuda first-call compile and cached-load times")
        try:
            from bench.bench_flash import cuda_compile_times

            rows = cuda_compile_times(log=lambda s: say("  " + s))
            (out / "cuda_compile.json").write_text(json.dumps(rows, indent=1))
            for r in rows:
                if r.get("status") == "ok":
                    notes.append(f"flash-cuda {r['spec']}: first call {r['compile_s']:.2f} s (NVRTC), cached "
                                 f"{r.get('cached_load_ms', r['cached_read_ms']):.1f} ms (disk + module load)")
        except Exception as e:  # noqa: BLE001
            notes.append(f"cuda compile timing failed: {type(e).__name__}: {e}")
    if "asymrnr" in suites:
        budget = max(15.0, min(ASYMRNR_BUDGET_S, ASYMRNR_END_S - (time.perf_counter() - t_start)))
        say(f"== asymrnr evaluation and timing (budget {budget:.0f} s)")
        try:
            from bench.bench_asymrnr import run_asymrnr_suite, time_ratios, write_results

            res = run_asymrnr_suite(budget, log=lambda s: say("  " + s))
            write_results(out, res)
            for x in time_ratios(res.get("timing", [])):
                notes.append(f"asymrnr: {x['provider']} {x['ms']:.3f} ms = {x['ratio']:.3f}x full flash "
                             f"({x['shape']}; target <= 0.45x); see asymrnr.md")
            notes.append(f"asymrnr suite took {res.get('seconds')} s (budget {budget:.0f} s)")
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            notes.append(f"the asymrnr suite stopped: {type(e).__name__}: {e}")
            say("!! " + notes[-1])
    if "sage" in suites:
        budget = max(10.0, min(SAGE_BUDGET_S, SAGE_END_S - (time.perf_counter() - t_start)))
        say(f"== sage benchmarks (budget {budget:.0f} s)")
        try:
            from bench.bench_sage import run_sage_suite, target_notes

            sage_records = run_sage_suite(budget_s=budget, log=lambda s: say("  " + s))
            records = list(records) + sage_records
            notes.extend(target_notes(sage_records))
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            notes.append(f"the sage suite stopped: {type(e).__name__}: {e}")
            say("!! " + notes[-1])
    # host time per call (tiny inputs, vs torch SDPA); issue 6: block_sparse (density sweep vs
    # dense flash / flex) and linear (seq sweep, GB/s); issue 7: sla
    # (suite, module, function, budget cap, end mark, extra keyword arguments)
    for name, mod, fn, cap, end_s, extra in (
            ("overhead", "bench.bench_overhead", "run_overhead_suite", 15.0, SPARSE_LINEAR_END_S, dict(out=out)),
            ("block_sparse", "bench.bench_block_sparse", "run_block_sparse_suite", 30.0, SPARSE_LINEAR_END_S, {}),
            ("linear", "bench.bench_linear", "run_linear_suite", 20.0, SPARSE_LINEAR_END_S, {}),
            ("sla", "bench.bench_sla", "run_sla_suite", 40.0, SLA_END_S, {}),
            # the profile writes profile.md beside the rest
            ("profile", "bench.profile_gpu", "run_profile_suite", 35.0, PROFILE_END_S, dict(out=out)),
            ("sweep_linear", "bench.sweep_linear", "run_sweep_suite", 120.0, SWEEP_END_S, dict(out=out)),
            ("sweep_linear_causal", "bench.sweep_linear", "run_sweep_suite", 120.0, SWEEP_END_S,
             dict(out=out, causal=True)),
            ("sweep_block_sparse", "bench.sweep_block_sparse", "run_sweep_suite", 60.0, SWEEP_END_S, dict(out=out))):
        if name not in suites:
            continue
        cap = min(cap, end_s - (time.perf_counter() - t_start))
        if cap < 5.0:
            notes.append(f"{name} benchmarks skipped: the run reached {end_s:.0f} s")
            continue
        say(f"== {name} benchmarks (budget {cap:.0f} s)")
        try:
            recs = getattr(importlib.import_module(mod), fn)(cap, log=lambda s: say("  " + s), **extra)
            (out / f"{name}.json").write_text(json.dumps(recs, indent=1))
            notes.append(f"{name}: {sum(('ms' in r) or ('us_per_call' in r) or ('eager_ms' in r) for r in recs)} "
                         f"measurements in {name}.json")
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            notes.append(f"the {name} suite stopped: {type(e).__name__}: {e}")
            say("!! " + notes[-1])
    notes.append(f"gpu_check took {time.perf_counter() - t_start:.0f} s in all")
    save(out, records, env, pytest_result, notes, complete=True)
    say(f"== wrote {out / 'results.json'} and {out / 'summary.md'}")
    if env.get("gpu"):
        try:
            dest = file_results(out, runner.device_slug(env.get("gpu")))
            say(f"== copied into {dest}")
        except Exception as e:  # noqa: BLE001
            say(f"!! could not copy into bench/results/: {e}")
    else:
        say("== no GPU: nothing filed under bench/results/")

    say("")
    for x in runner.speed_ratios(records):
        say(f"  {x['provider']:<15} {x['workload']:<22} {x['shape']:<24} {'causal' if x['causal'] else 'full':<6} "
            f"{x['mode']:<4} {x['ms']:9.3f} ms  {x['ratio']:.2f}x vs {x['baseline']}")
    say(f"tests: {describe_pytest(pytest_result)}")
    for n in notes:
        say(f"note: {n}")
    failed = (pytest_result or {}).get("returncode") not in (0, 5, None) or any(
        r.get("status") == "error" for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

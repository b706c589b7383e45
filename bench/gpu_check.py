"""The one command a GPU task runs: environment, GPU tests, benchmarks, results by card.

Next GPU run: exact commands (H100 or H200, 15 minutes of device time in all, start-up included)
-----------------------------------------------------------------------------------------------
Here first (no device time): ``sh scripts/fetch_gpu_wheels.sh`` (sageattention 1.0.6 and fla-core
into the git-ignored ``.whl/``; without them those two baselines are recorded as skipped, with
why), then ``timeout 900 .venv/bin/python -m pytest -q -p no:cacheprovider
tests/test_bench_runner.py tests/test_bench_suites.py``. On the device the checkout must be
installed first (``attnlib.triton_kernels`` and ``attnlib._csrc`` exist only through setup.py's
package_dir: from a bare repository root ``import attnlib`` fails), so each call starts with
``python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 ||
{ tail -20 /tmp/install.log; exit 1; };`` (the log stays out of $OUT: 8 files at most come back).

Then two ``run`` calls, the second issued as soon as the first returns (the machine stays warm
for 30 s only; a fresh start costs 1-2 minutes), then ``give_back``:

1. GPU tests (never-run tests first: ``bench/gpu_test_order.py``), 300 s of pytest;
   run(timeout_s=370, command=
   ``export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e .
   >/tmp/install.log 2>&1 || { tail -20 /tmp/install.log; exit 1; }; timeout -s INT -k 15 345
   python3 bench/gpu_check.py --skip-bench --skip-sanitizer --pytest-budget 300``)
2. benchmarks for the open issues' targets, in gpu_check's order: flash (issue 4: attnlib-cuda
   against sdpa-flash at hd128 4k / 16k, and its 128-row tile stepping 48 or 64 keys instead of
   32: attnlib-cuda-bn48 / -bn64; take the fastest as TILE128_BLOCK_N; and at hd128 16k a
   padded-prompt key mask, attnlib-triton-keymask against sdpa-keymask: if SDPA wins, rank
   flash-torch-sdpa first for key-masked half-precision calls), linear (issue 6: the 32k GB/s with the stop 22 configs,
   end to end, and with kernels.STATE_Z_DOT: take it as the default if faster), sla (issue 7, up to 90 s: critical 0.05 at blocks (64, 64) and (128, 64)) and the
   kernel profile (stop 23 moved SLA's masked state sum and key-block preprocess to 16-bit tensor
   cores: the profile's SLA rows give their kernel times against 1.25 / 0.61 ms on the H200 and
   1.82 / 0.63 ms on the H100 before; its cases with the linear branch off, negligible 0.95, give
   that branch's share of sla_fwd_kernel and of the training step by difference). Sage (issue 5, blocked at stop 24) and the causal linear
   sweep are left out; name them in --suites to run them after;
   run(timeout_s=400, carry=[".whl"], command=
   ``export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile
   --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
   python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || exit 1;
   timeout -s INT -k 15 370 python3 bench/gpu_check.py --skip-tests
   --suites linear,flash,sla,profile --end 340``)
   (without ``.whl/``, drop the wheel install; a fresh machine needs the ``-e .`` install again)

The two limits add up to 770 s, under 13 minutes (with a 1-2 minute start, inside the 15): each
``timeout`` ends gpu_check before the tool's limit; on its SIGINT gpu_check stops pytest (or the
suite in hand), writes what it has and exits, and the call then reports rc 124 with every file
back. Call 1 takes about 320 s (pytest is cut at 300 s: the list does not finish; the summary's
tier table says how far it got; in stop 22 the whole list of 1379 tests took 268 s), call 2
about 300 s (each suite in gpu_check's order, each to its end mark or budget).
Helpers (subagents) must not call the device tool: in stop 22 one did, and the 150 s it spent
left too little to start a machine for the check of the fixes. Before call 2, if ``status`` shows less than 430 s of budget left, lower ``--end`` and both
limits by the difference. Afterwards, here: ``python bench/gpu_check.py --import <files_at of
each call>`` (the second import overwrites results.json / summary.md: import call 1's folder, read
or rename them, then call 2's).

What comes back: only ``$OUT``, at most 8 files. gpu_check writes there ``results.json``,
``summary.md`` (lists every file produced, with sizes), ``pytest-gpu.log``, ``pytest-failures.log``,
``sanitizer.log``, ``host_profile.md``, ``profile.md``, and every other file (the suites' JSON,
``asymrnr.md``, ``test-plan.tsv``) packed in ``suites.tar.gz``, re-packed after each step, so a
run killed at any point leaves no more than 8 files; ``--import`` unpacks it.

Default run (``python bench/gpu_check.py``, about 8 minutes on an H100):

    python bench/gpu_check.py            # results under $OUT, else ./gpu-results/

On a lent device machine (no network), the baselines sageattention 1.0.6 and fla-core travel as
wheels: run ``scripts/fetch_gpu_wheels.sh`` here, then carry ``.whl`` and start the command with
``python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
export PYTHONPATH=/tmp/site;`` (without them those providers are recorded as skipped, with why).
pytest-xdist and pytest-timeout are in the device image.

Steps, each bounded in time:

1. print the environment (GPU, driver, CUDA, torch / triton / cupy versions, SM count, kernels);
2. the GPU tests in a subprocess (``bench/gpu_test_order.py`` picks and orders them: the tests no
   GPU run reached yet, then every ``gpu``-marked test, then with ``--select gpu+device``, the
   default, the device-agnostic tests that run on CUDA when there is one; xdist workers when
   pytest-xdist is there, each kernel's default config: autotuning off), output teed to
   ``pytest-gpu.log``; at most ``--pytest-budget`` seconds (killed after); failures are counted
   and the run goes on; then compute-sanitizer memcheck and racecheck on a small launch of the
   default 128-row CUDA flash tile (``sanitizer.log``);
3. the flash benchmarks (:func:`bench.bench_flash.run_flash_suite`, quick list) with a time
   budget: cases past it are recorded as skipped, and say so;
   then the AsymRnR suite (:func:`bench.bench_asymrnr.run_asymrnr_suite`: accuracy vs random
   dropping, time vs full flash at the Wan2.1-1.3B shape) in its own budget, written to
   ``asymrnr.json`` / ``asymrnr.md``; then the sage suite (:func:`bench.bench_sage.run_sage_suite`,
   end-to-end TOPS with quantization, cos / rel L1 per row) in ``SAGE_BUDGET_S``; then the host
   time per call (:mod:`bench.bench_overhead`, with ``host_profile.md``), block_sparse, linear and
   sla (:func:`bench.bench_sla.run_sla_suite`: Wan2.1-1.3B fwd / bwd vs dense flash and SDPA) in
   small budgets, each to its own JSON file (``--suites`` picks which run); last the kernel
   profile (:mod:`bench.profile_gpu`: eager vs CUDA-graph time and the kernels of each case,
   profile.md); launch-config sweeps (``SWEEPS``) run only when ``--suites`` names them.
   Each suite stops at its own end mark (seconds since the start); ``--end S`` moves every mark
   to at most S, so a run given a short command limit ends inside it;
4. ``results.json`` (environment, test counts, every record) and ``summary.md`` (a markdown
   table with the speed of each attnlib provider relative to the fastest SDPA backend), written
   after every step so a run cut short still leaves its numbers, then copied into
   ``bench/results/<gpu-name-slug>/``. SIGINT or SIGTERM (``timeout -s INT``) stops the step in
   hand (the pytest process group too), writes the results with ``complete: false`` (the rows the
   suite in hand measured so far included: its JSON, the profile's profile.md) and exits 130.

On a lent device machine only $OUT comes back; afterwards, on the development machine,
``python bench/gpu_check.py --import <fetched folder>`` files those results under
``bench/results/<gpu-name-slug>/``.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

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
SLA_END_S = 470.0            # sla (issue 7: Wan2.1-1.3B fwd/bwd vs flash / SDPA), 90 s, never past this mark
PROFILE_END_S = 505.0        # bench/profile_gpu.py: eager vs CUDA graph and the kernels of each case, 35 s
PER_TEST_TIMEOUT_S = 120
OVERHEAD_BUDGET_S = 30.0     # run 1: 15 s ended before sla / predict_block_mask (first-call compiles)
SUITES = ("flash", "cuda_compile", "asymrnr", "sage", "overhead", "block_sparse", "linear", "sla", "profile")
# launch-config sweeps, run only when named in --suites (each to its own JSON beside the rest):
# bench/sweep_linear.py (non-causal, then --causal) and bench/sweep_block_sparse.py
SWEEPS = ("sweep_linear", "sweep_linear_causal", "sweep_block_sparse")
SWEEP_END_S = 540.0
# keep going past failures: one run must show as many of them as it can (40 stopped a run at 73 s
# of its 140 s budget); the tracebacks take about 9 KB each in pytest-failures.log
MAX_FAILURES = 150
# $OUT: what a device machine sends back is at most 8 files of at most 16 MiB each. These are
# written there (the first four as they happen); every other file a suite writes goes to a staging
# folder and into BUNDLE, re-packed after each step, so a run killed at any point stays inside.
OUT_LIVE = ("results.json", "summary.md", "pytest-gpu.log", "pytest-failures.log", "sanitizer.log")
OUT_LOOSE = ("host_profile.md", "profile.md")   # copied from the staging folder, readable at once
BUNDLE = "suites.tar.gz"
OUT_MAX_FILES = 8
OUT_MAX_BYTES = 15 * 2 ** 20    # a bigger file (a runaway log) is cut to its head and tail
TEST_PLAN = "test-plan.tsv"     # bench/gpu_test_order.py: tier and node id of each test, in run order
RESULT_FILES = OUT_LIVE + OUT_LOOSE + (
    "asymrnr.json", "asymrnr.md", "overhead.json", "block_sparse.json", "linear.json", "sla.json",
    "cuda_compile.json", "profile.json", "sweep_linear.json", "sweep_linear_causal.json",
    "sweep_block_sparse.json", TEST_PLAN)


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


def test_environment(out: Path, stage: Optional[Path] = None, select: str = "gpu+device") -> dict:
    """The GPU tests check correctness with each kernel's default config (autotuning off: it
    compiles and times every candidate, which costs minutes and tests nothing more); the
    benchmarks run with autotuning and compare each autotuned output with SDPA (runner.check_output).
    ``select`` and the plan file are bench/gpu_test_order.py's (which tests, in which order)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", ATTNLIB_FLASH_AUTOTUNE="0", ATTNLIB_SAGE_AUTOTUNE="0",
               ATTNLIB_SLA_AUTOTUNE="0", ATTNLIB_ASYMRNR_AUTOTUNE="0",
               ATTNLIB_FAILURE_LOG=str(out / "pytest-failures.log"),
               ATTNLIB_TEST_INTERLEAVE="1",  # round robin over files (tests/conftest.py): a cut-off run covers every file
               ATTNLIB_GPU_SELECT=select)
    if stage is not None:
        env["ATTNLIB_GPU_ORDER_FILE"] = str(stage / TEST_PLAN)
    for name in [n for n in env if n.startswith("PYTEST_XDIST_")]:  # started from an xdist worker
        env.pop(name)  # (a test): the child pytest is no worker of it
    return env


def pytest_command(paths: Sequence[str] = ("tests/",), extra_args: Sequence[str] = ()) -> list[str]:
    """The pytest command line (without ``-m gpu``: bench/gpu_test_order.py selects and orders)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "bench.gpu_test_order", "-v", f"--maxfail={MAX_FAILURES}",
           *paths, "-p", "no:cacheprovider", "-p", "no:benchmark", "-o", "console_output_style=classic"]
    workers = xdist_workers()
    if workers:
        cmd += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    return cmd + list(extra_args)


def _stop_group(proc: subprocess.Popen, waits: Sequence[float] = (10, 10)) -> None:
    """SIGTERM, then SIGKILL, to the process group of proc (started with start_new_session)."""
    for sig, wait in zip((signal.SIGTERM, signal.SIGKILL), waits):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the pytest process group this script started
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def verbose_node(line: str, m: "re.Match") -> str:
    """The test id of a verbose pytest line, whole even when its parameters hold spaces: after the
    outcome word (xdist: ``[gw3] PASSED tests/a.py::t[x y]``) or before it (``tests/a.py::t[x y]
    PASSED [ 12%]``)."""
    after, before = line[m.end():].strip(), line[:m.start()].strip()
    node = after if "::" in after else before
    return re.sub(r"\s*\[\s*\d+%\]$", "", node).strip()


def plan_reach(plan_path: Path, text: str) -> list[dict]:
    """Per tier of the test plan (bench/gpu_test_order.py): tests planned, reached (an outcome in
    the verbose log) and failed, and the first few priority tests not reached."""
    if not plan_path.is_file():
        return []
    outcome: dict[str, str] = {}
    for line in text.splitlines():
        m = _VERBOSE_OUTCOME.search(line)
        if m and "::" in line:
            node = verbose_node(line, m)
            if node:
                outcome[node] = _OUTCOME_WORD[m.group(1)]
    tiers: dict[int, dict] = {}
    for line in plan_path.read_text().splitlines():
        tier, _, node = line.partition("\t")
        if not node:
            continue
        t = tiers.setdefault(int(tier), {"tier": int(tier), "planned": 0, "reached": 0, "failed": 0,
                                         "not_reached": []})
        t["planned"] += 1
        got = outcome.get(node)
        if got:
            t["reached"] += 1
            t["failed"] += got in ("failed", "error")
        elif len(t["not_reached"]) < 5:
            t["not_reached"].append(node)
    try:
        from bench.gpu_test_order import TIER_NAMES
    except Exception:  # noqa: BLE001
        TIER_NAMES = ()
    for t in tiers.values():
        t["name"] = TIER_NAMES[t["tier"]] if t["tier"] < len(TIER_NAMES) else str(t["tier"])
    return [tiers[k] for k in sorted(tiers)]


def run_pytest(out: Path, budget_s: float, extra_args: Sequence[str] = (), paths: Sequence[str] = ("tests/",),
               stage: Optional[Path] = None, select: str = "gpu+device") -> dict:
    """The GPU tests on ``paths`` (chosen and ordered by bench/gpu_test_order.py; verbose, spread
    over xdist workers, at most MAX_FAILURES failures) with their output teed to
    out/pytest-gpu.log; killed after ``budget_s`` seconds. A KeyboardInterrupt (SIGINT / SIGTERM
    of this script) stops the pytest process group too; the result then has ``interrupted``."""
    cmd = pytest_command(paths, extra_args)
    say("== tests: " + " ".join(cmd[2:]) + f"  (ATTNLIB_GPU_SELECT={select})")
    log_path = out / "pytest-gpu.log"
    (out / "pytest-failures.log").unlink(missing_ok=True)
    if stage is not None:
        (stage / TEST_PLAN).unlink(missing_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    env = test_environment(out, stage, select)
    timed_out = interrupted = False
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
            try:
                proc.wait(timeout=budget_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            # never leave pytest running on the GPU past this step
            _stop_group(proc, (3, 3) if interrupted else (10, 10))
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n[gpu_check] pytest stopped after its budget of {budget_s:.0f} s\n")
        if interrupted:
            log.write("\n[gpu_check] pytest stopped: gpu_check was interrupted (SIGINT / SIGTERM)\n")
    text = "".join(lines)
    result = {"command": " ".join(cmd[2:]), "select": select, "returncode": proc.returncode,
              "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1),
              "counts": parse_pytest_counts(text)}
    if interrupted:
        result["interrupted"] = True
    if stage is not None:
        try:
            result["plan"] = plan_reach(stage / TEST_PLAN, text)
        except Exception as e:  # noqa: BLE001 - counts above stand
            result["plan_error"] = f"{type(e).__name__}: {e}"
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
    extra += " — INTERRUPTED (SIGINT / SIGTERM), killed" if p.get("interrupted") else ""
    if p.get("error"):
        extra += f" — {p['error']}"
    return f"{counts} (exit code {p.get('returncode')}, {p.get('seconds')} s){extra}"


def plan_lines(p: Optional[dict]) -> list[str]:
    """Markdown lines: per tier of the test plan, planned / reached / failed, and what was not reached."""
    plan = (p or {}).get("plan") or []
    if not plan:
        return []
    lines = ["| tier | tests | reached | failed or error | first not reached |", "|---|---:|---:|---:|---|"]
    for t in plan:
        missing = ", ".join(f"`{n}`" for n in t.get("not_reached", [])[:3])
        lines.append(f"| {t.get('name')} | {t['planned']} | {t['reached']} | {t['failed']} | {missing} |")
    return lines + [""]


def file_lines(files: Sequence[dict]) -> list[str]:
    """Markdown lines listing every file the run produced: where it is and its size."""
    if not files:
        return []
    lines = ["## Files", "", f"Everything this run produced ({len(files)} files); `{BUNDLE}` holds the ones "
             "marked so (`python bench/gpu_check.py --import <folder>` unpacks it).", "",
             "| file | where | bytes |", "|---|---|---:|"]
    for f in files:
        lines.append(f"| `{f['name']}` | {f['where']} | {f['bytes'] if f.get('bytes') is not None else ''} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------------
def write_summary(path: os.PathLike, records: Sequence[dict], env: Optional[dict] = None,
                  pytest_result: Optional[dict] = None, notes: Sequence[str] = (),
                  files: Sequence[dict] = ()) -> str:
    """Write summary.md (header, test counts, speed ratios, the full table, the files produced);
    returns the text."""
    env = env or {}
    gpu = env.get("gpu") or "no GPU"
    lines = [f"# attnlib GPU check: {gpu}", "",
             f"{env.get('time', '')}; {env.get('sm_count')} SMs, {env.get('compute_capability')}, "
             f"driver {env.get('driver')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
             f"cuDNN {env.get('cudnn')}), triton {env.get('triton')}, cupy {env.get('cupy')}, "
             f"attnlib {env.get('attnlib')}", "",
             f"**Tests** (`{(pytest_result or {}).get('command', 'pytest -m gpu tests/')}`): "
             f"{describe_pytest(pytest_result)}", ""]
    lines += plan_lines(pytest_result)
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
    lines += file_lines(files)
    text = "\n".join(lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _cap_size(path: Path, limit: Optional[int] = None) -> bool:
    """Cut a file over limit (OUT_MAX_BYTES) bytes to its first and last limit/2 (a runaway
    log): True if cut."""
    limit = OUT_MAX_BYTES if limit is None else limit
    size = path.stat().st_size
    if size <= limit:
        return False
    half = limit // 2 - 200
    with open(path, "rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(head + f"\n\n[gpu_check] {size - 2 * half} bytes cut here (file over {limit} bytes)\n\n"
                    .encode() + tail)
    tmp.replace(path)
    return True


def produced_files(out: Path, stage: Optional[Path]) -> list[dict]:
    """Every file of the run: those in out (beside the bundle) and those staged (loose or bundled)."""
    files = []
    for name in OUT_LIVE:
        p = out / name
        if p.is_file():
            files.append({"name": name, "where": "$OUT", "bytes": p.stat().st_size})
    if stage is not None and stage.is_dir():
        for p in sorted(stage.iterdir()):
            if p.is_file() and not p.name.endswith(".tmp"):
                where = "$OUT" if p.name in OUT_LOOSE else BUNDLE
                files.append({"name": p.name, "where": where, "bytes": p.stat().st_size})
    if (out / BUNDLE).is_file():
        files.append({"name": BUNDLE, "where": "$OUT", "bytes": (out / BUNDLE).stat().st_size})
    return files


def publish(out: Path, stage: Optional[Path], since: Optional[float] = None) -> list[dict]:
    """Make $OUT hold what comes back (OUT_MAX_FILES files at most): OUT_LOOSE copied from the
    staging folder, every other staged file packed into BUNDLE (atomically), files cut to
    OUT_MAX_BYTES; a file some step wrote straight into out (modified after ``since``, a
    time.time()) is moved into the staging folder first. Returns produced_files."""
    if stage is not None and stage.is_dir() and stage.resolve() != out.resolve():
        keep = set(OUT_LIVE) | set(OUT_LOOSE) | {BUNDLE}
        for p in out.iterdir():
            if (since is not None and p.is_file() and p.name not in keep and not p.name.endswith(".tmp")
                    and p.stat().st_mtime >= since):
                shutil.move(str(p), str(stage / p.name))
        bundled = []
        for p in sorted(stage.iterdir()):
            if not p.is_file() or p.name.endswith(".tmp"):
                continue
            if p.name in OUT_LOOSE:
                _cap_size(p)
                tmp = out / (p.name + ".tmp")
                shutil.copyfile(p, tmp)
                tmp.replace(out / p.name)
            else:
                bundled.append(p)
        if bundled:
            tmp = out / (BUNDLE + ".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                for p in bundled:
                    tar.add(p, arcname=p.name)
            tmp.replace(out / BUNDLE)
    for name in OUT_LIVE:
        if (out / name).is_file():
            _cap_size(out / name)
    return produced_files(out, stage)


def save(out: Path, records: Sequence[dict], env: dict, pytest_result: Optional[dict],
         notes: Sequence[str] = (), complete: bool = True, stage: Optional[Path] = None,
         since: Optional[float] = None) -> None:
    """results.json and summary.md in out, after publish (the staged files packed) when a staging
    folder is given; a failure to publish is a note, never the end of the run."""
    notes = list(notes)
    files: list[dict] = []
    try:
        files = publish(out, stage, since)
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not pack the staged files: {type(e).__name__}: {e}")
    runner.write_json(out / "results.json", records, env, pytest=pytest_result, notes=notes,
                      complete=complete, files=files)
    write_summary(out / "summary.md", records, env, pytest_result, notes, files)


def _safe_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]+", name)) and name not in (".", "..")


def file_results(src: Path, slug: Optional[str] = None) -> Path:
    """Copy the result files from src into bench/results/<slug>/, unpacking BUNDLE there."""
    if slug is None:
        data = json.loads((src / "results.json").read_text())
        slug = runner.device_slug(data.get("env", {}).get("gpu"))
    dest = REPO / "bench" / "results" / slug
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dest / name).resolve():
            shutil.copyfile(src / name, dest / name)
    if (src / BUNDLE).is_file():
        with tarfile.open(src / BUNDLE, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or not _safe_name(member.name):
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    (dest / member.name).write_bytes(f.read())
    return dest


# ----------------------------------------------------------------------------------------------
class RunState:
    """What the run holds so far, so that an interrupt (SIGINT / SIGTERM) can still write it."""

    def __init__(self, out: Path, stage: Path, env: dict) -> None:
        self.out, self.stage, self.env = out, stage, env
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.pytest_result: Optional[dict] = None
        self.step = "start"
        self.t_start = time.perf_counter()
        self.since = time.time() - 1.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def save(self, complete: bool = False) -> None:
        save(self.out, self.records, self.env, self.pytest_result, self.notes, complete=complete,
             stage=self.stage, since=self.since)

    def recorder(self, say: Callable[[str], None]) -> Callable[[dict], None]:
        """A suite's on_record: keep the record and write the partial results at once."""
        def on_record(rec: dict) -> None:
            self.records.append(rec)
            try:
                self.save(complete=False)
            except Exception as e:  # noqa: BLE001
                say(f"!! could not write partial results: {e}")
        return on_record


def _measured(recs: Sequence[dict]) -> int:
    """The records of a table suite that hold a time (the rest were skipped or failed)."""
    return sum(('ms' in r) or ('us_per_call' in r) or ('eager_ms' in r) for r in recs)


def _interrupt(signum, frame):  # SIGTERM: as SIGINT, so the same handler writes the results
    raise KeyboardInterrupt(f"signal {signum}")


def end_marks(end: Optional[float]) -> dict:
    """Each step's end mark, seconds since the start, none past ``end`` (--end)."""
    marks = {"flash": TOTAL_TARGET_S, "asymrnr": ASYMRNR_END_S, "sage": SAGE_END_S,
             "sparse_linear": SPARSE_LINEAR_END_S, "sla": SLA_END_S, "profile": PROFILE_END_S,
             "sweep": SWEEP_END_S}
    if end is not None:
        marks = {k: min(v, end) for k, v in marks.items()}
    return marks


# (suite, module, function, budget cap, end mark key, extra keyword arguments; "out" -> the staging folder)
SUITE_TABLE = (
    ("overhead", "bench.bench_overhead", "run_overhead_suite", OVERHEAD_BUDGET_S, "sparse_linear", {"out": True}),
    ("block_sparse", "bench.bench_block_sparse", "run_block_sparse_suite", 30.0, "sparse_linear", {}),
    ("linear", "bench.bench_linear", "run_linear_suite", 20.0, "sparse_linear", {}),
    ("sla", "bench.bench_sla", "run_sla_suite", 90.0, "sla", {}),
    # the profile writes profile.md beside the rest
    ("profile", "bench.profile_gpu", "run_profile_suite", 35.0, "profile", {"out": True}),
    ("sweep_linear", "bench.sweep_linear", "run_sweep_suite", 120.0, "sweep", {"out": True}),
    ("sweep_linear_causal", "bench.sweep_linear", "run_sweep_suite", 120.0, "sweep", {"out": True, "causal": True}),
    ("sweep_block_sparse", "bench.sweep_block_sparse", "run_sweep_suite", 60.0, "sweep", {"out": True}),
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="attnlib GPU check: env, GPU tests, benchmarks")
    ap.add_argument("--pytest-budget", type=float, default=PYTEST_BUDGET_S)
    ap.add_argument("--bench-budget", type=float, default=BENCH_BUDGET_S)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-sanitizer", action="store_true", help="skip compute-sanitizer on the CUDA flash tile")
    ap.add_argument("--skip-asymrnr", action="store_true", help="skip the AsymRnR evaluation and timing")
    ap.add_argument("--skip-sage", action="store_true", help="skip the sage benchmarks")
    ap.add_argument("--providers", default=None, help="comma list (default: bench_flash.GPU_PROVIDERS)")
    ap.add_argument("--tests", default="tests/",
                    help="comma list of test files or node ids for the GPU tests (a follow-up run re-checks a few)")
    ap.add_argument("--select", default="gpu+device", choices=("gpu", "gpu+device"),
                    help="bench/gpu_test_order.py: gpu-marked tests only, or also the device-agnostic ones "
                         "(after them)")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma list of benchmark suites to run, of {','.join(SUITES)} (default: all), "
                         f"or the sweeps {','.join(SWEEPS)} (only when named)")
    ap.add_argument("--end", type=float, default=None,
                    help="seconds since the start past which no benchmark step runs (every end mark capped)")
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

    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="gpu_check-stage-"))
    import torch

    state = RunState(out, stage, runner.environment())
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_steps(args, suites, state, torch)
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # writing what there is: no second interrupt
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        state.notes.append(f"INTERRUPTED ({e or 'SIGINT'}) during {state.step}, {state.elapsed():.0f} s into the "
                           "run: the results so far (complete: false)")
        say("!! " + state.notes[-1])
        try:
            state.save(complete=False)
            say(f"== wrote {out / 'results.json'} and {out / 'summary.md'} (interrupted)")
        except Exception as e2:  # noqa: BLE001
            say(f"!! could not write the results: {type(e2).__name__}: {e2}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        shutil.rmtree(stage, ignore_errors=True)


def run_steps(args, suites: set, state: RunState, torch) -> int:
    out, stage, env, notes = state.out, state.stage, state.env, state.notes
    marks = end_marks(args.end)
    print_environment(env)
    if not torch.cuda.is_available():
        notes.append("CUDA is not available: GPU tests are skipped and benchmarks run the CPU shape only")
        say("!! " + notes[-1])

    if not args.skip_tests:
        state.step = "pytest"
        try:
            state.pytest_result = run_pytest(out, args.pytest_budget, paths=[t for t in args.tests.split(",") if t],
                                             stage=stage, select=args.select)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            state.pytest_result = {"command": "pytest (bench/gpu_test_order.py) tests/",
                                   "error": f"{type(e).__name__}: {e}", "counts": {}}
            say(f"!! could not run pytest: {state.pytest_result['error']}")
        if (state.pytest_result or {}).get("interrupted"):
            raise KeyboardInterrupt("SIGINT / SIGTERM during pytest")
    if not args.skip_tests and not args.skip_sanitizer and torch.cuda.is_available():
        state.step = "compute-sanitizer"
        say(f"== compute-sanitizer (budget {SANITIZER_BUDGET_S:.0f} s)")
        try:
            notes.extend(run_sanitizer(out, SANITIZER_BUDGET_S))
        except Exception as e:  # noqa: BLE001
            notes.append(f"sanitizer step failed: {type(e).__name__}: {e}")
    state.save(complete=False)

    records = state.records
    if "flash" in suites:
        state.step = "flash benchmarks"
        from bench.bench_flash import run_flash_suite

        left = marks["flash"] - state.elapsed() - 20
        budget = max(30.0, min(args.bench_budget, left))
        say(f"== flash benchmarks (budget {budget:.0f} s)")
        t0 = time.perf_counter()
        n0 = len(records)

        try:
            flash = run_flash_suite(quick=True, budget_s=budget, on_record=state.recorder(say),
                                    providers=args.providers.split(",") if args.providers else None,
                                    log=lambda s: say("  " + s))
            records[n0:] = flash  # the same records, with their speed ratios
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - keep what was measured
            import traceback
            runner.annotate_ratios(records)
            notes.append(f"the benchmark suite stopped early: {type(e).__name__}: {e}")
            say("!! " + notes[-1] + "\n" + traceback.format_exc())
        for r in records[n0:]:
            if r.get("check_ok") is False:
                notes.append(f"WRONG OUTPUT: {r['provider']} ({r.get('kernel')}) on {r.get('shape')} "
                             f"{'causal' if r.get('causal') else 'full'} {r.get('dtype')}: max |o - o_sdpa| "
                             f"{r['check_max_abs']:.2e} > {r['check_atol']:.0e}")
                say("!! " + notes[-1])
        over = [r for r in records[n0:] if "time budget" in (r.get("reason") or "")]
        if over:
            notes.append(f"{len(over)} measurements skipped: the benchmark budget of {budget:.0f} s was spent")
        notes.append(f"benchmarks took {time.perf_counter() - t0:.0f} s (budget {budget:.0f} s)")
        state.save(complete=False)
    if "cuda_compile" in suites and torch.cuda.is_available():
        state.step = "cuda_compile"
        say("== flash-cuda first-call compile and cached-load times")
        try:
            from bench.bench_flash import cuda_compile_times

            rows = cuda_compile_times(log=lambda s: say("  " + s))
            (stage / "cuda_compile.json").write_text(json.dumps(rows, indent=1))
            for r in rows:
                if r.get("status") == "ok":
                    notes.append(f"flash-cuda {r['spec']}: first call {r['compile_s']:.2f} s (NVRTC), cached "
                                 f"{r.get('cached_load_ms', r['cached_read_ms']):.1f} ms (disk + module load)")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            notes.append(f"cuda compile timing failed: {type(e).__name__}: {e}")
        state.save(complete=False)
    if "asymrnr" in suites:
        state.step = "asymrnr"
        budget = max(15.0, min(ASYMRNR_BUDGET_S, marks["asymrnr"] - state.elapsed()))
        say(f"== asymrnr evaluation and timing (budget {budget:.0f} s)")
        try:
            from bench.bench_asymrnr import run_asymrnr_suite, time_ratios, write_results

            res = run_asymrnr_suite(budget, log=lambda s: say("  " + s))
            write_results(stage, res)
            for x in time_ratios(res.get("timing", [])):
                notes.append(f"asymrnr: {x['provider']} {x['ms']:.3f} ms = {x['ratio']:.3f}x full flash "
                             f"({x['shape']}; target <= 0.45x); see asymrnr.md")
            notes.append(f"asymrnr suite took {res.get('seconds')} s (budget {budget:.0f} s)")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            notes.append(f"the asymrnr suite stopped: {type(e).__name__}: {e}")
            say("!! " + notes[-1])
        state.save(complete=False)
    if "sage" in suites:
        state.step = "sage"
        budget = max(10.0, min(SAGE_BUDGET_S, marks["sage"] - state.elapsed()))
        say(f"== sage benchmarks (budget {budget:.0f} s)")
        n0 = len(records)
        try:
            from bench.bench_sage import run_sage_suite, target_notes

            sage_records = run_sage_suite(budget_s=budget, log=lambda s: say("  " + s),
                                          on_record=state.recorder(say))
            records[n0:] = sage_records
            notes.extend(target_notes(sage_records))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            notes.append(f"the sage suite stopped: {type(e).__name__}: {e}")
            say("!! " + notes[-1])
        state.save(complete=False)
    # host time per call (tiny inputs, vs torch SDPA); issue 6: block_sparse (density sweep vs
    # dense flash / flex) and linear (seq sweep, GB/s); issue 7: sla; the kernel profile; sweeps
    for name, mod, fn, cap, mark, extra in SUITE_TABLE:
        if name not in suites:
            continue
        end_s = marks[mark]
        cap = min(cap, end_s - state.elapsed())
        if cap < 5.0:
            notes.append(f"{name} benchmarks skipped: the run reached {end_s:.0f} s")
            continue
        state.step = f"suite {name}"
        say(f"== {name} benchmarks (budget {cap:.0f} s)")
        kwargs = {k: (stage if k == "out" else v) for k, v in extra.items()}
        partial: list = []  # the rows so far, for suites that append as they measure (records=)
        try:
            func = getattr(importlib.import_module(mod), fn)
            if "records" in inspect.signature(func).parameters:
                kwargs["records"] = partial
            recs = func(cap, log=lambda s: say("  " + s), **kwargs)
            (stage / f"{name}.json").write_text(json.dumps(recs, indent=1, default=str))
            notes.append(f"{name}: {_measured(recs)} measurements in {name}.json")
        except BaseException as e:  # noqa: BLE001 - keep the rest of the run; an interrupt goes on up
            if partial:  # what the suite measured before it stopped comes back too
                try:
                    (stage / f"{name}.json").write_text(json.dumps(partial, indent=1, default=str))
                except Exception as e2:  # noqa: BLE001 - never in place of the interrupt
                    notes.append(f"could not write {name}.json: {type(e2).__name__}: {e2}")
            how = f"stopped: {type(e).__name__}: {e}" if isinstance(e, Exception) else "was interrupted"
            notes.append(f"the {name} suite {how}" + (f" ({_measured(partial)} measurements before it in "
                                                       f"{name}.json)" if partial else ""))
            if not isinstance(e, Exception):  # KeyboardInterrupt (SIGINT / SIGTERM): main writes the rest
                raise
            say("!! " + notes[-1])
        state.save(complete=False)
    state.step = "writing results"
    notes.append(f"gpu_check took {state.elapsed():.0f} s in all")
    state.save(complete=True)
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
    say(f"tests: {describe_pytest(state.pytest_result)}")
    for line in plan_lines(state.pytest_result):
        say("  " + line)
    for n in notes:
        say(f"note: {n}")
    failed = (state.pytest_result or {}).get("returncode") not in (0, 5, None) or any(
        r.get("status") == "error" for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

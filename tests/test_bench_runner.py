"""The benchmark runner (bench/runner.py) and the GPU script's summary writer, on the CPU."""
from __future__ import annotations

import json
import os
import math
import sys
from pathlib import Path

import pytest

# bench/ lives beside the package, not inside it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_check, runner  # noqa: E402
from bench.runner import Case  # noqa: E402

TINY = dict(workload="tiny", batch=1, heads=2, seq_q=32, head_dim=16, dtype="fp32", device="cpu")
FAST = runner.TimingConfig(target_s=0.0, min_reps=2, max_reps=2, warmup=1)


def _no_xdist_worker(env: dict) -> dict:
    """env without pytest-xdist's PYTEST_XDIST_* variables: a pytest started from this test (itself
    perhaps in an xdist worker) is then a plain run, no worker."""
    return {n: v for n, v in env.items() if not n.startswith("PYTEST_XDIST_")}


def test_flops_forward_formula():
    assert runner.flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert runner.flops(1, 16, 4096, 4096, 128, causal=False, mode="fwd") == 4 * 16 * 4096 ** 2 * 128


def test_flops_causal_halves_and_backward_is_2_5x():
    fwd = runner.flops(2, 8, 1024, 1024, 64)
    assert runner.flops(2, 8, 1024, 1024, 64, causal=True) == fwd / 2
    assert runner.flops(2, 8, 1024, 1024, 64, mode="bwd") == 2.5 * fwd
    assert runner.flops(2, 8, 1024, 1024, 64, mode="full") == 3.5 * fwd
    assert runner.flops(2, 8, 1024, 1024, 64, causal=True, mode="full") == 3.5 * fwd / 2
    with pytest.raises(ValueError, match="mode"):
        runner.flops(1, 1, 1, 1, 1, mode="sideways")


def test_case_flops_uses_query_heads_and_seq_k():
    c = Case(workload="gqa", batch=1, heads=32, kv_heads=8, seq_q=100, seq_k=300, head_dim=128, causal=True)
    assert c.flops == runner.flops(1, 32, 100, 300, 128, True, "fwd")
    assert c.is_gqa and c.shape == "B1xH32/8xSq100xSk300xD128"


def test_registry_lists_the_named_providers():
    names = runner.provider_names()
    for n in ("attnlib-triton", "attnlib-cuda", "attnlib-auto", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
              "sdpa-math", "flex"):
        assert n in names


def test_register_provider_rejects_duplicates_and_runs_custom(tmp_path):
    import torch

    name = "test-matmul-softmax"
    runner.register_provider(name, lambda case, q, k, v: (lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v),
                             "plain torch", replace_existing=True)
    try:
        with pytest.raises(ValueError, match="twice"):
            runner.register_provider(name, lambda *a: None)
        rec = runner.measure(name, Case(**TINY), timing=FAST)
        assert rec["status"] == "ok" and rec["ms"] > 0
    finally:
        runner.PROVIDERS.pop(name, None)


@pytest.mark.parametrize("mode", ["fwd", "full"])
def test_cpu_record_for_torch_backend(mode):
    rec = runner.measure("attnlib-torch", Case(**TINY, mode=mode), timing=FAST)
    assert rec["status"] == "ok", rec.get("reason")
    assert math.isfinite(rec["ms"]) and rec["ms"] > 0
    assert math.isfinite(rec["tflops"]) and rec["tflops"] > 0
    assert rec["flops"] == runner.flops(1, 2, 32, 32, 16, False, mode)
    assert rec["timer"] == "cpu-perf_counter" and rec["peak_mib"] is None
    assert rec["kernel"]  # the attnlib kernel that ran
    for key in ("provider", "workload", "shape", "dtype", "causal", "mode", "ms", "tflops", "peak_mib", "status"):
        assert key in rec
    json.dumps(rec)


def test_cpu_sdpa_math_runs():
    rec = runner.measure("sdpa-math", Case(**TINY, causal=True), timing=FAST)
    assert rec["status"] == "ok", rec.get("reason")


@pytest.mark.parametrize("provider,words", [
    ("attnlib-cuda", "backend='cuda'"),      # no CUDA kernel runs on CPU tensors
    ("sdpa-cudnn", "No"),                    # SDPA: "No available kernel" / "No viable backend"
    ("flex", "CUDA only"),
])
def test_unavailable_provider_is_a_skip_with_reason(provider, words):
    rec = runner.measure(provider, Case(**TINY), timing=FAST)
    assert rec["status"] == "skipped", rec
    assert words in rec["reason"]
    assert rec["ms"] is None


def test_cuda_case_without_cuda_is_skipped_and_unknown_provider_is_an_error():
    import torch

    if not torch.cuda.is_available():
        rec = runner.measure("sdpa-flash", Case(**{**TINY, "device": "cuda"}), timing=FAST)
        assert rec["status"] == "skipped" and "CUDA" in rec["reason"]
    rec = runner.measure("no-such-provider", Case(**TINY), timing=FAST)
    assert rec["status"] == "error" and "unknown provider" in rec["reason"]


def test_failing_provider_is_recorded_not_raised():
    def boom(case, q, k, v):
        def step():
            raise ZeroDivisionError("kernel exploded")
        return step
    runner.register_provider("test-boom", boom, replace_existing=True)
    try:
        rec = runner.measure("test-boom", Case(**TINY), timing=FAST)
    finally:
        runner.PROVIDERS.pop("test-boom", None)
    assert rec["status"] == "error" and "kernel exploded" in rec["reason"]


def test_suite_budget_skips_the_rest_and_says_so():
    import time

    def slow(case, q, k, v):
        def step():
            time.sleep(0.02)
            return q
        return step
    runner.register_provider("test-slow", slow, replace_existing=True)
    try:
        cases = [Case(**TINY), Case(**TINY, causal=True)]
        recs = runner.run_suite(cases, ["test-slow"], budget_s=0.01, timing=FAST, log=None)
    finally:
        runner.PROVIDERS.pop("test-slow", None)
    assert [r["status"] for r in recs] == ["ok", "skipped"]  # the first starts inside the budget
    assert "time budget of 0.01 s spent" in recs[1]["reason"]


def _rec(provider, ms, workload="w", mode="fwd", status="ok", **kw):
    r = {"provider": provider, "workload": workload, "shape": "B1xH1xS1xD1", "batch": 1, "heads": 1, "kv_heads": 1,
         "seq_q": 1, "seq_k": 1, "head_dim": 1, "dtype": "bf16", "causal": False, "mode": mode, "layout": "bhsd",
         "device": "cuda", "ms": ms, "tflops": None if ms is None else 1.0 / ms, "peak_mib": 12.0,
         "status": status, "reason": None if status == "ok" else "because"}
    r.update(kw)
    return r


def test_speed_ratio_against_fastest_sdpa_per_shape():
    recs = [_rec("sdpa-flash", 2.0), _rec("sdpa-cudnn", 1.5), _rec("sdpa-math", None, status="skipped"),
            _rec("attnlib-triton", 1.0), _rec("attnlib-cuda", 3.0), _rec("flex", 0.5),
            _rec("sdpa-flash", 4.0, mode="full"), _rec("attnlib-triton", 8.0, mode="full"),
            _rec("attnlib-triton", 1.0, workload="no-baseline")]
    ratios = {(x["provider"], x["mode"]): x for x in runner.speed_ratios(recs)}
    assert set(ratios) == {("attnlib-triton", "fwd"), ("attnlib-cuda", "fwd"), ("attnlib-triton", "full")}
    assert ratios[("attnlib-triton", "fwd")]["ratio"] == pytest.approx(1.5)       # 1.5 ms / 1.0 ms
    assert ratios[("attnlib-triton", "fwd")]["baseline"] == "sdpa-cudnn"
    assert ratios[("attnlib-cuda", "fwd")]["ratio"] == pytest.approx(0.5)
    assert ratios[("attnlib-triton", "full")]["ratio"] == pytest.approx(0.5)
    runner.annotate_ratios(recs)
    assert recs[3]["speed_vs_sdpa"] == pytest.approx(1.5) and recs[3]["sdpa_best"] == "sdpa-cudnn"
    assert "speed_vs_sdpa" not in recs[5] and "speed_vs_sdpa" not in recs[8]


def test_gpu_check_summary_is_a_markdown_table(tmp_path):
    recs = runner.annotate_ratios([_rec("sdpa-flash", 2.0), _rec("attnlib-triton", 1.0, kernel="flash-triton"),
                                   _rec("attnlib-cuda", None, status="skipped", reason="no cuda | kernel")])
    env = {"gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132, "torch": "2.11"}
    pytest_result = {"command": "pytest -m gpu -x -q tests/", "returncode": 1, "seconds": 3.0,
                     "counts": {"passed": 5, "failed": 1}}
    path = tmp_path / "out" / "summary.md"
    text = gpu_check.write_summary(path, recs, env, pytest_result, notes=["a note"])
    assert path.read_text() == text
    assert "NVIDIA H100 80GB HBM3" in text and "5 passed, 1 failed" in text and "a note" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| w |")]
    assert len(rows) == 3
    header = [ln for ln in text.splitlines() if ln.startswith("| workload |")][0]
    ncols = header.count(" | ") + 1
    assert all(r.replace("\\|", "").count(" | ") + 1 == ncols for r in rows)
    assert "2.00x (sdpa-flash)" in text                         # the ratio column
    assert "skipped [1]" in text and "no cuda \\| kernel" in text  # reason noted, pipe escaped
    assert "| attnlib-triton | w |" in text                      # the ratio table


def test_gpu_check_parses_pytest_counts_and_slugs():
    assert gpu_check.parse_pytest_counts("....\n3 passed, 1 failed, 2 skipped, 4 deselected in 5.10s\n") == {
        "passed": 3, "failed": 1, "skipped": 2, "deselected": 4}
    assert gpu_check.parse_pytest_counts("== 1 failed, 2 errors in 0.3s ==") == {"failed": 1, "error": 2}
    assert gpu_check.parse_pytest_counts("garbage") == {}
    killed = ("[gw0] [ 1%] PASSED tests/test_a.py::test_x[1]\n[gw1] [ 2%] FAILED tests/test_a.py::test_y\n"
              "[gw0] [ 3%] SKIPPED tests/test_b.py::test_z\n[gw1] [ 4%] PASSED tests/test_b.py::test_w\n")
    assert gpu_check.parse_pytest_counts(killed) == {"passed": 2, "failed": 1, "skipped": 1, "incomplete": 1}
    assert runner.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_check_files_results_by_card(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    src = tmp_path / "fetched"
    runner.write_json(src / "results.json", [_rec("sdpa-flash", 1.0)], {"gpu": "NVIDIA H200"})
    (src / "summary.md").write_text("| x |")
    dest = gpu_check.file_results(src)
    assert dest == tmp_path / "bench" / "results" / "nvidia-h200"
    assert json.loads((dest / "results.json").read_text())["records"][0]["provider"] == "sdpa-flash"
    assert (dest / "summary.md").is_file()


def test_flash_cases_cpu_and_gpu_lists():
    from bench import bench_flash

    cpu = bench_flash.flash_cases(device="cpu")
    assert cpu and all(c.device == "cpu" and c.seq_q <= 256 for c in cpu)
    gpu = bench_flash.flash_cases(quick=True, device="cuda")
    synth = [c for c in gpu if c.workload.startswith("synth")]
    assert {(c.head_dim, c.seq_q) for c in synth} == set(bench_flash.QUICK_SHAPES)
    assert all(c.batch * c.heads * c.seq_q == bench_flash.TOKEN_HEADS for c in synth)
    assert {c.mode for c in gpu} == {"fwd", "full"} and {c.causal for c in synth} == {False, True}
    real = [c for c in gpu if not c.workload.startswith("synth")]
    assert real and all(c.flops / 350e12 <= bench_flash.WORKLOAD_CAP_S[True] for c in real)


def test_failure_log_is_written_as_failures_happen(tmp_path):
    """tests/conftest.py appends each failure's traceback to ATTNLIB_FAILURE_LOG at once, so a
    GPU run killed at its budget still leaves them."""
    import subprocess
    import sys

    (tmp_path / "test_f.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 + 1 == 3\n")
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    log = tmp_path / "failures.log"
    # a plain inner run: with PYTEST_XDIST_WORKER it would leave the log to a controller that does not exist
    env = _no_xdist_worker(dict(os.environ, ATTNLIB_FAILURE_LOG=str(log)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_f.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout
    text = log.read_text()
    assert "test_f.py::test_bad (call)" in text and "assert (1 + 1) == 3" in text
    assert "test_ok" not in text


@pytest.mark.parametrize("causal", [False, True])
def test_output_check_against_sdpa(causal):
    """runner.check_output passes a correct exact-attention provider and catches a wrong one."""
    case = Case(**TINY, causal=causal)
    q, k, v = runner.make_inputs(case)
    good = runner.PROVIDERS["attnlib-torch"].make(case, q, k, v)
    r = runner.check_output(case, good, q, k, v)
    assert r["check_ok"] and r["check_max_abs"] < 1e-5, r
    bad = runner.check_output(case, lambda: good() * 1.01, q, k, v)
    assert bad["check_ok"] is False and bad["check_max_abs"] > 1e-4


def test_cuda_compile_times_builds_then_hits_the_cache():
    """bench_flash.cuda_compile_times: a real NVRTC build into an empty cache, then a cache hit
    (no GPU needed: sm_90 target, nothing loaded)."""
    from attnlib.cuda import loader
    from bench import bench_flash

    if loader.availability_reasons():
        pytest.skip("; ".join(loader.availability_reasons()))
    rows = bench_flash.cuda_compile_times(log=lambda s: None, cc=(9, 0), load=False)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["compile_s"] > 0 and r["binary_bytes"] > 1000 and r["cached_from"] == "hit" for r in rows)


def test_gpu_check_interleaves_test_files():
    """gpu_check asks conftest for a round robin over test files, so a run cut off at its budget
    has reached every file; each file keeps its own order, and nothing is lost or repeated."""
    from types import SimpleNamespace

    from conftest import interleave_by_file

    assert gpu_check.test_environment(Path("/tmp"))["ATTNLIB_TEST_INTERLEAVE"] == "1"
    ids = ["a.py::1", "a.py::2", "a.py::3", "b.py::1", "c.py::1", "c.py::2"]
    got = [i.nodeid for i in interleave_by_file([SimpleNamespace(nodeid=n) for n in ids])]
    assert got == ["a.py::1", "b.py::1", "c.py::1", "a.py::2", "c.py::2", "a.py::3"]


# ----------------------------------------------------------------------------------------------
# gpu_check on a device machine: what comes back ($OUT, at most 8 files), interrupts, test order
def _stage_every_file(stage: Path) -> set:
    names = set(gpu_check.RESULT_FILES) - set(gpu_check.OUT_LIVE) | {"stray-extra.json"}
    for name in names:
        (stage / name).write_text(f"{name}\n")
    return names


def test_gpu_check_out_holds_at_most_8_files_and_import_unpacks(tmp_path, monkeypatch):
    """publish: whatever the steps wrote, $OUT holds OUT_MAX_FILES files at most (the device tool
    returns 8); every staged file is in the bundle or loose, and --import files them all."""
    out, stage = tmp_path / "out", tmp_path / "stage"
    out.mkdir()
    stage.mkdir()
    for name in gpu_check.OUT_LIVE:
        (out / name).write_text("x\n")
    staged = _stage_every_file(stage)
    runner.write_json(out / "results.json", [_rec("sdpa-flash", 1.0)], {"gpu": "NVIDIA H100 80GB HBM3"})
    (out / "written-straight-to-out.md").write_text("a step that ignored the staging folder\n")
    files = gpu_check.publish(out, stage, since=0.0)
    in_out = sorted(p.name for p in out.iterdir())
    assert len(in_out) <= gpu_check.OUT_MAX_FILES == 8, in_out
    assert len(gpu_check.OUT_LIVE) + len(gpu_check.OUT_LOOSE) + 1 <= gpu_check.OUT_MAX_FILES
    assert gpu_check.BUNDLE in in_out and "host_profile.md" in in_out and "profile.md" in in_out
    listed = {f["name"] for f in files}
    assert staged | {"written-straight-to-out.md"} | set(gpu_check.OUT_LIVE) <= listed
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    dest = gpu_check.file_results(out)
    assert dest == tmp_path / "bench" / "results" / "nvidia-h100-80gb-hbm3"
    got = {p.name for p in dest.iterdir()}
    assert staged | {"written-straight-to-out.md", "results.json", "summary.md"} <= got, got
    assert (dest / "sweep_linear.json").read_text() == "sweep_linear.json\n"


def test_gpu_check_cuts_a_runaway_log(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "OUT_MAX_BYTES", 10_000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytest-gpu.log").write_text("".join(f"line {i}\n" for i in range(20_000)))
    gpu_check.publish(out, None)
    text = (out / "pytest-gpu.log").read_text()
    assert (out / "pytest-gpu.log").stat().st_size <= 10_000
    assert text.startswith("line 0\n") and text.endswith("line 19999\n") and "bytes cut here" in text


def test_gpu_check_end_marks():
    marks = gpu_check.end_marks(None)
    assert marks["sweep"] == gpu_check.SWEEP_END_S and marks["flash"] == gpu_check.TOTAL_TARGET_S
    assert all(v <= 100.0 for v in gpu_check.end_marks(100.0).values())


def test_gpu_check_main_on_cpu_writes_summary_with_files(tmp_path, monkeypatch):
    """The whole script on the CPU (no tests, the overhead suite and a sweep, which has nothing to
    do without CUDA): $OUT within its limit, summary.md lists every file, host_profile.md there."""
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    rc = gpu_check.main(["--skip-tests", "--suites", "overhead,sweep_block_sparse", "--end", "120"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= gpu_check.OUT_MAX_FILES and "host_profile.md" in names, names
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True
    listed = {f["name"] for f in data["files"]}
    assert {"overhead.json", "host_profile.md", "sweep_block_sparse.json", gpu_check.BUNDLE} <= listed
    summary = (out / "summary.md").read_text()
    assert "## Files" in summary and "`overhead.json` | suites.tar.gz" in summary


def test_gpu_check_sigint_stops_pytest_and_writes_results(tmp_path):
    """timeout -s INT during the tests: gpu_check stops the pytest process group (nothing left
    on the GPU), writes results.json / summary.md with complete false, and exits 130."""
    import signal
    import subprocess
    import time

    tdir = tmp_path / "t"
    tdir.mkdir()
    mark = tmp_path / "pid"
    (tdir / "test_hang.py").write_text(
        "import os, time\nimport pytest\n\n@pytest.mark.gpu\ndef test_hang():\n"
        f"    open({str(mark)!r}, 'w').write(str(os.getpid()))\n    time.sleep(120)\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(Path(gpu_check.__file__)), "--skip-bench", "--pytest-budget", "200",
                             "--select", "gpu", "--tests", str(tdir / "test_hang.py")],
                            cwd=gpu_check.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not mark.exists() and time.time() - t0 < 120 and proc.poll() is None:
            time.sleep(0.2)
        assert mark.exists(), proc.communicate(timeout=30)[0][-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is False and data["pytest"]["interrupted"] is True
    assert any("INTERRUPTED" in n for n in data["notes"])
    assert "INTERRUPTED" in (out / "summary.md").read_text()
    pid = int(mark.read_text())
    for _ in range(50):  # the test process (in pytest's own session) is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"pytest's test process {pid} still runs after gpu_check was interrupted")


def _collect(args, env_extra, cwd):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(gpu_check.REPO), **env_extra)
    if "ATTNLIB_GPU_SELECT" not in env_extra:
        env.pop("ATTNLIB_GPU_SELECT", None)
    env = _no_xdist_worker(env)  # the plugin writes the plan only from gw0 or no worker
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-p", "bench.gpu_test_order", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return r, [ln.strip() for ln in r.stdout.splitlines() if "::" in ln]


def test_gpu_test_order_tiers(tmp_path):
    """bench/gpu_test_order.py: priority tests first (in PRIORITY's order), then the gpu-marked
    ones, then with gpu+device the device-agnostic ones; CPU-only tests dropped."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_a.py").write_text(
        "import pytest\nDEVICE = 'cuda'\n\n@pytest.mark.gpu\ndef test_g1(): pass\n\n"
        "def test_d1(): pass\n\n@pytest.mark.gpu\ndef test_new(): pass\n\n@pytest.mark.gpu\ndef test_g2(): pass\n")
    (tmp_path / "test_b.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_h(): pass\n\ndef test_cpu_only(): pass\n")
    plan = tmp_path / "plan.tsv"
    env = {"ATTNLIB_GPU_SELECT": "gpu+device", "ATTNLIB_GPU_ORDER_FILE": str(plan), "ATTNLIB_TEST_INTERLEAVE": "1",
           "ATTNLIB_GPU_PRIORITY": "test_a.py::test_new,test_b.py::test_h"}
    r, ids = _collect(["test_a.py", "test_b.py"], env, tmp_path)
    assert ids == ["test_a.py::test_new", "test_b.py::test_h", "test_a.py::test_g1", "test_a.py::test_g2",
                   "test_a.py::test_d1"], r.stdout + r.stderr
    assert [ln.split("\t")[0] for ln in plan.read_text().splitlines()] == ["0", "0", "1", "1", "2"]
    r, ids = _collect(["test_a.py", "test_b.py"], dict(env, ATTNLIB_GPU_SELECT="gpu",
                                                       ATTNLIB_GPU_ORDER_FILE=str(tmp_path / "plan-gpu.tsv")), tmp_path)
    assert "test_a.py::test_d1" not in ids and "test_b.py::test_cpu_only" not in ids and len(ids) == 4
    text = "[gw0] PASSED test_a.py::test_new\n[gw1] FAILED test_b.py::test_h\n"
    tiers = gpu_check.plan_reach(plan, text)
    assert [(t["planned"], t["reached"], t["failed"]) for t in tiers] == [(2, 2, 1), (2, 0, 0), (1, 0, 0)]
    assert tiers[1]["not_reached"] == ["test_a.py::test_g1", "test_a.py::test_g2"]
    # ids whose parameters hold spaces are read whole, in both verbose forms (the stop 22 summary
    # listed such passed tests as not reached)
    spaced = "tests/t.py::test_e[kw1-ValueError-scale must be finite]"
    for line in (f"[gw3] PASSED {spaced} ", f"{spaced} PASSED                     [ 12%]"):
        m = gpu_check._VERBOSE_OUTCOME.search(line)
        assert gpu_check.verbose_node(line, m) == spaced


def test_gpu_test_order_on_the_real_suite(tmp_path):
    """On tests/: every PRIORITY prefix names a collected test, every file with a gpu marker is
    in the plan (found by marker, so a new GPU test file joins by itself), and the plan starts
    with the priority tests in PRIORITY's order (on this CPU, without the device-agnostic ones)."""
    from bench.gpu_test_order import PRIORITY

    repo = gpu_check.REPO
    r, every = _collect(["tests/"], {}, repo)
    assert every, r.stdout[-2000:] + r.stderr[-2000:]
    for prefix in PRIORITY:
        assert any(n.startswith(prefix) for n in every), f"PRIORITY entry {prefix!r} matches no test"
    plan = tmp_path / "plan.tsv"
    r, ids = _collect(["tests/"], {"ATTNLIB_GPU_SELECT": "gpu+device", "ATTNLIB_GPU_ORDER_FILE": str(plan),
                                   "ATTNLIB_TEST_INTERLEAVE": "1"}, repo)
    import re

    marked = {p.name for p in (repo / "tests").glob("test_*.py")
              if re.search(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*mark\.gpu\b)", p.read_text(), re.M)}
    assert "test_flash_triton.py" in marked
    assert marked <= {n.split("::")[0].split("/")[-1] for n in ids}, marked
    rows = [ln.split("\t") for ln in plan.read_text().splitlines()]
    assert [node for _, node in rows] == ids
    first = [node for tier, node in rows if tier == "0"]
    ranks = [next(i for i, p in enumerate(PRIORITY) if n.startswith(p)) for n in first]
    assert ranks == sorted(ranks) and ranks[0] == 0
    assert rows[len(first)][0] == "1"

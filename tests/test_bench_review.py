"""Review of the benchmark suites (bench/): defects a GPU run would have paid for, each shown on
the CPU. Skip reasons must say what is wrong; an interrupt (gpu_check's SIGINT at its command
limit) must leave the suite's rows measured so far, and the kernel profile's profile.md."""
from __future__ import annotations

import json
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_check  # noqa: E402


def _fake_fla(root: Path, body: str) -> None:
    pkg = root / "fla" / "ops" / "linear_attn"
    pkg.mkdir(parents=True)
    (root / "fla" / "__init__.py").write_text("")
    (root / "fla" / "ops" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(body)


@pytest.fixture
def no_fla(monkeypatch):
    for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
        del sys.modules[name]


@pytest.mark.parametrize("body,words", [
    # fla-core 0.6.0 imports einops in fla.ops; the wheel goes in with --no-deps
    ("raise ModuleNotFoundError(\"No module named 'einops'\", name='einops')\n", "einops"),
    ("raise RuntimeError('no supported device found')\n", "no supported device"),
], ids=["missing-dependency", "import-raises"])
def test_fla_skip_reason_names_the_cause(tmp_path, monkeypatch, no_fla, body, words):
    """bench_linear's fla rows: fla-core present but not importable was recorded as "fla-core not
    installed" (a missing einops), or, for any other error at import, ended the linear suite (its
    issue-6 rows measured before it lost with it). Now a skip that names the cause."""
    from bench.bench_linear import _fla_step

    _fake_fla(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    q = k = v = torch.zeros(1, 1, 4, 8)
    step, why = _fla_step(q, k, v, causal=True)
    assert step is None and words in why and "not installed" not in why, why


def test_fla_skip_reason_when_absent(monkeypatch, no_fla):
    from bench.bench_linear import _fla_step

    import importlib.util

    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed here")
    step, why = _fla_step(*(torch.zeros(1, 1, 4, 8),) * 3, causal=True)
    assert step is None and "not installed" in why, why


class _Stop(KeyboardInterrupt):
    pass


def _interrupt_after(n: int, lines: list):
    """A log that raises KeyboardInterrupt (as gpu_check's SIGINT does) at its n-th line."""
    def log(s: str) -> None:
        lines.append(s)
        if len(lines) >= n:
            raise _Stop("SIGINT")
    return log


def test_sla_suite_keeps_rows_measured_before_an_interrupt():
    from bench.bench_sla import run_sla_suite

    rows, lines = [], []
    with pytest.raises(_Stop):
        run_sla_suite(600.0, _interrupt_after(2, lines), device="cpu", shape=dict(batch=1, heads=1, seq=64, head_dim=16),
                      dtype=torch.float32, timing=gpu_check.runner.TimingConfig(target_s=0.0, min_reps=1, max_reps=1),
                      criticals=(0.5,), records=rows)
    assert [r["provider"] for r in rows] == ["attnlib-sla"] and rows[0]["ms"] > 0, rows


def test_linear_suite_keeps_rows_measured_before_an_interrupt():
    from bench.bench_linear import run_linear_suite

    rows, lines = [], []
    with pytest.raises(_Stop):
        run_linear_suite(600.0, _interrupt_after(3, lines), "cpu", seqs=(64, 128), bwd_seq=64,
                         shape=dict(batch=1, heads=1, head_dim=16), dtype=torch.float32,
                         timing=gpu_check.runner.TimingConfig(target_s=0.0, min_reps=1, max_reps=1),
                         copy_bytes=1 << 16, workloads=[], zdot_seq=0, records=rows)
    # the copy-bandwidth line, then seq 64's rows (fla's a skip: non-causal); the interrupt came on seq 128's
    assert [(r["provider"], r["seq"]) for r in rows] == [("attnlib-triton", 64), ("fla", 64)], rows
    assert rows[0]["gbs"] > 0 and rows[1]["skipped"], rows


def test_profile_writes_profile_md_and_keeps_cases_when_interrupted(tmp_path, monkeypatch):
    """profile.md was written only after the last case: an interrupt during the profile (the last
    suite of call 2, the one gpu_check's timeout cuts) lost every case it had profiled."""
    from bench import profile_gpu

    def stop():
        raise _Stop("SIGINT")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(profile_gpu, "cases", lambda: iter([("first case", lambda: None), ("second case", stop)]))
    monkeypatch.setattr(profile_gpu, "_median_ms", lambda fn: 1.5)
    monkeypatch.setattr(profile_gpu, "_graph_ms", lambda fn: 1.25)
    monkeypatch.setattr(profile_gpu, "_kernels", lambda fn: [("kern", 1, 1.0)])
    done: list = []
    with pytest.raises(_Stop):
        profile_gpu.run_profile_suite(30.0, log=lambda s: None, out=str(tmp_path), records=done)
    text = (tmp_path / "profile.md").read_text()
    assert "## first case" in text and "eager 1.500 ms; graph 1.250 ms" in text and "interrupted" in text, text
    assert [r["case"] for r in done] == ["first case"]


def test_gpu_check_writes_a_table_suites_rows_on_sigint(tmp_path, monkeypatch):
    """gpu_check's table suites (linear, sla, profile, ...) returned their rows only at their end:
    a SIGINT during one (timeout -s INT at the command limit) wrote results.json without any of
    that suite's rows. Now what it measured is in <suite>.json in the bundle, with a note."""
    fake = types.ModuleType("bench_review_fake_suite")

    def run(budget_s, log=print, *, records=None):
        records.append({"provider": "attnlib-triton", "seq": 32768, "ms": 1.0})
        raise KeyboardInterrupt("signal 2")

    fake.run = run
    monkeypatch.setitem(sys.modules, "bench_review_fake_suite", fake)
    table = [("linear", "bench_review_fake_suite", "run", 20.0, "sparse_linear", {}) if row[0] == "linear" else row
             for row in gpu_check.SUITE_TABLE]
    monkeypatch.setattr(gpu_check, "SUITE_TABLE", tuple(table))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "file_results", lambda *a, **k: tmp_path)
    assert gpu_check.main(["--skip-tests", "--suites", "linear"]) == 130
    with tarfile.open(tmp_path / gpu_check.BUNDLE) as tar:
        rows = json.load(tar.extractfile("linear.json"))
    assert rows == [{"provider": "attnlib-triton", "seq": 32768, "ms": 1.0}]
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert any("linear suite was interrupted (1 measurements" in n for n in notes), notes
    assert any("INTERRUPTED" in n for n in notes), notes

"""CPU smoke tests of the GPU benchmark suites (bench/bench_block_sparse.py, bench/bench_sla.py):
every provider path and variant runs once at a tiny fp32 shape under the Triton interpreter, so a
mistake in a suite's plumbing shows here and not in the GPU run's few minutes. Timings here mean
nothing; torch SDPA backends and FlexAttention that cannot run on this machine are recorded as
errors, as they would be on a card that lacks them."""
from __future__ import annotations

import pytest
import torch

from bench import runner

pytest.importorskip("triton")

QUICK = runner.TimingConfig(target_s=0.0, min_reps=1, max_reps=1, warmup=1)


def test_block_sparse_suite_runs_every_provider_on_cpu():
    from bench.bench_block_sparse import DENSITIES, PROVIDERS, run_block_sparse_suite

    shape = dict(batch=1, heads=2, seq=200, head_dim=32)  # 2 x 4 mask blocks of (128, 64), ragged
    lines = []
    recs = run_block_sparse_suite(600.0, lines.append, device="cpu", shape=shape, dtype=torch.float32,
                                  timing=QUICK)
    by = {(r["provider"], r["density"]): r for r in recs}
    assert not any("skipped" in r for r in recs)
    for density in DENSITIES:
        r = by[("attnlib-triton", density)]
        assert "error" not in r and r["ms"] > 0 and r["dtype"] == "float32", r
    assert "error" not in by[("flash-triton", 1.0)]
    assert {p for p, _ in by} == set(PROVIDERS)
    assert any(line.startswith("target: attnlib-triton") for line in lines), lines


def test_sla_suite_runs_every_variant_on_cpu():
    from bench.bench_sla import run_sla_suite

    shape = dict(batch=1, heads=2, seq=100, head_dim=32)  # 2 x 2 blocks of 64, ragged
    criticals = (0.05, 0.5)
    lines = []
    recs = run_sla_suite(600.0, lines.append, device="cpu", shape=shape, dtype=torch.float32, timing=QUICK,
                         criticals=criticals)
    assert not any("skipped" in r for r in recs)
    got = {(r["provider"], r["mode"], r.get("critical"), r["variant"]) for r in recs if "error" not in r}
    for mode in ("fwd", "bwd"):
        assert ("attnlib-flash", mode, None, "sla") in got
        assert ("attnlib-sla", mode, criticals[0], "block-128x64") in got
        for crit in criticals:
            assert ("attnlib-sla", mode, crit, "sla") in got
            assert ("attnlib-sla", mode, crit, "sparse-only") in got
    assert any(line.startswith("target: sla fwd") for line in lines), lines
    assert any(line.startswith("target with block_size (128, 64): sla bwd") for line in lines), lines


def test_sage_providers_run_on_cpu():
    """bench_sage's providers through the shared runner at a tiny case: attnlib's Triton sage runs
    (with its accuracy fields), what cannot run here is a skip that says why."""
    from bench.bench_sage import SAGE_PROVIDERS
    from bench.runner import Case

    case = Case(workload="sage-cpu-smoke", batch=1, heads=2, seq_q=160, head_dim=64, causal=False, mode="fwd",
                dtype="fp16", device="cpu")
    recs = runner.run_suite([case], list(SAGE_PROVIDERS) + ["attnlib-triton"], budget_s=600.0, timing=QUICK,
                            log=None)
    by = {r["provider"]: r for r in recs}
    assert set(by) == set(SAGE_PROVIDERS) | {"attnlib-triton"}
    tri = by["attnlib-sage-triton"]
    assert tri["status"] == "ok" and tri["ms"] > 0, tri
    assert tri["cos_sim"] > 0.99 and tri["rel_l1"] < 0.05, tri
    for name in ("attnlib-sage-triton-fp8pv", "attnlib-sage-cuda", "sageattention-1.0.6"):
        assert by[name]["status"] in ("ok", "skipped") and (by[name]["status"] == "ok" or by[name]["reason"])


def test_sage_v16_provider_is_the_same_computation():
    """attnlib-sage-triton-v16 (V cast to fp16 by torch before the kernel) computes what
    attnlib-sage-triton computes on bf16 inputs (the kernel casts each V tile the same way): equal
    outputs, so its time is a fair comparison; fp16 cases are skipped with the reason."""
    import attnlib
    from bench.bench_sage import _sage_v16_make
    from bench.runner import Case, Skip

    from attnlib.testing import make_qkv

    case = Case(workload="sage-cpu-smoke", batch=1, heads=2, seq_q=160, head_dim=64, causal=True, mode="fwd",
                dtype="bf16", device="cpu")
    q, k, v = make_qkv(1, 2, 160, 64, dtype=torch.bfloat16, k_bias=2.0, seed=5)
    got = _sage_v16_make(case, q, k, v)()
    want = attnlib.sage_attention(q, k, v, causal=True, backend="triton")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    with pytest.raises(Skip, match="bf16 inputs only"):
        _sage_v16_make(case, q.half(), k.half(), v.half())


def test_linear_suite_runs_on_cpu():
    from bench.bench_linear import run_linear_suite

    lines = []
    recs = run_linear_suite(600.0, lines.append, "cpu", seqs=(100, 200), bwd_seq=150,
                            shape=dict(batch=1, heads=2, head_dim=32), dtype=torch.float32, timing=QUICK,
                            copy_bytes=1 << 20,
                            workloads=[dict(name="tiny-dit", batch=1, heads=3, head_dim=16, seq=70)], zdot_seq=200)
    zdot = [r for r in recs if r["provider"] == "attnlib-triton-zdot"]
    assert [(r["seq"], r["causal"]) for r in zdot] == [(200, False)] and zdot[0]["gbs"] > 0, zdot
    from attnlib.triton_kernels.linear import kernels
    assert kernels.STATE_Z_DOT is False  # restored after the variant's calls
    ours = [r for r in recs if r["provider"] == "attnlib-triton"]
    # (full, causal) x seqs forward, the workload's forward, then fwd+bwd for each
    assert len(ours) == 2 * 2 + 1 + 2
    assert [(r["heads"], r["head_dim"], r["seq"]) for r in ours if r.get("workload") == "tiny-dit"] == [(3, 16, 70)]
    assert all("error" not in r and "skipped" not in r and r["gbs"] > 0 for r in ours), ours
    assert all(r["skipped"] for r in recs if r["provider"] == "fla" and "ms" not in r)


def test_overhead_suite_on_cpu():
    """bench_overhead: one record per call kind, us per call and the excess over torch SDPA."""
    from bench.bench_overhead import run_overhead_suite

    lines = []
    recs = run_overhead_suite(60.0, lines.append, device="cpu", reps=5)
    assert [r["call"] for r in recs] == ["torch sdpa", "attnlib flash (torch)", "attnlib block_sparse (torch)"]
    assert all(r["us_per_call"] > 0 and "error" not in r for r in recs), recs
    assert recs[0]["excess_us_vs_sdpa"] == 0 and len(lines) == 3


def test_overhead_suite_writes_host_profile_even_past_its_budget(tmp_path):
    """host_profile.md is written whatever the budget (run 1's 15 s ended before it was): the calls
    that ran are profiled, the others listed with why."""
    from bench.bench_overhead import run_overhead_suite

    recs = run_overhead_suite(60.0, lambda s: None, device="cpu", reps=3, out=tmp_path)
    text = (tmp_path / "host_profile.md").read_text()
    assert "## attnlib flash (torch)" in text and "tottime" in text, text[:500]
    recs = run_overhead_suite(0.0, lambda s: None, device="cpu", reps=3, out=tmp_path)
    assert all(r.get("skipped") for r in recs)
    text = (tmp_path / "host_profile.md").read_text()
    assert "not profiled: time budget spent" in text


def test_linear_sweeps_run_on_cpu(tmp_path):
    """bench/sweep_linear.py's plumbing (configs passed to kernels.state / apply, the causal
    config functions patched, the budget shares) at a tiny fp32 shape under the interpreter."""
    from bench import sweep_linear as sl

    configs = {"state": [sl.STATE_CONFIGS[0], sl.STATE_CONFIGS[len(sl._TILES)]], "apply": [sl.APPLY_CONFIGS[0]]}
    recs = sl.run_sweep_suite(600.0, out=tmp_path, device="cpu", seqs=(96,), shape=dict(batch=1, heads=1, head_dim=32),
                              dtype=torch.float32, configs=configs, per_sm_values=(1, 2))
    timed = [r for r in recs if r.get("config") != "default"]
    assert len(timed) == 6 and all("error" not in r and r["rel_err"] < 1e-4 for r in timed), timed
    assert (tmp_path / "sweep_linear.json").is_file()
    small = tuple((which, fn, cands[:1]) for which, fn, cands in sl.CAUSAL_CONFIGS)
    recs = sl.run_sweep_suite(600.0, out=tmp_path, causal=True, device="cpu", seq=96,
                              shape=dict(batch=1, heads=1, head_dim=32), dtype=torch.float32, configs=small)
    timed = [r for r in recs if r.get("config") != "default"]
    assert [(r["which"], r["knob"]) for r in timed] == [
        ("fwd", "fwd_config"), ("dq", "dq_config"), ("dkv", "dkv_config"),
        ("fwd", "causal_stages"), ("dq", "causal_stages"), ("dkv", "causal_stages")], recs
    assert all("error" not in r and r["rel_diff"] < 1e-4 for r in timed), timed
    # the stages knob reaches the one kernel named, the others keep theirs
    with sl.patched("causal_stages", "dq", (3,)):
        assert [sl.lk.causal_stages(w) for w in ("fwd", "dq", "dkv")] == [1, 3, 1]
    # a spent budget still reaches every kernel's default line, and skips the rest
    recs = sl.run_sweep_suite(0.0, out=tmp_path, causal=True, device="cpu", seq=96,
                              shape=dict(batch=1, heads=1, head_dim=32), dtype=torch.float32, configs=small)
    assert all(r.get("skipped") for r in recs) and len(recs) == len(small)


def test_block_sparse_sweep_runs_on_cpu(tmp_path):
    from bench import sweep_block_sparse as sb

    recs = sb.run_sweep_suite(600.0, out=tmp_path, device="cpu", shape=dict(batch=1, heads=1, seq=160, head_dim=32),
                              dtype=torch.float32, candidates=[(4, 2)], blocks=((64, 64),), densities=(1.0, 0.5))
    timed = [r for r in recs if r.get("config") != "default"]
    assert len(timed) == 2 and all("error" not in r and r["rel_diff"] < 1e-5 for r in timed), recs
    assert (tmp_path / "sweep_block_sparse.json").is_file()


def test_profile_cases_run_on_cpu():
    """bench/profile_gpu.py's cases (GPU only in gpu_check): each call built and run once at tiny
    fp32 shapes under the interpreter, so a renamed argument shows here."""
    from bench import profile_gpu

    names = []
    for name, fn in profile_gpu.cases("cpu", torch.float32, sla_shape=dict(batch=1, heads=2, seq=128, head_dim=32),
                                      sparse_shape=dict(batch=1, heads=2, seq=256, head_dim=32),
                                      linear_shape=(1, 2, 128, 32), grid=(2, 4, 16)):
        with torch.no_grad():
            fn()
        names.append(name)
    assert len(names) == 13 and any(n.startswith("asymrnr matching") for n in names), names
    # the "linear branch off" cases split the SLA forward's time only if, at the benchmark's shape,
    # negligible 0.95 leaves no marginal block and the benchmark's own negligible leaves some
    from bench import bench_sla as bsla
    from attnlib.triton_kernels.sla.classify import has_marginal_blocks, row_counts

    assert sum("linear branch off (negligible 0.95)" in n for n in names) == 2, names
    seq = bsla.SHAPE["seq"]
    assert not has_marginal_blocks(seq, seq, bsla.BLOCK, False, 0.05, 0.95)
    assert has_marginal_blocks(seq, seq, bsla.BLOCK, False, 0.05, bsla.NEGLIGIBLE)
    crit_on = row_counts(seq, seq, bsla.BLOCK, False, 0.05, bsla.NEGLIGIBLE, "cpu")[:, 1]
    crit_off = row_counts(seq, seq, bsla.BLOCK, False, 0.05, 0.95, "cpu")[:, 1]
    assert torch.equal(crit_on, crit_off)  # the same critical blocks per row: the gap is the linear branch


def test_torch_cpu_suite_runs_and_writes_its_table(tmp_path):
    """bench/bench_torch_cpu.py at a cut sequence: every kernel and form measured, both files written."""
    from bench import bench_torch_cpu

    res = bench_torch_cpu.run(seq=96, reps=1, log=lambda _line: None)
    names = {(r["name"], r["mode"]) for r in res["records"]}
    for form in ("masked", "gathered"):
        for density in bench_torch_cpu.DENSITIES:
            assert (f"block_sparse {form} density {density}", "fwd") in names
        assert (f"sla {form} critical 0.05", "fwd+bwd") in names
    assert all(r["ms"] > 0 for r in res["records"]) and res["shape"]["seq"] == 96
    for dense in ("attnlib flash: torch SDPA and its backward", "flash-torch-chunked", "torch SDPA called directly"):
        assert (f"dense ({dense})", "fwd+bwd") in names
    from attnlib.kernels import flash_sdpa

    assert flash_sdpa.cpu_backward_ok.__name__ == "cpu_backward_ok"  # the chunked run's switch restored
    bench_torch_cpu.write(res, tmp_path)
    assert "| block_sparse gathered density 0.1 | fwd |" in (tmp_path / "torch-cpu.md").read_text()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_key_mask_providers_time_the_same_masked_attention(layout, monkeypatch):
    """bench_flash's key-mask providers (attnlib-triton with key_mask, torch SDPA with the same
    attn_mask) compute the same attention, here at a small shape under the interpreter; any other
    shape is skipped with its reason."""
    from bench import bench_flash, runner

    monkeypatch.setattr(bench_flash, "KEY_MASK_SHAPE", (64, 96))
    case = runner.Case(workload="synth-small", batch=2, heads=2, seq_q=96, head_dim=64, dtype="fp16", device="cpu",
                       layout=layout)
    q, k, v = runner.make_inputs(case)
    outs = [runner.PROVIDERS[name].make(case, q, k, v)() for name in ("attnlib-triton-keymask", "sdpa-keymask")]
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=3e-3, rtol=0)
    unmasked = runner.PROVIDERS["attnlib-triton"].make(case, q, k, v)()
    assert (unmasked.float() - outs[0].float()).abs().max() > 1e-2  # the mask is really applied
    other = runner.Case(workload="synth-small", batch=1, heads=2, seq_q=64, head_dim=64, dtype="fp16", device="cpu")
    with pytest.raises(runner.Skip, match="key-mask providers run at"):
        runner.PROVIDERS["sdpa-keymask"].make(other, *runner.make_inputs(other))

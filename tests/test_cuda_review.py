"""CPU checks from a review of attnlib.cuda and the CUDA kernels' host code: one test per defect
fixed (no GPU needed; nothing here launches a kernel)."""
from __future__ import annotations

import pytest
import torch

from attnlib.api import build_inputs
from attnlib.cuda import loader, specs, toolchain
from attnlib.kernels.sage_cuda import SageCUDA


def test_shipped_cubin_lookup_hashes_the_sources_once(tmp_path, monkeypatch):
    """arch_reasons runs in every dispatch check of a CUDA kernel and asks shipped_cubin, which
    hashed every source file again on each call where a cubin folder exists (an install with
    ATTNLIB_CUDA_ARCHS): about 1 ms of host time per attention call. The hash is now taken once;
    the folder and the ATTNLIB_CUDA_NO_CUBINS switch are still read at each call."""
    spec = specs.flash_fwd_spec(64, "fp16", False)
    cubin = tmp_path / specs.cubin_filename(spec, "90", specs.source_hash(toolchain.csrc_dir(), spec))
    cubin.write_bytes(b"\x7fELF fake cubin")
    monkeypatch.setenv("ATTNLIB_CUBIN_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNLIB_CUDA_NO_CUBINS", raising=False)
    monkeypatch.setattr(loader, "_source_hashes", {}, raising=False)
    calls = []

    def counting_hash(csrc, s):
        calls.append(s.name)
        return specs.source_hash(csrc, s)

    monkeypatch.setattr(loader, "source_hash", counting_hash)
    for _ in range(5):
        assert loader.arch_reasons(spec, (9, 0)) == []
        assert loader.shipped_cubin(spec, (9, 0)) == str(cubin)
    assert calls == [spec.name]
    monkeypatch.setenv("ATTNLIB_CUDA_NO_CUBINS", "1")
    assert loader.shipped_cubin(spec, (9, 0)) is None
    monkeypatch.delenv("ATTNLIB_CUDA_NO_CUBINS")
    monkeypatch.setenv("ATTNLIB_CUBIN_DIR", str(tmp_path / "elsewhere"))
    assert loader.shipped_cubin(spec, (9, 0)) is None


@pytest.mark.parametrize("pv, accum", [("fp16", 0), ("fp16_accum", 1)])
def test_sage_cuda_spec_is_the_specialisation_it_launches(pv, accum):
    """SageCUDA.spec (what the dispatch checks: shipped cubin, NVRTC arch) named the pv='fp16'
    kernel whatever the pv option, while sage_fwd_cuda launches the pv='fp16_accum' one for it."""
    q = torch.randn(1, 2, 80, 64, dtype=torch.float16)
    inp = build_inputs(q, q, q, method="sage", causal=True, pv=pv)
    spec = SageCUDA().spec(inp)
    assert spec == specs.sage_fwd_spec(64, True, pv, block_n=64)
    assert f"_pvacc{accum}_" in spec.name


def test_cubin_and_source_dirs_from_env_expand_user(tmp_path, monkeypatch):
    """ATTNLIB_CUBIN_DIR / ATTNLIB_CSRC_DIR holding a "~" no shell expanded (a Dockerfile ENV, a
    .env file): the shipped cubins were silently not found (NVRTC compiled instead), as the cache
    folder's variable already handles (cache.default_cache_dir)."""
    spec = specs.flash_fwd_spec(64, "fp16", False)
    home = tmp_path / "home"
    (home / "cubins").mkdir(parents=True)
    cubin = home / "cubins" / specs.cubin_filename(spec, "90", specs.source_hash(toolchain.csrc_dir(), spec))
    cubin.write_bytes(b"\x7fELF fake cubin")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ATTNLIB_CUBIN_DIR", "~/cubins")
    monkeypatch.delenv("ATTNLIB_CUDA_NO_CUBINS", raising=False)
    assert loader.cubin_dir() == str(home / "cubins")
    assert loader.shipped_cubin(spec, (9, 0)) == str(cubin)
    monkeypatch.setenv("ATTNLIB_CSRC_DIR", "~/csrc")
    assert toolchain.csrc_dir() == str(home / "csrc")

"""Review of the flash_attn drop-in, attnlib.varlen and `python -m attnlib`: one test per defect
found (each fails without its fix)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlib
from attnlib.__main__ import main
from attnlib.compat import flash_attn as fa


def test_bench_subcommand_takes_its_own_options(capsys):
    # `python -m attnlib bench --list-providers` (or --full, --budget, --providers ... as
    # bench/runner.main_cli documents) was refused by the top-level parser: argparse's
    # REMAINDER does not take arguments that start with "-"
    assert main(["bench", "--list-providers"]) == 0
    assert "attnlib-torch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # bench's own help, not the wrapper's "rest" positional
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--providers" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs here")
def test_demo_says_why_a_method_failed(capsys):
    # it printed only "no attnlib kernel can run this call." for each method: the rejected
    # kernels' reasons and the hint were on the lines it dropped
    assert main(["demo", "--backend", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "flash-cuda (cuda): no CUDA device is visible" in out
    assert "linear-cuda (cuda): no cuda kernel registered for linear" in out
    assert "backend cuda" in out.splitlines()[0]  # the header says which backend was asked for


def _varlen_args():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(20, 4, 16, generator=gen)
    k, v = torch.randn(30, 2, 16, generator=gen), torch.randn(30, 2, 16, generator=gen)
    cu_q = torch.tensor([0, 5, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_varlen_under_torch_func_grad_names_the_limitation():
    # torch.func.grad / vjp raised torch's "must override the setup_context staticmethod", which
    # names nothing of attnlib's; and the jvp refusal recommended torch.func.vjp, which fails so
    q, k, v, cu_q, cu_k = _varlen_args()

    def loss(q_):
        return fa.flash_attn_varlen_func(q_, k, v, cu_q, cu_k, 15, 20, causal=True).sum()

    with pytest.raises(NotImplementedError, match="torch.func.*Tensor.backward"):
        torch.func.grad(loss)(q)
    with pytest.raises(NotImplementedError, match="torch.func") as e:
        torch.func.jvp(lambda q_: fa.flash_attn_varlen_func(q_, k, v, cu_q, cu_k, 15, 20), (q,), (q,))
    assert "torch.func.vjp" not in str(e.value)
    # what it points to works, and a transform that does not differentiate the call still runs it
    q1 = q.clone().requires_grad_()
    loss(q1).backward()
    w = torch.randn(20, 4, 16)
    g = torch.func.grad(lambda w_: (w_ * fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 15, 20)).sum())(w)
    torch.testing.assert_close(g, fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 15, 20))


def test_demo_with_a_bad_attnlib_backend_says_so_once(monkeypatch, capsys):
    # the new header resolves the backend: a bad ATTNLIB_BACKEND is one line and exit code 2,
    # not a traceback
    monkeypatch.setenv("ATTNLIB_BACKEND", "bogus")
    assert main(["demo"]) == 2
    assert "ATTNLIB_BACKEND must be one of" in capsys.readouterr().err


def test_attention_under_torch_func_grad_names_the_limitation():
    # torch.func.grad / vjp over attnlib.attention raised torch's "must override the setup_context
    # staticmethod" error, which names nothing of attnlib's; the jvp refusal recommended vjp
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    for transform in (lambda f: torch.func.grad(f)(q), lambda f: torch.func.vjp(f, q)):
        with pytest.raises(NotImplementedError, match="torch.func"):
            transform(lambda a: attnlib.attention(a, k, v, backend="torch").sum())
    with pytest.raises(NotImplementedError, match="forward-mode") as e:
        torch.func.jvp(lambda a: attnlib.attention(a, k, v, backend="torch"), (q,), (torch.ones_like(q),))
    assert "torch.func.vjp" not in str(e.value)
    # a call the transform does not differentiate still runs
    out = torch.func.grad(lambda a: (a * attnlib.attention(q.detach(), k, v, backend="torch")).sum())(q)
    assert torch.equal(out, attnlib.attention(q.detach(), k, v, backend="torch"))


def test_bool_flags_name_numpy_bool_by_its_module():
    # NumPy 2 names its bool type "bool": the error read "causal must be a bool, got bool"
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="causal must be a bool, got numpy.bool"):
        attnlib.attention(q, q, q, causal=np.bool_(True))


def test_demo_piped_into_a_reader_that_stops_ends_quietly():
    # `python -m attnlib demo | head -1` printed a BrokenPipeError traceback: the demo's broad
    # except caught it and printed again into the closed pipe
    import subprocess
    import sys

    env = dict(__import__("os").environ, ATTNLIB_BACKEND="torch", PYTHONUNBUFFERED="1")  # each line at once
    proc = subprocess.Popen([sys.executable, "-m", "attnlib", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b"attnlib demo on ")
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)
    assert "Traceback" not in err and "BrokenPipe" not in err

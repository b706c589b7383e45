"""torch.utils.flop_counter.FlopCounterMode (how training scripts compute MFU) counts attnlib's ops
as torch counts its own SDPA (ops._register_flop_formulas, varlen._register_flop_formulas):
flash and sage by torch's dense formulas, forward and backward; the varlen ops summed over their
sequences; the other methods, whose work is not dense attention's, not at all (0, no formula)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import attnlib
from attnlib.testing import make_qkv


def _counted(fn) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def _heads_as_query(shapes):
    """bhsd shapes with k and v given the query's heads: GQA does the products of that many heads
    (torch 2.13's formulas count GQA shapes so; torch 2.11's refuse unequal head counts)."""
    (b, h, sq, d), k, v = shapes
    return [(b, h, sq, d), (k[0], h, *k[2:]), (v[0], h, *v[2:])]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("method", ["flash", "sage"])
def test_dense_methods_count_as_torch_sdpa(method, layout):
    # GQA, seq_q != seq_k: torch's formula on the bhsd shapes
    q, k, v = make_qkv(2, 4, 37, 16, kv_heads=2, seq_k=53, layout=layout, seed=0)
    shapes = [tuple(t.shape) if layout == "bhsd" else tuple(t.transpose(1, 2).shape) for t in (q, k, v)]
    counts = _counted(lambda: attnlib.attention(q, k, v, method=method, layout=layout, causal=True))
    assert counts == {"attnlib.attention": sdpa_flop_count(*_heads_as_query(shapes))}
    assert counts["attnlib.attention"] == 2 * 2 * 4 * 37 * 53 * (16 + 16)


def test_flash_backward_counts_as_torch_sdpa():
    # float64: the op's own backward (torch SDPA's CPU autograd serves fp32 training, counted by torch)
    q, k, v = make_qkv(1, 4, 45, 16, kv_heads=1, seq_k=30, dtype=torch.float64, requires_grad=True, seed=1)
    counts = _counted(lambda: attnlib.flash_attention(q, k, v).sum().backward())
    shapes = _heads_as_query([tuple(t.shape) for t in (q, k, v)])
    assert counts == {"attnlib.attention": sdpa_flop_count(*shapes),
                      "attnlib.attention_backward": sdpa_backward_flop_count(shapes[0], *shapes)}
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("method", ["linear", "sla", "block_sparse"])
def test_other_methods_claim_no_dense_count(method):
    q, k, v = make_qkv(1, 2, 40, 16, seed=2)
    opts = {"block_mask": torch.ones(1, 2, 1, 1, dtype=torch.bool)} if method == "block_sparse" else {}
    assert _counted(lambda: attnlib.attention(q, k, v, method=method, **opts)) == {"attnlib.attention": 0}


def test_varlen_counts_each_sequence():
    gen = torch.Generator().manual_seed(3)
    lengths_q, lengths_k = [20, 7, 33], [11, 40, 5]
    total_q = sum(lengths_q) + 4  # padding rows past cu_seqlens_q[-1]: not counted
    q = torch.randn(total_q, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def cu(lengths):
        return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    counts = _counted(lambda: attnlib.flash_attention_varlen(q, k, v, cu(lengths_q), cu(lengths_k), 33, 40,
                                                             causal=True).sum().backward())
    pairs = sum(a * b for a, b in zip(lengths_q, lengths_k))
    assert counts == {"attnlib.flash_varlen": 2 * 4 * pairs * (16 + 8),
                      "attnlib.flash_varlen_backward": 2 * 4 * pairs * (3 * 16 + 2 * 8)}
    # torch's own formula per sequence gives the same forward count
    assert counts["attnlib.flash_varlen"] == sum(sdpa_flop_count((1, 4, a, 16), (1, 4, b, 16), (1, 4, b, 8))
                                                 for a, b in zip(lengths_q, lengths_k))


def test_varlen_meta_counts_max_lengths():
    q = torch.empty(60, 4, 16, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")  # no values: each sequence at the max
    counts = _counted(lambda: attnlib.flash_attention_varlen(q, q, q, cu, cu, 25, 30))
    assert counts == {"attnlib.flash_varlen": 2 * 4 * 3 * 25 * 30 * (16 + 16)}

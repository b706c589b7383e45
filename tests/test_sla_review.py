"""SLA review: defects found by probing SparseLinearAttention / sla_attention as a user fine-tuning
a DiT would (every gradient against the float64 reference, module state, bad input), each with a
test that fails without its fix."""
from __future__ import annotations

import pytest

import attnlib
from attnlib.testing import make_qkv

KW = dict(critical=0.25, negligible=0.25, block_size=(16, 16))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_module_names_v_with_the_wrong_head_dim(layout):
    """v whose head_dim is not the module's is refused naming v (it named proj_weight, an argument
    the module's user never passes: "proj_weight must have shape (32, 32) (value head_dim 32)")."""
    m = attnlib.SparseLinearAttention(16, **KW)
    q, k, _ = make_qkv(1, 2, 20, 16, layout=layout, seed=1)
    _, _, v = make_qkv(1, 2, 20, 16, head_dim_v=32, layout=layout, seed=2)
    with pytest.raises(ValueError, match="v must have head_dim 16 \\(the module's\\), got 32"):
        m(q, k, v, layout=layout)

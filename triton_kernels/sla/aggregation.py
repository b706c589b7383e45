"""Which way the SLA kernels sum the marginal key-block states: ATTNLIB_SLA_ROW_STATES, read per
call. No Triton import here, so the dispatcher can ask without Triton installed."""
from __future__ import annotations

import os

ROW_STATES_ENV = "ATTNLIB_SLA_ROW_STATES"


def row_states_enabled() -> bool:
    """True (the default): every query block's marginal sum as one product per head
    (row_states.py). The default since the H100 run of 2026-11-27 (Wan2.1-1.3B, critical 0.05:
    forward 1.40x, backward 4.05x faster than pre-aggregating per tile). ROW_STATES_ENV=0 selects
    the per-tile pre-aggregation, which keeps no D x D state per query block."""
    return os.environ.get(ROW_STATES_ENV, "1") != "0"

"""The environment switches the Triton launchers of several methods read, in one place (a
method's own opt-ins stay beside it: ATTNLIB_FLASH_TMA in flash/configs.py, ATTNLIB_SLA_ROW_STATES
in sla/aggregation.py).

Read per call, not at import, so a test or benchmark may flip them with monkeypatch.setenv:
  TRITON_INTERPRET=1            Triton's CPU interpreter runs the kernels (one small config each).
  ATTNLIB_<METHOD>_AUTOTUNE=0   the method's launchers take their first (default) candidate
                                instead of autotuning; METHOD is FLASH, SAGE, ASYMRNR or SLA.
  ATTNLIB_FLASH_ATOMIC_DQ=1     the flash backward of a deterministic=False call adds dQ with
                                atomics inside its dK/dV kernel (slower where measured: see
                                triton_kernels/flash/backward.py).
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled(method: str) -> bool:
    """False when ATTNLIB_<METHOD>_AUTOTUNE is "0" (the GPU tests set it for speed)."""
    return os.environ.get(f"ATTNLIB_{method.upper()}_AUTOTUNE", "1") != "0"


def atomic_dq_enabled() -> bool:
    return os.environ.get("ATTNLIB_FLASH_ATOMIC_DQ") == "1"

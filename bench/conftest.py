"""pytest set-up for bench/: collect bench_*.py files (pytest's default looks for test_*.py)."""
from __future__ import annotations

import pytest


def pytest_collect_file(parent, file_path):
    # files named on the command line are collected by pytest itself; don't collect them twice
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

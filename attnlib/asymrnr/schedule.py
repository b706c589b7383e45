"""AsymRnR schedule (reduction ratios per (block, step)) and the matching cache.

A ratio is given as a number (every block and step), a callable ``(block, step) -> ratio``, or a
table ``{(block, step): ratio}`` in which missing entries mean 0 (no reduction there): the
paper reduces only in some blocks and some denoising steps.

The cache keeps the partition and the matches of each (block, Q or K/V) for ``cache_steps``
consecutive steps: steps s with the same ``s // cache_steps`` share them (an epoch); the first
call of an epoch computes them from its own tensors. A refresh also draws a new partition
(seed derived from (seed, block, epoch); block 0 of epoch 0 uses the seed itself).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping

from .config import check_count, check_ratio

_SEED_MOD = 2 ** 63


class Schedule:
    """q_ratio / kv_ratio per (block, step)."""

    def __init__(self, q_ratio: Any = 0.5, kv_ratio: Any = 0.3) -> None:
        self.q_ratio = self._spec("q_ratio", q_ratio)
        self.kv_ratio = self._spec("kv_ratio", kv_ratio)

    @staticmethod
    def _spec(name: str, spec: Any):
        if callable(spec):
            return spec
        if isinstance(spec, Mapping):
            for key, r in spec.items():
                if not (isinstance(key, tuple) and len(key) == 2):
                    raise TypeError(f"{name} table keys must be (block, step) pairs, got {key!r}")
                check_ratio(f"{name}[{key}]", r)
            return dict(spec)
        return check_ratio(name, spec)

    @staticmethod
    def _at(name: str, spec, block: int, step: int) -> float:
        if callable(spec):
            return check_ratio(f"{name}({block}, {step})", spec(block, step))
        if isinstance(spec, dict):
            return float(spec.get((block, step), 0.0))
        return spec

    def ratios(self, block: int, step: int) -> tuple[float, float]:
        """(q_ratio, kv_ratio) at this block and step."""
        return self._at("q_ratio", self.q_ratio, block, step), self._at("kv_ratio", self.kv_ratio, block, step)


def derived_seed(seed: int, block: int, epoch: int) -> int:
    return (seed + 1_000_003 * block + 7_919 * epoch) % _SEED_MOD


class MatchCache:
    """(block, kind) -> the partition and matches of the current epoch, with hit/miss counts."""

    def __init__(self, cache_steps: int = 1) -> None:
        self.cache_steps = check_count("cache_steps", cache_steps, minimum=1)
        self._entries: dict[Hashable, tuple[int, Hashable, Any]] = {}
        self.hits = 0
        self.misses = 0

    def epoch(self, step: int) -> int:
        return step // self.cache_steps

    def get(self, key: Hashable, step: int, signature: Hashable, compute: Callable[[int], Any]) -> Any:
        """The cached value for key if it is of this step's epoch and the same signature (shapes,
        device, dtype), else ``compute(epoch)``, stored."""
        epoch = self.epoch(step)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == epoch and entry[1] == signature:
            self.hits += 1
            return entry[2]
        self.misses += 1
        value = compute(epoch)
        self._entries[key] = (epoch, signature, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

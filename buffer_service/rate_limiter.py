"""Replay-ratio rate limiting (Reverb's ``SampleToInsertRatio``, Cassirer et al.
2021, "Reverb: A Framework For Experience Replay", §3.3).

With ``ratio`` the target replay ratio (sampled transitions per inserted
transition) and ``m`` = ``min_size_to_sample``, the limiter tracks the
sample debt

    ``debt = ratio · (inserted − m) − sampled``

and allows

* a sample of ``n`` transitions when ``inserted ≥ m`` and ``debt − n ≥ −tolerance``
  (the learner may run ahead of the target by at most ``tolerance``);
* an insert of ``k`` transitions when ``inserted < m`` or
  ``debt + ratio · k ≤ tolerance`` (collection may run ahead by at most
  ``tolerance`` samples' worth).

Whoever is ahead waits; the caller (:class:`buffer_service.shard.ReplayShard`)
does the waiting. The two sides cannot both be blocked as long as
``2 · tolerance ≥ max_sample + ratio · max_insert``, which the constructor
checks. ``ratio=None`` disables the ratio: only ``min_size_to_sample`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RateLimiterTimeout(TimeoutError):
    """A call waited longer than the configured timeout for its turn."""


@dataclass
class RateLimiter:
    """Counters and admission rules; not thread-safe (the shard locks).

    Args:
        min_size_to_sample: transitions inserted before any sample, ``≥ 1``.
        ratio: target sampled / inserted transitions, ``> 0``, or ``None``.
        tolerance: allowed deviation from the target, in sampled transitions.
        max_sample: largest sample the caller will ask for (for the deadlock check).
        max_insert: largest insert (a chunk's steps) the caller will make.

    Raises:
        ValueError: non-positive sizes, or a tolerance too small for the
            largest sample and insert (the two sides could deadlock).
    """

    min_size_to_sample: int
    ratio: float | None
    tolerance: float
    max_sample: int
    max_insert: int
    inserted: int = 0
    sampled: int = 0

    def __post_init__(self) -> None:
        if self.min_size_to_sample < 1:
            raise ValueError("min_size_to_sample must be >= 1")
        if self.ratio is not None:
            if self.ratio <= 0:
                raise ValueError("replay ratio must be > 0")
            needed = (self.max_sample + self.ratio * self.max_insert) / 2
            if self.tolerance < needed:
                raise ValueError(
                    f"replay ratio tolerance {self.tolerance:g} is below "
                    f"(max sample {self.max_sample} + ratio {self.ratio:g} x max insert "
                    f"{self.max_insert}) / 2 = {needed:g}: inserts and samples could "
                    "block each other forever"
                )

    @property
    def debt(self) -> float:
        """``ratio · (inserted − min_size) − sampled`` (0 when the ratio is off)."""
        if self.ratio is None:
            return 0.0
        return self.ratio * (self.inserted - self.min_size_to_sample) - self.sampled

    def can_insert(self, steps: int) -> bool:
        if self.ratio is None or self.inserted < self.min_size_to_sample:
            return True
        return self.debt + self.ratio * steps <= self.tolerance

    def can_sample(self, count: int) -> bool:
        if self.inserted < self.min_size_to_sample:
            return False
        if self.ratio is None:
            return True
        return self.debt - count >= -self.tolerance

    def record_insert(self, steps: int) -> None:
        self.inserted += steps

    def record_sample(self, count: int) -> None:
        self.sampled += count

    def describe(self) -> str:
        """Counters for an error message."""
        return (
            f"inserted={self.inserted} sampled={self.sampled} "
            f"min_size_to_sample={self.min_size_to_sample} ratio={self.ratio} "
            f"debt={self.debt:g} tolerance={self.tolerance:g}"
        )

    def state(self) -> dict[str, Any]:
        """Counters for a snapshot (JSON-able)."""
        return {"inserted": self.inserted, "sampled": self.sampled}

    def load_state(self, state: dict[str, Any]) -> None:
        self.inserted = int(state["inserted"])
        self.sampled = int(state["sampled"])

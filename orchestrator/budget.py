"""One wall-clock budget per arm x seed, and the one clock all budget logic reads.

Tests replace the clock with `FakeClock` and advance it, so budget logic is tested without
sleeping. The budget starts before anything the arm causes (Tuner set-up, actor start-up), so
all of it counts against the arm.
"""
from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], float]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tolerance(seconds: float) -> float:
    """How far past its budget an arm may run: max(2%, 5 s) (the stop is cooperative: a trial
    ends at its next report)."""
    return max(0.02 * seconds, 5.0)


class Budget:
    def __init__(self, seconds: float, clock: Clock = time.monotonic):
        if seconds <= 0:
            raise ValueError(f"budget must be > 0 seconds, got {seconds}")
        self.seconds, self.clock = float(seconds), clock
        self._start: float | None = None

    def start(self) -> "Budget":
        self._start = self.clock()
        return self

    @property
    def started(self) -> bool:
        return self._start is not None

    def elapsed(self) -> float:
        return 0.0 if self._start is None else self.clock() - self._start

    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def exhausted(self) -> bool:
        return self.started and self.elapsed() >= self.seconds

    def overrun(self) -> float:
        """Seconds used past the budget (0 when within it)."""
        return max(0.0, self.elapsed() - self.seconds)

    def within_tolerance(self) -> bool:
        return self.overrun() <= tolerance(self.seconds)

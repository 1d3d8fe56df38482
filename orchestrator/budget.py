"""One wall-clock budget per arm x seed, read on one injectable clock.

Tests replace the clock with `FakeClock` and advance it, so budget logic is tested without
sleeping. The budget starts before anything the arm causes (Tuner set-up, actor start-up), so
all of it counts against the arm. Its end travels to the trials as a `Deadline`
(`Budget.deadline()`), which workers and methods read between epochs and minibatches.
"""
from __future__ import annotations

import time

# The clock types live in methods/ so that trials can read a deadline; imported from here too.
from hypersweep.methods.clock import Clock, Deadline, FakeClock

__all__ = ["Budget", "Clock", "Deadline", "FakeClock", "tolerance", "within_budget"]


def tolerance(seconds: float) -> float:
    """How far past its budget an arm may run: max(2%, 5 s) (the stop is cooperative: a trial
    ends at its next report)."""
    return max(0.02 * seconds, 5.0)


def within_budget(used: float, seconds: float) -> bool:
    """The budget check: `used` seconds of a `seconds` budget, its tolerance included."""
    return used <= seconds + tolerance(seconds)


class Budget:
    def __init__(self, seconds: float, clock: Clock = time.monotonic, wall_clock: Clock | None = None, *,
                 used_s: float = 0.0):
        """`clock` measures the budget; `wall_clock` is what its deadline is read on, by default
        `time.time` when `clock` is the monotonic clock and otherwise `clock` itself (a
        FakeClock then drives the trials' stopping too). `used_s`: seconds spent before this
        budget object started (a resumed arm is charged what it had used; the time between a
        crash and the resume is not charged)."""
        if seconds <= 0:
            raise ValueError(f"budget must be > 0 seconds, got {seconds}")
        self.seconds, self.clock, self.used_s = float(seconds), clock, float(used_s)
        self.wall_clock = wall_clock or (time.time if clock is time.monotonic else clock)
        self._start: float | None = None

    def start(self) -> "Budget":
        self._start = self.clock()
        return self

    @property
    def started(self) -> bool:
        return self._start is not None

    def elapsed(self) -> float:
        """Seconds used: before this object started (`used_s`) and since."""
        return self.used_s + (0.0 if self._start is None else self.clock() - self._start)

    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def exhausted(self) -> bool:
        return self.started and self.elapsed() >= self.seconds

    def overrun(self) -> float:
        """Seconds used past the budget (0 when within it)."""
        return max(0.0, self.elapsed() - self.seconds)

    def within_tolerance(self) -> bool:
        return within_budget(self.elapsed(), self.seconds)

    def deadline(self) -> Deadline:
        """Where the budget ends, for trials to read in other processes: on the wall clock."""
        return Deadline(self.wall_clock() + self.remaining(), self.wall_clock)

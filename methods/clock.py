"""The clock that stopping reads, and the deadline that carries it from the coordinator down to
a trial's minibatches.

Budget logic (orchestrator/budget.py) and the deadline checks in workers/ and methods/ all read
a `Clock`, a function returning seconds; tests put a `FakeClock` in and advance it, so stopping is
tested without sleeping. Nothing here imports torch or Ray: the orchestrator imports it at CLI
start-up.
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

    def __deepcopy__(self, memo) -> "FakeClock":
        # One clock: a copied config (Tune's Trainable sets up from a deepcopy) reads the same
        # time the test advances. Pickling to another process cannot share it.
        return self


class Deadline(float):
    """An absolute time on the wall clock and the clock it is read on (`time.time`, or a
    `FakeClock` in tests). Read it only through `passed()` and `remaining()`.

    Wall clock, not monotonic: the coordinator sets the deadline and trials read it in other
    processes and on other machines, where only the wall clock (NTP-synced seconds since the
    epoch) has the same zero; a monotonic clock counts from each machine's boot.

    A float (its value is the time) so that a trial config carrying one stays plain data: Tune
    hands the config back with each result and the trial records are written as JSON with it
    (orchestrator/ensembles.py `write_trial_records`), where a deadline is that number.
    """

    __slots__ = ("clock",)

    def __new__(cls, at: float, clock: Clock = time.time) -> "Deadline":
        self = super().__new__(cls, at)
        self.clock = clock
        return self

    def __reduce__(self):
        # pickle and deepcopy (Tune copies configs, Ray ships them to workers) keep the clock
        return (Deadline, (float(self), self.clock))

    def __repr__(self) -> str:
        return f"Deadline({float(self)!r}, clock={self.clock!r})"

    def passed(self) -> bool:
        return self.clock() >= self

    def remaining(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, float(self) - self.clock())


def past(deadline: Deadline | None) -> bool:
    """Whether `deadline` has passed; no deadline (None) never passes."""
    return deadline is not None and deadline.passed()

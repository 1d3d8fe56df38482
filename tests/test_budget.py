"""Budget logic on a fake clock: no sleeping."""
import pytest

from hypersweep.orchestrator.budget import Budget, FakeClock
from hypersweep.orchestrator.tune_run import BudgetStopper


def test_budget_on_a_fake_clock():
    clock = FakeClock(100.0)
    b = Budget(30, clock)
    assert not b.exhausted() and b.elapsed() == 0.0  # not started: nothing counts yet
    b.start()
    clock.advance(29.5)
    assert b.elapsed() == 29.5 and b.remaining() == 0.5 and not b.exhausted()
    clock.advance(0.5)
    assert b.exhausted() and b.remaining() == 0.0


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        Budget(0)


def test_stopper_keeps_the_report_then_stops_everything():
    clock = FakeClock()
    budget = Budget(10, clock).start()
    stop = BudgetStopper(budget, max_steps=5)
    assert not stop("t1", {"training_iteration": 1}) and not stop.stop_all()
    assert stop("t1", {"training_iteration": 5})  # this trial is done, others go on
    assert not stop.stop_all()
    clock.advance(10)
    # Tune records the result it passes to the stopper; stopping afterwards loses nothing.
    assert stop("t2", {"training_iteration": 2})
    # The experiment as a whole stops half the tolerance (max(2%, 5 s) / 2) later, so the
    # trials' own deadline reports (and their checkpoints) arrive first.
    assert not stop.stop_all()
    clock.advance(2.4)
    assert not stop.stop_all()
    clock.advance(0.2)
    assert stop.stop_all()

"""Budget logic and stopping at the deadline on a fake clock: no sleeping."""
import json
import math
import pickle
import time

import pytest
import torch

from hypersweep.methods.passes import minibatch_pass
from hypersweep.orchestrator.budget import Budget, Deadline, FakeClock, within_budget
from hypersweep.orchestrator.progress import ArmStatus
from hypersweep.orchestrator.tune_run import _LIVE, BudgetStopper, LiveArm


def test_budget_on_a_fake_clock():
    clock = FakeClock(100.0)
    b = Budget(30, clock)
    assert not b.exhausted() and b.elapsed() == 0.0  # not started: nothing counts yet
    b.start()
    clock.advance(29.5)
    assert b.elapsed() == 29.5 and b.remaining() == 0.5 and not b.exhausted()
    clock.advance(0.5)
    assert b.exhausted() and b.remaining() == 0.0


def test_a_resumed_budget_is_charged_what_it_had_used():
    clock = FakeClock(5000.0)  # the new coordinator's clock: its zero means nothing to the old one
    b = Budget(30, clock, used_s=22.0).start()
    assert b.elapsed() == 22.0 and b.remaining() == 8.0
    assert float(b.deadline()) == 5008.0  # the trials get the rest, from now
    clock.advance(8.0)
    assert b.exhausted() and b.within_tolerance()


def test_tune_objects_pickle_as_their_arm_and_find_the_live_one():
    """A Tune experiment restored by a new coordinator unpickles the stopper from tuner.pkl; it
    must use the new coordinator's budget, not the dead one's."""
    old = FakeClock(0.0)
    _LIVE["s/a/seed0"] = LiveArm(Budget(10, old).start(), sink=lambda *event: None, workers=1)
    frozen = pickle.dumps(BudgetStopper("s/a/seed0", max_steps=100))
    old.advance(50.0)  # the old arm's budget is long spent ...
    new = FakeClock(0.0)
    _LIVE["s/a/seed0"] = LiveArm(Budget(10, new, used_s=4.0).start(), sink=lambda *event: None, workers=1)
    stop = pickle.loads(frozen)
    assert not stop("t", {"training_iteration": 3})  # ... the resumed one has 6 s left
    new.advance(6.0)
    assert stop("t", {"training_iteration": 4})
    del _LIVE["s/a/seed0"]


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        Budget(0)


def test_stopper_keeps_the_report_then_stops_everything():
    clock = FakeClock()
    budget = Budget(10, clock).start()
    arm = _LIVE["k"] = LiveArm(budget, sink=lambda *event: None, workers=2)
    stop = BudgetStopper("k", max_steps=5)
    arm.running.update({"t1", "t2"})
    assert not stop("t1", {"training_iteration": 1}) and not stop.stop_all()
    assert stop("t1", {"training_iteration": 5})  # this trial is done, others go on
    arm.running.discard("t1")
    assert not stop.stop_all()
    clock.advance(10)
    # Tune records the result it passes to the stopper; stopping afterwards loses nothing.
    assert stop("t2", {"training_iteration": 2})
    # While a trial still runs, the experiment as a whole stops half the tolerance
    # (max(2%, 5 s) / 2) later, so the trials' own deadline reports (and checkpoints) arrive first.
    assert not stop.stop_all()
    clock.advance(2.4)
    assert not stop.stop_all()
    clock.advance(0.2)
    assert stop.stop_all()
    # Once no trial runs, the spent budget stops it at once (pending trials never start).
    clock.advance(-2.6)
    assert not stop.stop_all()
    arm.running.discard("t2")
    assert stop.stop_all()
    del _LIVE["k"]


def test_the_deadline_is_the_budget_end_on_the_same_clock():
    clock = FakeClock(100.0)
    budget = Budget(10, clock).start()
    clock.advance(4)
    deadline = budget.deadline()
    assert deadline == 110.0 and deadline.remaining() == 6.0 and not deadline.passed()
    clock.advance(6)
    assert deadline.passed() and deadline.remaining() == 0.0 and budget.exhausted()
    # Trials read the deadline in other processes: it travels with its clock, and in the trial
    # records (JSON) it is the time itself.
    copy = pickle.loads(pickle.dumps(deadline))
    assert copy == 110.0 and copy.passed() and json.dumps({"deadline": deadline}) == '{"deadline": 110.0}'
    # The real budget runs on the monotonic clock; its deadline on the wall clock, which other
    # machines share.
    real = Budget(10).start().deadline()
    assert real.clock is time.time and 0.0 < real.remaining() <= 10.0


def test_one_tolerance_rule_for_the_budget_and_the_summary():
    for used in (0.0, 99.0, 105.0, 105.1):
        clock = FakeClock()
        b = Budget(100, clock).start()
        clock.advance(used)
        status = ArmStatus("a", 0, budget_s=100, wall_time_used_s=used)
        assert b.within_tolerance() == status.within_budget == within_budget(used, 100) == (used <= 105.0)


def _ticking_step(clock, seen):
    """A minibatch step that takes one second of `clock`; its loss is its position (1, 2, ...)."""
    def step(idx):
        seen.append(len(idx))
        clock.advance(1.0)
        return torch.tensor(float(len(seen)))
    return step


def test_a_pass_stops_after_the_minibatch_that_reaches_the_deadline():
    clock, seen = FakeClock(), []
    mean, complete = minibatch_pass(10, 3, torch.Generator().manual_seed(0), torch.device("cpu"),
                                    _ticking_step(clock, seen), Deadline(2.0, clock))
    assert seen == [3, 3] and not complete and mean == (1 * 3 + 2 * 3) / 6
    # Reached on the last minibatch: the pass is whole, an epoch.
    clock, seen = FakeClock(), []
    mean, complete = minibatch_pass(10, 3, torch.Generator().manual_seed(0), torch.device("cpu"),
                                    _ticking_step(clock, seen), Deadline(4.0, clock))
    assert seen == [3, 3, 3, 1] and complete and mean == (1 * 3 + 2 * 3 + 3 * 3 + 4 * 1) / 10


def test_a_fake_clock_stops_a_trial_inside_its_step():
    """The trainable as Tune drives it, with a deadline on a clock that moves one second per
    minibatch: a step ends at the deadline, mid-epoch, and asks for a checkpoint there."""
    from hypersweep.workers.sgd_trainable import SGDTrainable
    clock, batch = FakeClock(1000.0), 256
    config = {"method": "sgd", "hp": {"lr": 0.05, "batch_size": batch}, "seed": 5, "data_seed": 5,
              "dataset": {"name": "digits", "root": None, "val_fraction": 0.2, "test_fraction": 0.2,
                          "split_index": 0},
              "model": {"kind": "mlp", "hidden": [16]}, "device": "cpu", "epochs_per_step": 3}
    t = SGDTrainable(config=config)
    per_epoch = math.ceil(len(t.method.data["train"][0]) / batch)
    t.config["deadline"] = Deadline(1000.0 + 3 * per_epoch + 2, clock)  # two minibatches into epoch 4
    minibatches, loss = [], t.method.loss

    def ticking_loss(out, y):
        minibatches.append(1)
        clock.advance(1.0)
        return loss(out, y)
    t.method.loss = ticking_loss

    first = t.train()  # three whole epochs, before the deadline
    assert len(minibatches) == 3 * per_epoch and first["epochs_this_step"] == 3 and first["epoch"] == 3
    assert not first.get("should_checkpoint")
    second = t.train()  # two minibatches of the fourth epoch reach it: cut, not an epoch
    assert len(minibatches) == 3 * per_epoch + 2
    assert second["epochs_this_step"] == 0 and second["epoch"] == 3 and second["should_checkpoint"]
    assert math.isfinite(second["train_loss"])  # the partial pass trained and is reported
    third = t.train()  # past the deadline: no training, a report and a checkpoint
    assert len(minibatches) == 3 * per_epoch + 2 and third["epochs_this_step"] == 0 and third["should_checkpoint"]
    t.stop()

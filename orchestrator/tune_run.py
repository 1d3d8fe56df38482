"""Ray Tune adapters: one arm x seed's Tune experiment under its budget.

`tune_arm` builds the Tuner (searcher, scheduler, resources, checkpoints, storage in the study
directory) and runs it; `BudgetStopper` ends the trials once the arm's budget is spent,
*after* their report is recorded (Tune's own `time_budget_s` discards the report in flight,
see the shared notes); `TuneEvents` hands Tune's trial events to the recorder, directly or
through a Ray queue (`QueueSink`) when the arm runs in a Ray task.
"""
from __future__ import annotations

import time
from typing import Any

from ray import tune

from hypersweep.orchestrator.budget import Budget, Clock, tolerance
from hypersweep.orchestrator.planning import ArmSeed, num_samples, scheduler, searcher
from hypersweep.orchestrator.study import Study
from hypersweep.orchestrator.studydir import StudyDir


class BudgetStopper(tune.Stopper):
    """Stops a trial at `max_steps` reports or at its first report once the arm's budget is
    spent (trials end their step at the deadline themselves, so that report comes promptly and
    carries a checkpoint). The whole experiment is stopped only half the tolerance later, for
    a trial that does not report: stopping it at the deadline would race those last reports."""

    def __init__(self, budget: Budget, max_steps: int):
        self.budget, self.max_steps = budget, max_steps
        self.grace = tolerance(budget.seconds) / 2

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result["training_iteration"] >= self.max_steps or self.budget.exhausted()

    def stop_all(self) -> bool:
        return self.budget.started and self.budget.elapsed() >= self.budget.seconds + self.grace


class TuneEvents(tune.Callback):
    """Tune's trial events, stamped with the arm's wall time, handed to `sink(kind, trial_id,
    hp, payload, arm_time)`."""

    def __init__(self, sink, budget: Budget):
        self.sink, self.budget = sink, budget

    def __getstate__(self):
        # Tune may pickle callbacks with the experiment state; live handles stay behind.
        return {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.sink("start", trial.trial_id, trial.config["hp"], None, self.budget.elapsed())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        plain = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        self.sink("result", trial.trial_id, trial.config["hp"], plain, self.budget.elapsed())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.sink("end", trial.trial_id, trial.config["hp"], True, self.budget.elapsed())

    def on_trial_error(self, iteration, trials, trial, **info):
        self.sink("end", trial.trial_id, trial.config["hp"], False, self.budget.elapsed())

    def on_step_end(self, iteration, trials, **info):
        self.sink("tick", None, None, None, self.budget.elapsed())


class QueueSink:
    """A picklable sink that puts events on a Ray queue (for an arm run in a Ray task)."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, *event):
        if event[0] != "tick":
            self.queue.put(event)


def tune_arm(study: Study, study_dir: StudyDir, unit: ArmSeed, param_space: dict[str, Any], workers: int, sink,
             clock: Clock = time.monotonic) -> dict[str, Any]:
    """Run one arm x seed's Tune experiment under its budget; Tune's events go to `sink`.
    Runs in the coordinator (arms one after another) or in a Ray task (concurrent arms).
    Returns the errors, the wall time used and each trial's folder (a path on the study
    directory's filesystem) and config."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from hypersweep.workers import trainable_class

    budget = Budget(study.budget.seconds, clock).start()
    b = study.budget
    trainable = tune.with_resources(trainable_class(unit.arm.method), {"cpu": b.cpus_per_worker, "gpu": b.gpus_per_worker})
    max_steps = (unit.arm.max_epochs or study.training.max_epochs) // study.training.epochs_per_step or 1
    param_space = {**param_space, "deadline": time.time() + budget.remaining()}  # trials end their step there
    storage_path, storage_fs = study_dir.tune_storage()
    tuner = Tuner(
        trainable,
        param_space=param_space,
        tune_config=TuneConfig(metric="val_loss", mode="min", search_alg=searcher(unit), num_samples=num_samples(unit),
                               scheduler=scheduler(unit, max_steps), max_concurrent_trials=workers,
                               reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
        run_config=RunConfig(
            name=study_dir.tune_experiment(unit.arm.name, unit.seed_index), storage_path=storage_path,
            storage_filesystem=storage_fs, stop=BudgetStopper(budget, max_steps),
            callbacks=[TuneEvents(sink, budget)], verbose=0,
            # PBT's exploits restore other trials' checkpoints: keep more of them
            checkpoint_config=CheckpointConfig(num_to_keep=2 if unit.arm.scheduler != "pbt" else 2 * workers + 2,
                                               checkpoint_frequency=study.training.checkpoint_every,
                                               checkpoint_at_end=True),
            failure_config=FailureConfig(max_failures=1)),
    )
    try:
        grid = tuner.fit()
        return {"errors": len(grid.errors), "used": budget.elapsed(),
                "trials": {str(r.path).rstrip("/").rsplit("/", 1)[-1]: (str(r.path), r.config) for r in grid if r.path}}
    except Exception as e:  # the study goes on; the arm is marked failed with this message
        return {"errors": -1, "used": budget.elapsed(), "trials": {}, "error": f"{type(e).__name__}: {e}"}

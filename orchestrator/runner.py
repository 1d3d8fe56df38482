"""Running a study: every arm x seed through Ray Tune, under one wall-clock budget each, with
the coordinator (this process) as the only writer of records.

Per arm x seed:
1. the budget starts (Tuner set-up and trial start-up count against the arm);
2. Tune runs the arm's trials with `workers` concurrent slots; `BudgetStopper` ends the trials
   once the budget is spent, *after* their report is recorded (Tune's own `time_budget_s`
   discards the report in flight, see shared notes);
3. `Recorder`, a Tune callback in this process, turns every report into a results row, MLflow
   metrics of the trial's nested run, and the arm's anytime curve (`best_val_loss`);
4. at the end, the arm's run gets the best trial's history and hyperparameters, and its part of
   the results store is written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray import tune

from hypersweep.methods.data import task_of
from hypersweep.orchestrator.budget import Budget, Clock, tolerance
from hypersweep.orchestrator.ensembles import Compute, find_trials, groups, run_ensemble, write_trial_records
from hypersweep.orchestrator.plots import schedule_plot
from hypersweep.orchestrator.planning import ArmSeed, num_samples, plan, replay_schedule, scheduler, searcher, trial_config
from hypersweep.orchestrator.progress import ArmStatus, ProgressView, summary_markdown, summary_table
from hypersweep.orchestrator.results import ResultsStore
from hypersweep.orchestrator.study import Study, StudyError
from hypersweep.orchestrator.tracking import Tracker, flatten

log = logging.getLogger("hypersweep")

# Keys of a Tune result that are bookkeeping, not the method's metrics.
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "hostname", "node_ip",
              "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
              "timesteps_since_restore", "done", "trial_id", "experiment_id", "date", "config", "checkpoint_dir_name",
              "should_checkpoint", "experiment_tag"}


PART_EVERY_S = 15.0  # how often a running arm's results part is rewritten


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


@dataclass
class ArmContext:
    study: Study
    study_id: str
    unit: ArmSeed
    run_id: str  # the arm x seed MLflow run
    status: ArmStatus


class Recorder:
    """Runs in the driver: the only place reports become records. It takes Tune's trial events
    as plain tuples (kind, trial_id, hp, payload, arm_time), from a `TuneEvents` callback in
    this process or, for concurrent arms, through a queue from the process running the arm."""

    def __init__(self, ctx: ArmContext, tracker: Tracker, store: ResultsStore):
        self.ctx, self.tracker, self.store = ctx, tracker, store
        self._last_part = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.trial_runs: dict[str, str] = {}

    def _trial_run(self, trial_id: str, hp: dict) -> str:
        if trial_id not in self.trial_runs:
            c, u = self.ctx, self.ctx.unit
            self.trial_runs[trial_id] = self.tracker.start_run(
                f"{u.arm.name}-seed{u.seed_index}-{trial_id}", parent_id=c.run_id,
                tags=arm_tags(c.study, c.study_id, u, trial_id=trial_id), params=hp)
            c.status.trials_started += 1
        return self.trial_runs[trial_id]

    def handle(self, kind: str, trial_id: str | None, hp: dict | None, payload: Any, arm_time: float) -> None:
        self.ctx.status.elapsed_s = arm_time
        if kind == "start":
            self._trial_run(trial_id, hp)
        elif kind == "result":
            self._result(trial_id, hp, payload, arm_time)
        elif kind == "end":
            self.ctx.status.trials_done += 1
            self.tracker.end_run(self._trial_run(trial_id, hp), "FINISHED" if payload else "FAILED")

    def _result(self, trial_id: str, hp: dict, result: dict, arm_time: float) -> None:
        c, u = self.ctx, self.ctx.unit
        metrics = {k: v for k, v in result.items()
                   if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(result["training_iteration"])
        row = {"study_id": c.study_id, "arm": u.arm.name, "method": u.arm.method, "search": u.arm.search,
               "dataset": c.study.dataset.name, "seed_index": u.seed_index, "seed": u.seed,
               "trial_id": trial_id, "step": step, "arm_time_s": arm_time, **metrics,
               **{f"hp_{k}": v for k, v in flatten(hp).items()}}
        self.rows.append(row)
        if time.monotonic() - self._last_part >= PART_EVERY_S:  # `compare` on a running study sees this arm
            self.store.write_part(u.arm.name, u.seed_index, self.rows)
            self._last_part = time.monotonic()
        self.tracker.log_metrics(self._trial_run(trial_id, hp), {**metrics, "arm_time_s": arm_time}, step)
        s = c.status
        s.reports += 1
        val = metrics.get("val_loss", math.inf)
        if val < s.best_val_loss:
            s.best_val_loss, s.best_row = val, row
        # The arm's anytime curve: best validation loss so far against the arm's wall time.
        self.tracker.log_metrics(c.run_id, {"best_val_loss": s.best_val_loss, "wall_time_s": arm_time}, s.reports)


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


def arm_tags(study: Study, study_id: str, unit: ArmSeed, **extra) -> dict[str, Any]:
    return {"arm": unit.arm.name, "method": unit.arm.method, "search": unit.arm.search, "dataset": study.dataset.name,
            "seed": unit.seed, "seed_index": unit.seed_index, "study_id": study_id, **extra}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TB loggers per trial
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def check_resources(study: Study) -> str | None:
    """What is wrong when not even one trial fits on the cluster, else None."""
    import ray
    have = ray.cluster_resources()
    b = study.budget
    if have.get("CPU", 0) < b.cpus_per_worker:
        return f"budget.cpus_per_worker: {b.cpus_per_worker} CPUs per worker, the cluster has {have.get('CPU', 0)}"
    if have.get("GPU", 0) < b.gpus_per_worker:
        return f"budget.gpus_per_worker: {b.gpus_per_worker} GPUs per worker, the cluster has {have.get('GPU', 0)}"
    return None


def tune_arm(study: Study, study_dir: Path, unit: ArmSeed, param_space: dict[str, Any], workers: int, sink,
             clock: Clock = time.monotonic) -> dict[str, Any]:
    """Run one arm x seed's Tune experiment under its budget; Tune's events go to `sink`.
    Runs in the coordinator (arms one after another) or in a Ray task (concurrent arms).
    Returns the errors, the wall time used and each trial's folder and config."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from hypersweep.workers import trainable_class

    budget = Budget(study.budget.seconds, clock).start()
    b = study.budget
    trainable = tune.with_resources(trainable_class(unit.arm.method), {"cpu": b.cpus_per_worker, "gpu": b.gpus_per_worker})
    max_steps = (unit.arm.max_epochs or study.training.max_epochs) // study.training.epochs_per_step or 1
    param_space = {**param_space, "deadline": budget.deadline()}  # trials end their step there
    tuner = Tuner(
        trainable,
        param_space=param_space,
        tune_config=TuneConfig(metric="val_loss", mode="min", search_alg=searcher(unit), num_samples=num_samples(unit),
                               scheduler=scheduler(unit, max_steps), max_concurrent_trials=workers,
                               reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
        run_config=RunConfig(
            name=f"{unit.arm.name}-seed{unit.seed_index}", storage_path=str((study_dir / "tune").resolve()),
            stop=BudgetStopper(budget, max_steps),
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
                "trials": {Path(r.path).name: (str(r.path), r.config) for r in grid if r.path}}
    except Exception as e:  # the study goes on; the arm is marked failed with this message
        return {"errors": -1, "used": budget.elapsed(), "trials": {}, "error": f"{type(e).__name__}: {e}"}


def prepare_arm(study: Study, unit: ArmSeed, store: ResultsStore, data_root: str | None) -> dict[str, Any] | str:
    """The arm's param_space, or why it cannot run (a replay without its STN's records)."""
    param_space = trial_config(study, unit, data_root)
    if unit.arm.search == "replay":
        source = store.read_part(unit.arm.replay, unit.seed_index)
        if source is None or source.empty or "val_loss" not in source:
            return f"no records of arm {unit.arm.replay!r} seed {unit.seed_index} to replay"
        stn_arm = next(a for a in study.arms if a.name == unit.arm.replay)
        param_space["schedule"] = replay_schedule(source, stn_arm.params)
    return param_space


def run_arm(study: Study, study_dir: Path, study_id: str, unit: ArmSeed, run_id: str, status: ArmStatus,
            tracker: Tracker, store: ResultsStore, clock: Clock, data_root: str | None) -> None:
    """One arm x seed in this process, on all the budget's worker slots."""
    prepared = prepare_arm(study, unit, store, data_root)
    if isinstance(prepared, str):
        _refuse_arm(unit, run_id, status, tracker, store, prepared)
        return
    status.status = "running"
    recorder = Recorder(ArmContext(study, study_id, unit, run_id, status), tracker, store)
    outcome = None
    try:
        outcome = tune_arm(study, study_dir, unit, prepared, study.budget.workers, recorder.handle, clock)
    finally:
        _finish_arm(study, study_dir, unit, run_id, status, tracker, store, recorder, outcome)


def _refuse_arm(unit, run_id, status, tracker, store, why: str) -> None:
    log.warning("%s: %s", unit.key, why)
    status.status = "failed"
    store.write_part(unit.arm.name, unit.seed_index, [])
    tracker.set_tags(run_id, {"error": why})
    tracker.end_run(run_id, "FAILED")


def _finish_arm(study, study_dir, unit, run_id, status, tracker, store, recorder, outcome) -> None:
    """Records at the end of an arm x seed: results part, trial runs, the arm run's summary,
    schedule plot, trial records, ensemble."""
    status.wall_time_used_s = outcome["used"] if outcome else status.elapsed_s
    status.elapsed_s = status.wall_time_used_s
    store.write_part(unit.arm.name, unit.seed_index, recorder.rows)
    for trial_run in recorder.trial_runs.values():  # trials the budget cut short
        tracker.end_if_open(trial_run, "KILLED")
    if outcome is None:
        return
    errors = outcome["errors"]
    if "error" in outcome:
        log.warning("%s failed: %s", unit.key, outcome["error"])
        tracker.set_tags(run_id, {"error": outcome["error"][:4000]})
    failed = not recorder.rows or errors < 0 or errors == status.trials_started
    status.status = "failed" if failed else "done"
    _record_arm_end(tracker, run_id, status, recorder.rows, max(errors, 0))
    if recorder.rows and any(k.startswith("hp/") for k in status.best_row):
        best = [r for r in recorder.rows if r["trial_id"] == status.best_row["trial_id"]]
        plot = schedule_plot(best, study_dir / "plots" / f"schedule-{unit.arm.name}-seed{unit.seed_index}.png",
                             title=f"{unit.arm.name} seed {unit.seed_index} ({unit.arm.method})")
        tracker.log_artifact(run_id, plot, "plots")
    trials = {name: (Path(path), config) for name, (path, config) in outcome["trials"].items()}
    write_trial_records(trials, recorder.rows, arm=unit.arm.name, method=unit.arm.method, seed_index=unit.seed_index,
                        seed=unit.seed, run_id=run_id, tracking_uri=tracker.uri)
    if unit.arm.ensemble and not failed:
        _arm_ensemble(study, study_dir, unit, run_id, tracker)
    tracker.end_run(run_id, "FAILED" if failed else "FINISHED")


def run_concurrent(study: Study, study_dir: Path, study_id: str, units: list[ArmSeed], run_ids: list[str],
                   statuses: list[ArmStatus], tracker: Tracker, store: ResultsStore, data_root: str | None) -> None:
    """The arms of one repetition at the same time, each on its share of the worker slots,
    each Tune experiment in its own Ray task; their events come back through queues to this
    process, still the only writer of records."""
    import ray
    from ray.util.queue import Empty, Queue

    workers = max(1, study.budget.workers // len(units))
    remote_arm = ray.remote(num_cpus=0)(tune_arm)
    running = []
    for unit, run_id, status in zip(units, run_ids, statuses):
        prepared = prepare_arm(study, unit, store, data_root)
        if isinstance(prepared, str):
            _refuse_arm(unit, run_id, status, tracker, store, prepared)
            continue
        status.status = "running"
        queue = Queue(actor_options={"num_cpus": 0})
        recorder = Recorder(ArmContext(study, study_id, unit, run_id, status), tracker, store)
        ref = remote_arm.remote(study, study_dir, unit, prepared, workers, _QueueSink(queue))
        running.append([unit, run_id, status, recorder, queue, ref])

    def drain(queue, recorder):
        while True:
            try:
                recorder.handle(*queue.get_nowait())
            except Empty:
                return

    while running:
        for item in list(running):
            unit, run_id, status, recorder, queue, ref = item
            drain(queue, recorder)
            done, _ = ray.wait([ref], timeout=0.1)
            if done:
                outcome = ray.get(ref)
                drain(queue, recorder)
                _finish_arm(study, study_dir, unit, run_id, status, tracker, store, recorder, outcome)
                ray.kill(queue.actor)
                running.remove(item)


class _QueueSink:
    """A picklable sink that puts events on a Ray queue."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, *event):
        if event[0] != "tick":
            self.queue.put(event)


def _arm_ensemble(study: Study, study_dir: Path, unit: ArmSeed, run_id: str, tracker: Tracker) -> None:
    """The arm's `ensemble:` request, after its budget (the time is recorded, not charged)."""
    e = unit.arm.ensemble
    t = time.monotonic()
    try:
        trials = groups(find_trials(study_dir), unit.arm.name, unit.seed_index)[(unit.arm.name, unit.seed_index)]
        compute = Compute(use_ray=True, num_cpus=study.budget.cpus_per_worker, num_gpus=study.budget.gpus_per_worker)
        run_ensemble(trials, e.members, study_dir / "ensembles" / f"{unit.arm.name}-seed{unit.seed_index}", compute,
                     sample_seed=e.sample_seed, distill_too=e.distill == "polyak", tracker=tracker)
    except Exception as err:  # the arm's training records stand; say what went wrong on its run
        log.warning("ensemble of %s failed: %s", unit.key, err)
        tracker.set_tags(run_id, {"ensemble_error": f"{type(err).__name__}: {err}"[:4000]})
    tracker.log_metrics(run_id, {"ensemble_time_s": time.monotonic() - t}, step=0)


def _record_arm_end(tracker: Tracker, run_id: str, status: ArmStatus, rows: list[dict], errors: int) -> None:
    summary = {"wall_time_used_s": status.wall_time_used_s, "trials": status.trials_started, "trial_errors": errors,
               "reports": status.reports}
    if rows:
        best = status.best_row
        # The arm run carries the history of its best trial: one val_loss curve per arm x seed.
        for row in rows:
            if row["trial_id"] == best["trial_id"]:
                tracker.log_metrics(run_id, {k: v for k, v in row.items() if _is_metric(k, v)}, row["step"])
        summary.update({f"best_{k}": v for k, v in best.items() if _is_metric(k, v)})
        tracker.log_params(run_id, {"best_trial_id": best["trial_id"],
                                    **{f"best.{k[3:]}": v for k, v in best.items() if k.startswith("hp_")}})
    tracker.log_metrics(run_id, summary, status.reports)


def _is_metric(key: str, value: Any) -> bool:
    return (key not in ("seed_index", "seed", "step") and not key.startswith("hp_")
            and isinstance(value, (int, float)) and not isinstance(value, bool))


def default_study_dir(study: Study) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("studies") / f"{study.name}-{stamp}"


def run_study(study: Study, study_dir: Path, *, tracking_uri: str, address: str | None = None,
              data_root: str | None = None, clock: Clock = time.monotonic, console=None,
              live: bool = True) -> list[ArmStatus]:
    """Run every arm x seed of `study`; returns their statuses (the summary)."""
    from rich.console import Console
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # logs and CI: wide enough for the tables
    init_ray(address)
    problem = check_resources(study)
    if problem:
        raise StudyError(f"study {study.name!r}: {problem}")
    study_dir = study_dir.resolve()
    study_dir.mkdir(parents=True, exist_ok=False)
    study_id = study_dir.name
    (study_dir / "study.yaml").write_text(study.to_yaml())
    units = plan(study)
    statuses = [ArmStatus(u.arm.name, u.seed_index, study.budget.seconds) for u in units]

    tracker = Tracker(tracking_uri, study.tracking.experiment or study.name)
    parent = tracker.start_run(study_id, params=study.model_dump(),
                               tags={"study_id": study_id, "dataset": study.dataset.name, "kind": "study"})
    tracker.log_artifact(parent, study_dir / "study.yaml")
    run_map = {"tracking_uri": tracking_uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent, "arms": {}}
    store = ResultsStore(study_dir)
    task = task_of(study.dataset.name)
    try:
        with ProgressView(statuses, task, console, enabled=live):
            concurrent = study.budget.schedule == "concurrent"
            # one batch per arm x seed, or (concurrent) one batch per repetition
            batches = [[i] for i in range(len(units))] if not concurrent else \
                [[i for i, u in enumerate(units) if u.seed_index == k] for k in range(study.seeds)]
            for batch in batches:
                run_ids = []
                for i in batch:
                    unit = units[i]
                    run_ids.append(tracker.start_run(f"{unit.arm.name}-seed{unit.seed_index}", parent_id=parent,
                                                     tags=arm_tags(study, study_id, unit),
                                                     params={"arm": unit.arm.model_dump(), "seed": unit.seed,
                                                             "search_seed": unit.search_seed,
                                                             "schedule": study.budget.schedule}))
                    run_map["arms"][unit.key] = run_ids[-1]
                _write_json(study_dir / "runs.json", run_map)
                if concurrent:
                    run_concurrent(study, study_dir, study_id, [units[i] for i in batch], run_ids,
                                   [statuses[i] for i in batch], tracker, store, data_root)
                else:
                    run_arm(study, study_dir, study_id, units[batch[0]], run_ids[0], statuses[batch[0]], tracker,
                            store, clock, data_root)
                store.consolidate()
                _write_json(study_dir / "arms.json", {f"{s.arm}/seed{s.seed_index}": {
                    "arm": s.arm, "seed_index": s.seed_index, "status": s.status, "budget_s": s.budget_s,
                    "wall_time_used_s": s.wall_time_used_s, "within_budget": s.within_budget,
                    "trials": s.trials_started, "reports": s.reports, "schedule": study.budget.schedule}
                    for s in statuses if s.status != "pending"})
        results = store.consolidate()
        (study_dir / "summary.md").write_text(summary_markdown(statuses, task))
        for path in (results, study_dir / "summary.md"):
            tracker.log_artifact(parent, path)
        tracker.end_run(parent, "FAILED" if any(s.status == "failed" for s in statuses) else "FINISHED")
    except KeyboardInterrupt:
        tracker.end_all("KILLED")
        raise
    except BaseException:
        tracker.end_all("FAILED")
        raise
    console.print()
    console.print(summary_table(statuses, task))
    console.print(f"study directory: {study_dir}\nMLflow: {tracking_uri} (experiment {study.tracking.experiment or study.name}, "
                  f"parent run {parent})")
    return statuses


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

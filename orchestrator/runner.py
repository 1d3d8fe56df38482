"""Running a study: every arm x seed through Ray Tune, under one wall-clock budget each, with
the coordinator (this process) as the only writer of records.

Per arm x seed (orchestrator/arms.py):
1. the budget starts (Tuner set-up and trial start-up count against the arm);
2. Tune runs the arm's trials with `workers` concurrent slots until the budget is spent
   (orchestrator/tune_run.py);
3. the recorder (orchestrator/recorder.py) turns every report into a results row, MLflow
   metrics of the trial's nested run, and the arm's anytime curve (`best_val_loss`);
4. at the end, the arm's run gets the best trial's history and hyperparameters, and its part of
   the results store is written.
This module holds the study's loop: Ray, the parent run, the batches of arms, the study files.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from hypersweep.methods.data import task_of
from hypersweep.orchestrator.arms import run_arm, run_concurrent
from hypersweep.orchestrator.budget import Clock
from hypersweep.orchestrator.planning import plan
from hypersweep.orchestrator.progress import ArmStatus, ProgressView, summary_markdown, summary_table
from hypersweep.orchestrator.recorder import ArmContext, arm_tags
from hypersweep.orchestrator.study import Study, StudyError
from hypersweep.orchestrator.studydir import StudyDir
from hypersweep.orchestrator.tracking import Tracker


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


def default_study_dir(study: Study) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("studies") / f"{study.name}-{stamp}"


def _arms_record(study: Study, statuses: list[ArmStatus]) -> dict:
    return {f"{s.arm}/seed{s.seed_index}": {
        "arm": s.arm, "seed_index": s.seed_index, "status": s.status, "budget_s": s.budget_s,
        "wall_time_used_s": s.wall_time_used_s, "within_budget": s.within_budget,
        "trials": s.trials_started, "reports": s.reports, "schedule": study.budget.schedule}
        for s in statuses if s.status != "pending"}


def run_study(study: Study, study_dir: StudyDir, *, tracking_uri: str, address: str | None = None,
              data_root: str | None = None, clock: Clock = time.monotonic, console=None,
              live: bool = True) -> list[ArmStatus]:
    """Run every arm x seed of `study` into `study_dir` (which must not exist yet); returns
    their statuses (the summary)."""
    from rich.console import Console
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # logs and CI: wide enough for the tables
    init_ray(address)
    problem = check_resources(study)
    if problem:
        raise StudyError(f"study {study.name!r}: {problem}")
    study_dir.create(study.to_yaml())
    study_id = study_dir.study_id
    units = plan(study)
    statuses = [ArmStatus(u.arm.name, u.seed_index, study.budget.seconds) for u in units]

    tracker = Tracker(tracking_uri, study.tracking.experiment or study.name)
    parent = tracker.start_run(study_id, params=study.model_dump(),
                               tags={"study_id": study_id, "dataset": study.dataset.name, "kind": "study"})
    with study_dir.reading(StudyDir.STUDY) as local:
        tracker.log_artifact(parent, local)
    run_map = {"tracking_uri": tracking_uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent, "arms": {}}
    task = task_of(study.dataset.name)
    try:
        with ProgressView(statuses, task, console, enabled=live):
            concurrent = study.budget.schedule == "concurrent"
            # one batch per arm x seed, or (concurrent) one batch per repetition
            batches = [[i] for i in range(len(units))] if not concurrent else \
                [[i for i, u in enumerate(units) if u.seed_index == k] for k in range(study.seeds)]
            for batch in batches:
                contexts = []
                for i in batch:
                    unit = units[i]
                    run_id = tracker.start_run(f"{unit.arm.name}-seed{unit.seed_index}", parent_id=parent,
                                               tags=arm_tags(study, study_id, unit, kind="arm"),
                                               params={"arm": unit.arm.model_dump(), "seed": unit.seed,
                                                       "search_seed": unit.search_seed,
                                                       "schedule": study.budget.schedule})
                    run_map["arms"][unit.key] = run_id
                    contexts.append(ArmContext(study, study_id, unit, run_id, statuses[i]))
                study_dir.write_runs(run_map)
                if concurrent:
                    run_concurrent(contexts, tracker, study_dir, data_root)
                else:
                    run_arm(contexts[0], tracker, study_dir, clock, data_root)
                study_dir.consolidate()
                study_dir.write_arms(_arms_record(study, statuses))
        study_dir.consolidate()
        study_dir.write_text(StudyDir.SUMMARY, summary_markdown(statuses, task))
        for name in (StudyDir.RESULTS, StudyDir.SUMMARY):
            with study_dir.reading(name) as local:
                tracker.log_artifact(parent, local)
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

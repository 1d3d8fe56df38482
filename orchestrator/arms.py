"""The lifecycle of an arm x seed: prepare its Tune run, run it (alone on all worker slots, or
beside the other arms of its repetition), and record its end: results part, trial runs, the
arm run's summary, schedule plot, trial records, ensemble.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from hypersweep.orchestrator.budget import Clock
from hypersweep.orchestrator.ensembles import run_ensemble
from hypersweep.orchestrator.lease import LeaseLost
from hypersweep.orchestrator.planning import ArmSeed, replay_schedule, trial_config
from hypersweep.orchestrator.plots import schedule_plot
from hypersweep.orchestrator.progress import ArmStatus
from hypersweep.orchestrator.recorder import ArmContext, Recorder
from hypersweep.orchestrator.searches import STN_SOURCED
from hypersweep.orchestrator.study import Study
from hypersweep.orchestrator.studydir import Folder, StudyDir, Unwritable
from hypersweep.orchestrator.tracking import Tracker
from hypersweep.orchestrator.trials import Compute, EnsembleError, find_trials, groups, write_trial_records
from hypersweep.orchestrator.tune_run import INTERRUPTED, QueueSink, tune_arm

log = logging.getLogger("hypersweep")


def prepare_arm(study: Study, unit: ArmSeed, study_dir: StudyDir, data_root: str | None) -> dict[str, Any] | str:
    """The arm's param_space, or why it cannot run (a replay without its STN's records)."""
    param_space = trial_config(study, unit, data_root)
    if unit.arm.search in STN_SOURCED:
        source = study_dir.read_part(unit.arm.replay, unit.seed_index)
        if source is None or source.empty or "val_loss" not in source:
            return f"no records of arm {unit.arm.replay!r} seed {unit.seed_index} to {unit.arm.search}"
        stn_arm = next(a for a in study.arms if a.name == unit.arm.replay)
        schedule = replay_schedule(source, stn_arm.params)
        # final: the values the STN ended with, from the first epoch on
        param_space["schedule"] = schedule if unit.arm.search == "replay" else [[0, schedule[-1][1]]]
    return param_space


def run_arm(ctx: ArmContext, tracker: Tracker, study_dir: StudyDir, clock: Clock, data_root: str | None) -> None:
    """One arm x seed in this process, on all the budget's worker slots."""
    if ctx.status.status == "ending":  # its training had ended when the coordinator died
        finish_arm(Recorder(ctx, tracker, study_dir), ended_outcome(ctx, study_dir))
        return
    prepared = prepare_arm(ctx.study, ctx.unit, study_dir, data_root)
    if isinstance(prepared, str):
        refuse_arm(ctx, tracker, study_dir, prepared)
        return
    recorder = Recorder(ctx, tracker, study_dir)
    resume = _resume_point(recorder)
    ctx.status.status = "running"
    outcome = None
    try:
        outcome = tune_arm(ctx.study, study_dir, ctx.unit, prepared, ctx.study.budget.workers, recorder.handle,
                           clock=clock, **resume, **_signing(ctx))
    finally:
        finish_arm(recorder, outcome)


def _resume_point(recorder: Recorder) -> dict[str, Any]:
    """How a (resumed) arm goes on: the wall time it had used (the last heartbeat, or its last
    report if that is later) and whether its Tune experiment is restored."""
    status = recorder.ctx.status
    if status.status not in ("interrupted", "extending"):
        return {"used_s": 0.0, "restore": False}
    used = max([status.wall_time_used_s] + [row["arm_time_s"] for row in recorder.rows])
    status.elapsed_s = used
    # extending: the trials the old budget ended go on (from their checkpoints at its end)
    return {"used_s": used, "restore": True, "extend": status.status == "extending"}


def _signing(ctx: ArmContext) -> dict[str, Any]:
    """The coordinator's signing key for the arm's Tune state (a Ray task's environment may not
    name the same key file), and whether a restore takes the study directory's state as it is."""
    records = ctx.records
    return {"signing_key": records.signing_key, "trust": records.trust_study_dir} if records else {}


def run_concurrent(contexts: list[ArmContext], tracker: Tracker, study_dir: StudyDir, data_root: str | None) -> None:
    """The arms of one repetition at the same time, each on its share of the worker slots,
    each Tune experiment in its own Ray task; their events come back through queues to this
    process, still the only writer of records."""
    import ray
    from ray.util.queue import Queue

    study = contexts[0].study
    workers = max(1, study.budget.workers // len(contexts))
    # The arms' Tune loops and queues stay on the coordinator's node: a lost worker node takes
    # its trials (Tune retries them elsewhere), never an arm's experiment or its records.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    remote_arm = ray.remote(num_cpus=0, scheduling_strategy=here)(tune_arm)
    running = []
    for ctx in contexts:
        if ctx.status.status == "ending":  # its training had ended when the coordinator died
            finish_arm(Recorder(ctx, tracker, study_dir), ended_outcome(ctx, study_dir))
            continue
        prepared = prepare_arm(study, ctx.unit, study_dir, data_root)
        if isinstance(prepared, str):
            refuse_arm(ctx, tracker, study_dir, prepared)
            continue
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        recorder = Recorder(ctx, tracker, study_dir)
        resume = _resume_point(recorder)
        ctx.status.status = "running"
        ref = remote_arm.remote(study, study_dir, ctx.unit, prepared, workers, QueueSink(queue), **resume,
                                **_signing(ctx))
        running.append((recorder, queue, ref))

    try:
        while running:
            if INTERRUPTED.is_set():  # SIGINT/SIGTERM, a full study directory, a lost lease: stop as a crash would
                _cancel(running)
                return
            for item in list(running):
                recorder, queue, ref = item
                _drain(queue, recorder)
                done, _ = ray.wait([ref], timeout=0.1)
                if done:
                    outcome = ray.get(ref)
                    _drain(queue, recorder)
                    finish_arm(recorder, outcome)
                    ray.kill(queue.actor)
                    running.remove(item)
    except LeaseLost:  # another coordinator has the study: its Tune experiments end here, unrecorded
        for _, queue, ref in running:
            ray.cancel(ref, force=True)
            ray.kill(queue.actor)
        raise


def _drain(queue, recorder: Recorder) -> None:
    """Hand the events an arm's Ray task has queued so far to its recorder."""
    from ray.util.queue import Empty
    while True:
        try:
            recorder.handle(*queue.get_nowait())
        except Empty:
            return


def _cancel(running: list) -> None:
    """End the arms' Tune experiments now (their Ray tasks killed, their trials with them), as
    a crash of the coordinator would: `resume` restores each from its last saved state."""
    import ray
    for _, _, ref in running:
        ray.cancel(ref, force=True)
    error = None
    for recorder, queue, ref in running:
        try:
            _drain(queue, recorder)  # (the queue is an actor of its own: the task's end leaves it)
            finish_arm(recorder, None)
        except (Unwritable, LeaseLost) as err:
            error = error or err
        else:
            recorder.ctx.status.status = "interrupted"
            recorder.ctx.status.interruptions += 1
        ray.kill(queue.actor)
    running.clear()
    if error is not None:
        raise error


def refuse_arm(ctx: ArmContext, tracker: Tracker, study_dir: StudyDir, why: str) -> None:
    log.warning("%s: %s", ctx.unit.key, why)
    ctx.status.status, ctx.status.reason = "failed", why
    study_dir.write_part(ctx.unit.arm.name, ctx.unit.seed_index, [])
    tracker.set_tags(ctx.run_id, {"error": why})
    tracker.end_run(ctx.run_id, "FAILED")


def ended_outcome(ctx: ArmContext, study_dir: StudyDir) -> dict[str, Any]:
    """The Tune outcome of an arm whose training had ended before the coordinator died in its
    end records: the trial records it wrote first, the errors and time arms.json kept."""
    unit = ctx.unit
    try:
        trials = groups(find_trials(study_dir), unit.arm.name, unit.seed_index)[(unit.arm.name, unit.seed_index)]
    except (EnsembleError, KeyError):
        trials = []
    return {"errors": ctx.status.trial_errors, "used": ctx.status.wall_time_used_s,
            "trials": {t.trial_id: (t.folder.path, t.config) for t in trials}}


def finish_arm(recorder: Recorder, outcome: dict[str, Any] | None) -> None:
    """Records at the end of an arm x seed, in an order a resume can repeat: results part,
    trial runs, then (status "ending" in arms.json) trial records, the arm run's summary,
    schedule plot, ensemble, and only then "done" or "failed". `outcome` None: the arm was
    interrupted."""
    ctx, tracker, study_dir = recorder.ctx, recorder.tracker, recorder.study_dir
    unit, run_id, status = ctx.unit, ctx.run_id, ctx.status
    status.wall_time_used_s = outcome["used"] if outcome else status.elapsed_s
    status.timeline = (outcome or {}).get("timeline", status.timeline)
    status.trial_resources = (outcome or {}).get("trial_resources", status.trial_resources)
    recorder.count_compute()
    status.elapsed_s = status.wall_time_used_s
    if recorder.write_error is not None:  # the study directory took no more: stop like an interrupt
        status.status = "interrupted"
        status.interruptions += 1
        for trial_run in recorder.trial_runs.values():
            tracker.end_if_open(trial_run, "KILLED")
        tracker.end_run(run_id, "KILLED")
        raise recorder.write_error
    recorder.write_part()
    for trial_run in recorder.trial_runs.values():  # trials the budget cut short
        tracker.end_if_open(trial_run, "KILLED")
    if outcome is None:
        return
    if outcome.get("interrupted"):  # stopped by SIGINT/SIGTERM: `resume` restores its Tune experiment
        status.status = "interrupted"
        status.interruptions += 1
        tracker.end_run(run_id, "KILLED")
        return
    errors = outcome["errors"] + (len(recorder.diverged) if outcome["errors"] >= 0 else 0)
    if "error" in outcome:
        log.warning("%s failed: %s", unit.key, outcome["error"])
        tracker.set_tags(run_id, {"error": outcome["error"][:4000]})
    failed = not recorder.rows or errors < 0 or errors == status.trials_started
    status.reason = failure_reason(outcome, recorder.rows, errors, status) if failed else ""
    if failed and "error" not in outcome:
        tracker.set_tags(run_id, {"error": status.reason})
    status.status, status.trial_errors = "ending", errors
    if ctx.records is not None:
        ctx.records.write_arms()
    trials = {name: (Folder(path, study_dir.fs), config) for name, (path, config) in outcome["trials"].items()}
    for folder, _ in trials.values():
        folder.guard = study_dir.guard  # (their trial.json is a record of the study's coordinator)
    write_trial_records(trials, recorder.rows, arm=unit.arm.name, method=unit.arm.method, seed_index=unit.seed_index,
                        seed=unit.seed, run_id=tracker.resolve(run_id), tracking_uri=tracker.uri)
    recorder.record_arm_end(max(errors, 0))
    if recorder.rows and any(k.startswith("hp/") for k in status.best_row):
        best = [r for r in recorder.rows if r["trial_id"] == status.best_row["trial_id"]]
        name = study_dir.plot_name(unit.arm.name, unit.seed_index)
        with study_dir.writing(name) as local:
            schedule_plot(best, local, title=f"{unit.arm.name} seed {unit.seed_index} ({unit.arm.method})")
            tracker.log_artifact(run_id, local, "plots")
    # (drawn before a crash: not again; an extended arm draws again, at the step of its extension)
    if unit.arm.ensemble and not failed and recorder.end_sent["ensemble"] < status.extensions:
        arm_ensemble(ctx, tracker, study_dir)
    status.status = "failed" if failed else "done"
    tracker.end_run(run_id, "FAILED" if failed else "FINISHED")


def failure_reason(outcome: dict[str, Any], rows: list[dict], errors: int, status: ArmStatus) -> str:
    """One line on why an arm x seed failed (finish_arm's `failed`)."""
    if "error" in outcome:
        return (outcome["error"].strip().splitlines() or ["Tune failed"])[0][:500]
    if status.reason:  # (the coordinator died while ending the arm: the reason it had found)
        return status.reason
    if errors > 0 and errors >= status.trials_started:
        return (f"every trial failed ({status.trials_started} started; each trial run's error tag, or the "
                f"error.txt in its Tune folder, says why)")
    if not rows:
        return (f"no trial reported within the budget ({status.budget_s:g} s): a longer budget or a "
                f"first report sooner (a smaller epoch) lets one")
    return "the arm's Tune run failed"


def arm_ensemble(ctx: ArmContext, tracker: Tracker, study_dir: StudyDir) -> None:
    """The arm's `ensemble:` request, after its budget (the time is recorded, not charged)."""
    unit, e, b = ctx.unit, ctx.unit.arm.ensemble, ctx.study.budget
    t = time.monotonic()
    try:
        trials = groups(find_trials(study_dir), unit.arm.name, unit.seed_index)[(unit.arm.name, unit.seed_index)]
        compute = Compute(use_ray=True, num_cpus=b.cpus_per_worker, num_gpus=b.gpus_per_worker)
        run_ensemble(trials, e.members, study_dir.ensemble_folder(unit.arm.name, unit.seed_index), compute,
                     sample_seed=unit.ensemble_seed if e.sample_seed is None else e.sample_seed,
                     distill_too=e.distill == "polyak", tracker=tracker, step=ctx.status.extensions)
    except Exception as err:  # the arm's training records stand; say what went wrong on its run
        log.warning("ensemble of %s failed: %s", unit.key, err)
        tracker.set_tags(ctx.run_id, {"ensemble_error": f"{type(err).__name__}: {err}"[:4000]})
    tracker.log_metrics(ctx.run_id, {"ensemble_time_s": time.monotonic() - t}, step=ctx.status.extensions)

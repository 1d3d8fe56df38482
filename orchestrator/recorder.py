"""The recorder: the one place in the coordinator where trial reports become records.

Every report of an arm's trials becomes, in this order, a line of the arm's journal (appended
at once), a results row (the arm's part, rewritten every `PART_EVERY_S` while the arm runs),
MLflow metrics on the trial's nested run, and a point of the arm's anytime curve
(`best_val_loss` against arm wall time). At the arm's end, the arm's run gets its best trial's
history, hyperparameters and a summary.

A trial's MLflow run is made at its first report: a trial that never trained (it started as
the budget ran out) leaves no record. A resumed arm's recorder starts from its journal: the
reports it had, the same trial runs, and the MLflow metrics the dead coordinator had not sent
yet; a report that Tune replays after a restore (same trial and step) is recorded once.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypersweep.orchestrator.planning import ArmSeed
from hypersweep.orchestrator.progress import ArmStatus
from hypersweep.orchestrator.study import Study
from hypersweep.orchestrator.studydir import StudyDir, Unwritable
from hypersweep.orchestrator.tracking import Tracker, flatten
from hypersweep.orchestrator.tune_run import request_stop

# Keys of a Tune result that are bookkeeping, not the method's metrics.
# The arm run's metric families (no two series share a (metric, step) in one run): the anytime
# curve at step = arm milliseconds, the best trial's history at its report steps, and the
# end-of-arm figures at step = the arm's report count.
ANYTIME_LOSS, ANYTIME_TIME = "anytime/best_val_loss", "anytime/arm_time_s"
BEST_TRIAL, SUMMARY = "best_trial/", "summary/"
SCHEDULE_PREFIXES = ("hp/", "perturb_scale/")

# Where a report was made (workers/base.py placement(), Tune's node_ip): results columns, not metrics.
PLACEMENT = ("device", "node_id", "node_ip", "torch_threads")
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "hostname", "node_ip",
              "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
              "timesteps_since_restore", "done", "trial_id", "experiment_id", "date", "config", "checkpoint_dir_name",
              "should_checkpoint", "experiment_tag"}

if TYPE_CHECKING:
    from hypersweep.orchestrator.runner import StudyRecords

PART_EVERY_S = 15.0  # how often a running arm's results part is rewritten


@dataclass
class ArmContext:
    study: Study
    study_id: str
    unit: ArmSeed
    run_id: str  # the arm x seed MLflow run
    status: ArmStatus
    records: "StudyRecords | None" = None  # runs.json and arms.json (None: not kept, e.g. benchmarks)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report with the lowest validation loss (the first of equals)."""
    best = None
    for row in rows:
        if row.get("val_loss", math.inf) < (best or {}).get("val_loss", math.inf):
            best = row
    return best


def trained(result: dict[str, Any]) -> bool:
    """Whether a step trained anything: a step that began past the deadline trains no
    minibatch and reports the state as it was (a new trial's untrained net)."""
    return result.get("epochs_this_step", 1) > 0 or math.isfinite(result.get("train_loss", 0.0))


def arm_tags(study: Study, study_id: str, unit: ArmSeed, **extra) -> dict[str, Any]:
    return {"arm": unit.arm.name, "method": unit.arm.method, "search": unit.arm.search, "dataset": study.dataset.name,
            "seed": unit.seed, "seed_index": unit.seed_index, "study_id": study_id, **extra}


class Recorder:
    """Runs in the driver. It takes Tune's trial events as plain tuples (kind, trial_id, hp,
    payload, arm_time), from a `TuneEvents` callback in this process or, for concurrent arms,
    through a queue from the process running the arm."""

    def __init__(self, ctx: ArmContext, tracker: Tracker, study_dir: StudyDir):
        self.ctx, self.tracker, self.study_dir = ctx, tracker, study_dir
        self._last_part = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.seen: set[tuple[str, int]] = set()  # (trial_id, step) recorded
        self.trial_runs: dict[str, str] = {}
        self.diverged: set[str] = set()  # trials ended by a non-finite loss (failed, not retried)
        # What of the arm run's end records MLflow has (a resumed arm's earlier execution may
        # have sent some): read when a resumed arm starts, so that its end needs no read (MLflow
        # may be away then; the end records queue like every other write).
        self.end_sent = {"val_loss": 0, "summary": -1, "ensemble": -1}  # (last steps: -1 none)
        self.write_error: Unwritable | None = None  # the study directory refused a write: the study stops
        self._anytime_last = -1  # the anytime curve's last step (arm milliseconds)
        self._used: dict[str, tuple[float, float]] = {}  # trial -> (CPU s, wall s) at its latest report
        self._cpu_total = self._wall_total = 0.0  # their sums
        u = ctx.unit
        study_dir.mend_journal(u.arm.name, u.seed_index)
        journal = study_dir.read_journal(u.arm.name, u.seed_index)
        if journal or (ctx.records and ctx.records.trial_runs(u)) or ctx.status.status in ("interrupted", "ending", "extending"):
            self._resume(journal)

    def _resume(self, journal: list[dict[str, Any]]) -> None:
        """Start from what the arm had recorded before the coordinator stopped: its reports,
        its trial runs (runs.json, and any MLflow made but runs.json missed), and the MLflow
        metrics that were still in the dead coordinator's buffer."""
        c, s, tracker = self.ctx, self.ctx.status, self.tracker
        self.rows = journal
        self.seen = {(r["trial_id"], r["step"]) for r in journal}
        self.trial_runs = {**tracker.child_runs(c.run_id, "trial_id"), **(c.records.trial_runs(c.unit) if c.records else {})}
        for run_id in self.trial_runs.values():
            tracker.adopt_if_running(run_id)
        s.reports, s.trials_started = len(journal), len(self.trial_runs)
        # Metrics the dead coordinator had received but not sent: log_batch writes a run's
        # metrics in step order, so MLflow holds a prefix of each run's reports.
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for row in journal:
            by_trial.setdefault(row["trial_id"], []).append(row)
        for trial_id, rows in by_trial.items():
            run_id = self.trial_runs.get(trial_id)
            made = run_id is None
            if made:  # its run was never made: make it now
                run_id = self._trial_run(trial_id, _hp_of(rows[0]))
            sent = tracker.last_step(run_id, "arm_time_s")
            if not sent and not made:  # its params travel with its first metrics (Tracker.flush): none arrived
                tracker.log_params(run_id, _hp_of(rows[0]))
            for row in rows:
                if row["step"] > sent:
                    tracker.log_metrics(run_id, {**_metrics_of(row), "arm_time_s": row["arm_time_s"]}, row["step"])
        sent = tracker.last_step(c.run_id, ANYTIME_TIME)
        best = math.inf
        for row in journal:
            self._count_compute(row)
            if row.get("val_loss", math.inf) < best:
                best, s.best_val_loss, s.best_row = row["val_loss"], row["val_loss"], row
            step = self._anytime_step(row["arm_time_s"])
            if step > sent:
                tracker.log_metrics(c.run_id, {ANYTIME_LOSS: best, ANYTIME_TIME: row["arm_time_s"]}, step)
        tracker.flush()
        self.end_sent = {  # (this execution logs none of these before the arm's end)
            "val_loss": tracker.last_step(c.run_id, f"{BEST_TRIAL}val_loss"),
            "summary": tracker.last_step(c.run_id, f"{SUMMARY}trial_errors", default=-1),
            "ensemble": max(tracker.last_step(c.run_id, key, default=-1)
                            for key in ("ensemble.members", "ensemble_time_s"))}

    def _count_compute(self, row: dict[str, Any]) -> None:
        """The arm's CPU and GPU seconds: per trial, its latest report's own figures (they count
        from the trial's setup, earlier incarnations included), summed over trials."""
        cpu, wall = self._used.get(row["trial_id"], (0.0, 0.0))
        new = (max(cpu, row.get("cpu_time_s", 0.0)), max(wall, row.get("wall_time_s", 0.0)))
        self._used[row["trial_id"]] = new
        # running totals (a sum over every trial at every report grows with the trials)
        self._cpu_total += new[0] - cpu
        self._wall_total += new[1] - wall
        self.count_compute()

    def count_compute(self) -> None:
        """ArmStatus.cpu_s and gpu_s from the trials' latest reports (GPU: once the arm's trial
        resources are known)."""
        s = self.ctx.status
        s.cpu_s = self._cpu_total
        s.gpu_s = self._wall_total * float(s.trial_resources.get("gpu", 0.0))

    def _anytime_step(self, arm_time_s: float) -> int:
        """The anytime curve's step for a report at `arm_time_s`: the arm's milliseconds, one
        more than the last step where two reports fall in one millisecond (the same steps again
        when a resume replays the journal)."""
        self._anytime_last = max(self._anytime_last + 1, round(arm_time_s * 1000))
        return self._anytime_last

    def _trial_run(self, trial_id: str, hp: dict, where: dict | None = None) -> str:
        """The trial's MLflow run, made at its first report (tagged with where it ran)."""
        if trial_id not in self.trial_runs:
            c, u = self.ctx, self.ctx.unit
            placed = {k: v for k, v in (where or {}).items() if k in ("device", "node_ip")}
            run_id = self.tracker.start_run(
                f"{u.arm.name} · seed {u.seed_index} · trial {trial_id}", parent_id=c.run_id,
                tags=arm_tags(c.study, c.study_id, u, trial_id=trial_id, kind="trial", **placed), params=hp)
            self.trial_runs[trial_id] = run_id
            if c.records is not None:
                c.records.trial_run(u, trial_id, run_id)
            c.status.trials_started += 1
        return self.trial_runs[trial_id]

    def handle(self, kind: str, trial_id: str | None, hp: dict | None, payload: Any, arm_time: float) -> None:
        if self.write_error is not None:  # stopping: nothing more is recorded (the journal leads)
            return
        self.ctx.status.elapsed_s = arm_time
        try:
            if kind == "result":
                self._result(trial_id, hp, payload, arm_time)
            elif kind == "end":
                self.ctx.status.trials_done += 1
                if trial_id in self.trial_runs:  # a trial that never trained has no run
                    self.tracker.end_run(self.trial_runs[trial_id], "FINISHED" if payload else "FAILED")
            if self.ctx.records is not None:
                self.ctx.records.heartbeat()
        except Unwritable as err:  # raised inside Tune's loop: stop the experiment, raise after it
            self.write_error = err
            request_stop()

    def write_part(self) -> None:
        u = self.ctx.unit
        self.study_dir.write_part(u.arm.name, u.seed_index, self.rows)
        self._last_part = time.monotonic()

    def _result(self, trial_id: str, hp: dict, result: dict, arm_time: float) -> None:
        c, u = self.ctx, self.ctx.unit
        step = int(result["training_iteration"])
        if result.get("diverged"):  # the trial's last report: no row, the reason on its run
            self.diverged.add(trial_id)
            self.tracker.set_tags(self._trial_run(trial_id, hp), {"error": result.get("error", "diverged")})
            return
        if (trial_id, step) in self.seen or not trained(result):
            return  # replayed by a restored trial, or nothing trained since the last report
        self.seen.add((trial_id, step))
        metrics = {k: v for k, v in result.items()
                   if k not in _TUNE_KEYS and k not in PLACEMENT and isinstance(v, (int, float)) and not isinstance(v, bool)}
        where = {k: result[k] for k in PLACEMENT if k in result}
        row = {"study_id": c.study_id, "arm": u.arm.name, "method": u.arm.method, "search": u.arm.search,
               "dataset": c.study.dataset.name, "seed_index": u.seed_index, "seed": u.seed,
               "trial_id": trial_id, "step": step, "arm_time_s": arm_time, **metrics, **where,
               **{f"hp_{k}": _cell(v) for k, v in flatten(hp).items()}}
        self.study_dir.append_journal(u.arm.name, u.seed_index, [row])  # before anything else
        self.rows.append(row)
        if time.monotonic() - self._last_part >= PART_EVERY_S:  # `compare` on a running study sees this arm
            self.write_part()
        self.tracker.log_metrics(self._trial_run(trial_id, hp, where), {**metrics, "arm_time_s": arm_time}, step)
        s = c.status
        s.reports += 1
        self._count_compute(row)
        val = metrics.get("val_loss", math.inf)
        if val < s.best_val_loss:
            s.best_val_loss, s.best_row = val, row
        # The arm's anytime curve: best validation loss so far, at step = the arm's wall time in ms
        # (MLflow's default Step axis then lines arms up in time).
        self.tracker.log_metrics(c.run_id, {ANYTIME_LOSS: s.best_val_loss, ANYTIME_TIME: arm_time},
                                 self._anytime_step(arm_time))

    def record_arm_end(self, errors: int) -> None:
        """The arm run's summary: its best trial's history and hyperparameters, wall time,
        trials, errors."""
        status, rows, run_id = self.ctx.status, self.rows, self.ctx.run_id
        summary = {"wall_time_used_s": status.wall_time_used_s, "cpu_time_s": status.cpu_s, "gpu_s": status.gpu_s,
                   "trials": status.trials_started,
                   "trial_errors": errors, "reports": status.reports, "best_val_loss": status.best_val_loss}
        # A resumed arm may have written part of this before the coordinator died: once each.
        # (An arm a longer budget extended is summarised again, at its new report count.)
        sent, summarised = self.end_sent["val_loss"], self.end_sent["summary"] >= status.reports
        if rows:
            best = status.best_row
            # The arm run carries the history of its best trial: one val_loss curve per arm x seed.
            for row in rows:
                if row["trial_id"] == best["trial_id"] and row["step"] > sent:
                    self.tracker.log_metrics(run_id, {_arm_metric(k): v for k, v in row.items()
                                                      if _is_metric(k, v)}, row["step"])
            summary.update({f"best_{k}": v for k, v in best.items() if _is_metric(k, v) and k != "val_loss"})
            best_hp = {"best_trial_id": best["trial_id"],
                       **{f"best.{k[3:]}": v for k, v in best.items() if k.startswith("hp_")}}
            if status.extensions:  # MLflow params never change: an extended arm's best goes to tags
                self.tracker.set_tags(run_id, best_hp)
            else:
                self.tracker.log_params(run_id, best_hp)
        if not summarised:
            summary = {f"{SUMMARY}{k}": v for k, v in summary.items() if math.isfinite(v)}
            self.tracker.log_metrics(run_id, summary, status.reports)


def _metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """A journal row's method metrics (what `_result` logged on the trial's run)."""
    return {k: v for k, v in row.items() if k not in _ROW_KEYS and k not in PLACEMENT and not k.startswith("hp_")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cell(value: Any) -> Any:
    """A hyperparameter as a results cell: a list (layer sizes) as its JSON text, so one column
    holds one type across methods (hyper-hpo's `hidden` is a list, hyper-posterior's a number)
    and results.parquet can hold every arm; MLflow shows the same text as the param."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def _hp_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k[3:]: v for k, v in row.items() if k.startswith("hp_")}


_ROW_KEYS = {"study_id", "arm", "method", "search", "dataset", "seed_index", "seed", "trial_id", "step", "arm_time_s"}


def _arm_metric(key: str) -> str:
    """A best-trial metric's name on the arm run: `best_trial/<key>`; an STN's schedule keeps
    its own names (`hp/<name>`, `perturb_scale/<name>`), the arm's schedule."""
    return key if key.startswith(SCHEDULE_PREFIXES) else f"{BEST_TRIAL}{key}"


def _is_metric(key: str, value: Any) -> bool:
    return (key not in ("seed_index", "seed", "step", *PLACEMENT) and not key.startswith("hp_")
            and isinstance(value, (int, float)) and not isinstance(value, bool))

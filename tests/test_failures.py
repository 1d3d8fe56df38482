"""Trial failures inside a running study: a trial worker killed mid-step (retried from its last
checkpoint, or failed when no retry is allowed), trials the budget must not start, and a
diverging trial."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import run_study_file
from hypersweep.orchestrator.budget import within_budget
from hypersweep.orchestrator.recorder import Recorder


@dataclass
class Event:
    """A Tune event as the recorder received it, before it drops replays and untrained steps."""
    at: float  # time.monotonic() in this process
    kind: str
    arm: str
    trial_id: str | None
    payload: Any
    arm_time: float


@pytest.fixture
def events(monkeypatch) -> list[Event]:
    """Every start/result/end event of the studies this test runs (the study runs in this process)."""
    seen: list[Event] = []
    handle = Recorder.handle

    def spy(self, kind, trial_id, hp, payload, arm_time):
        if kind != "tick":
            seen.append(Event(time.monotonic(), kind, self.ctx.unit.arm.name, trial_id, payload, arm_time))
        return handle(self, kind, trial_id, hp, payload, arm_time)

    monkeypatch.setattr(Recorder, "handle", spy)
    return seen


def _results(events: list[Event], arm: str) -> list[Event]:
    return [e for e in events if e.kind == "result" and e.arm == arm]


class WorkerKiller(threading.Thread):
    """Kills the process of `arm`'s trial with SIGKILL once it has reported `after` steps. The
    process is found through the trial's own report (Tune puts the worker's `pid` in every
    result): Ray's state API (ray.util.state) needs the dashboard, which needs ray[default]."""

    def __init__(self, events: list[Event], arm: str, after: int, timeout: float = 90):
        super().__init__(daemon=True)
        self.events, self.arm, self.after, self.timeout = events, arm, after, timeout
        self.pid: int | None = None
        self.killed_at: float | None = None  # monotonic
        self.steps_before: int = 0  # the trial's last reported step before the kill
        self.error: str | None = None

    def run(self):
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            reports = _results(self.events, self.arm)
            if len(reports) >= self.after:
                last = reports[-1]
                pid = int(last.payload["pid"])
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").strip("\0")
                except OSError:
                    self.error = f"the trial's worker (pid {pid}) had gone before the kill"
                    return
                # "ray::SGDTrainable" between steps, "ray::ResourceTrainable.train" in one
                # (tune.with_resources wraps the class)
                if not (cmdline.startswith("ray::") and "Trainable" in cmdline):  # never another process
                    self.error = f"pid {pid} of the trial's report is not its worker: {cmdline!r}"
                    return
                self.steps_before = max(int(e.payload["training_iteration"]) for e in reports)
                self.pid = pid
                os.kill(pid, signal.SIGKILL)
                self.killed_at = time.monotonic()
                return
            time.sleep(0.02)
        self.error = f"{self.arm}: fewer than {self.after} reports in {self.timeout} s"


def _journal(sd: Path, arm: str, seed_index: int = 0) -> pd.DataFrame:
    # json, not pd.read_json: that reads a trial id such as "8e070_00000" as a number (inf)
    lines = (sd / "results" / f"{arm}__seed{seed_index}.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines])


def _trial_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("kind") == "trial"]


KILL_BUDGET_S = 60  # a ceiling: the arm ends with its trial's 20th step (~15-30 s on 2 busy cores)
KILL_STEPS = 20
KILL_STUDY = {
    "name": "killed", "seed": 3,
    "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
    "arms": [{"name": "fixed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}}],
    "budget": {"seconds": KILL_BUDGET_S, "workers": 1},
    # ~0.2 s a step and a checkpoint after every one. The trial ends by its epochs, not by the
    # budget: with a 25 s budget on a loaded machine (load 8 on 2 cores) the restarted worker
    # had not reported yet when the budget ended.
    "training": {"max_epochs": 30 * KILL_STEPS, "epochs_per_step": 30, "checkpoint_every": 1, "max_failures": 2},
}


def test_a_killed_worker_is_retried_from_its_last_checkpoint(tmp_path, ray_session, events):
    killer = WorkerKiller(events, "fixed", after=4)
    killer.start()
    sd, uri = run_study_file(tmp_path, KILL_STUDY)
    killer.join(timeout=5)
    assert killer.error is None, killer.error
    assert killer.pid is not None

    reports = _results(events, "fixed")
    assert len({e.trial_id for e in reports}) == 1  # the same trial went on, no new one
    retried = [e for e in reports if e.payload["restores"] >= 1]
    assert retried, "the trial never reported again after its worker was killed"
    assert {e.payload["pid"] for e in retried} == {retried[0].payload["pid"]} != {killer.pid}  # a new worker
    first = retried[0]
    # the last step the first worker reported (one may have been in flight when the killer looked)
    last_original = max(int(e.payload["training_iteration"]) for e in reports if e.payload["restores"] == 0)
    assert killer.steps_before <= last_original <= killer.steps_before + 1
    # Tune replays the steps after the checkpoint it restores; the recorder keeps the first of each
    resumed_from = int(first.payload["training_iteration"]) - 1  # the restored checkpoint's step
    print(f"\nkilled after step {last_original}; the retry restored the checkpoint of step {resumed_from} and "
          f"reported {first.at - killer.killed_at:.2f} s after the kill (steps redone: "
          f"{last_original - resumed_from}); {len(reports)} reports")
    assert 1 <= resumed_from <= last_original  # from a checkpoint, not from zero
    # checkpoint_every 1: the checkpoint is at most one step old, only the step in flight is lost
    assert last_original - resumed_from <= 1

    rows = _journal(sd, "fixed")
    assert rows.step.tolist() == list(range(1, KILL_STEPS + 1))  # no gap, no duplicate, every step
    assert (rows.restores[rows.step <= last_original] == 0).all()
    after = rows[rows.step > last_original]
    assert (after.restores == 1).all() and after.step.iloc[0] == last_original + 1 > 1
    assert rows.epoch.tolist() == [30 * k for k in rows.step]  # each step trained its 30 epochs, once
    # the trial's own clock goes on from the checkpoint's (the restart is not the trial's time)
    assert rows.wall_time_s.is_monotonic_increasing

    runs = _trial_runs(uri, "killed")
    assert len(runs) == 1 and runs[0].data.tags["trial_id"] == rows.trial_id.iloc[0]
    assert runs[0].info.status == "FINISHED"  # ended by its epochs (a budget stop also ends FINISHED)
    assert len(MlflowClient(uri).get_metric_history(runs[0].info.run_id, "val_loss")) == KILL_STEPS
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["fixed/seed0"]["status"] == "done" and arms["fixed/seed0"]["trials"] == 1
    assert within_budget(arms["fixed/seed0"]["wall_time_used_s"], KILL_BUDGET_S)


def _run_cli(folder: Path, study: dict) -> tuple[Any, Path, str]:
    """Like conftest's run_study_file, for studies that are meant to end with failed arms
    (exit code 1)."""
    import yaml
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(folder / "study.yaml"), "--study-dir", str(folder / "sd"),
                                       "--tracking-uri", uri, "--no-live"])
    return result, folder / "sd", uri


NO_RETRY_BUDGET_S = 60  # a ceiling: the first arm ends at the kill, the second after 2 steps
NO_RETRY_STUDY = {
    **KILL_STUDY, "name": "no-retry",
    "arms": [{"name": "killed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}, "max_epochs": 100000},
             {"name": "next", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}, "max_epochs": 60}],
    "budget": {"seconds": NO_RETRY_BUDGET_S, "workers": 1},
    "training": {**KILL_STUDY["training"], "max_failures": 0},
}


def test_a_killed_worker_without_retries_fails_its_trial_and_the_study_goes_on(tmp_path, ray_session, events):
    killer = WorkerKiller(events, "killed", after=3)
    killer.start()
    t0 = time.monotonic()
    result, sd, uri = _run_cli(tmp_path, NO_RETRY_STUDY)
    took = time.monotonic() - t0
    killer.join(timeout=5)
    assert killer.error is None, killer.error
    assert result.exit_code == 1, result.output  # some arms failed
    assert "some arms failed" in result.output

    killed = _results(events, "killed")
    assert max(e.payload["restores"] for e in killed) == 0  # not retried
    ends = [e for e in events if e.kind == "end" and e.arm == "killed"]
    assert [e.payload for e in ends] == [False]  # one trial, ended by its error
    print(f"\nkilled arm ended {ends[0].at - killer.killed_at:.2f} s after the kill, at arm time "
          f"{ends[0].arm_time:.1f} s of {NO_RETRY_BUDGET_S}; study took {took:.1f} s")

    rows = _journal(sd, "killed")
    reported = max(int(e.payload["training_iteration"]) for e in killed)
    assert killer.steps_before <= reported <= killer.steps_before + 1  # one may have been in flight
    assert rows.step.tolist() == list(range(1, reported + 1))  # what it reported before stays
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["killed/seed0"]["status"] == "failed" and arms["next/seed0"]["status"] == "done"
    assert arms["killed/seed0"]["reason"].startswith("every trial failed (1 started") and "reason" not in arms["next/seed0"]
    assert "killed seed 0 failed: every trial failed" in result.output
    assert "- killed seed 0 failed: every trial failed" in (sd / "summary.md").read_text()
    for key in ("killed/seed0", "next/seed0"):
        assert within_budget(arms[key]["wall_time_used_s"], NO_RETRY_BUDGET_S)
    # the killed arm stops at its error, it does not idle until its budget ends
    assert arms["killed/seed0"]["wall_time_used_s"] < ends[0].arm_time + 5
    nxt = _journal(sd, "next")
    assert nxt.step.tolist() == [1, 2] and nxt.epoch.tolist() == [30, 60]

    # The error: in the trial's Tune folder (error.txt), counted on the arm run, and the trial run FAILED.
    trial_id = rows.trial_id.iloc[0]
    error = (sd / "tune" / "killed-seed0" / trial_id / "error.txt").read_text()
    assert error.count("Failure # ") == 1 and "The actor died unexpectedly" in error
    client = MlflowClient(uri)
    trial_runs = [r for r in _trial_runs(uri, "no-retry") if r.data.tags["arm"] == "killed"]
    assert [(r.info.status, r.data.tags["trial_id"]) for r in trial_runs] == [("FAILED", trial_id)]
    exp = client.get_experiment_by_name("no-retry")
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    arm_runs = {r.data.tags["arm"]: r for r in all_runs if r.data.tags.get("kind") == "arm"}
    assert arm_runs["killed"].info.status == "FAILED" and arm_runs["killed"].data.metrics["summary/trial_errors"] == 1
    assert arm_runs["killed"].data.tags["error"] == arms["killed/seed0"]["reason"]
    assert arm_runs["next"].info.status == "FINISHED" and arm_runs["next"].data.metrics["summary/trial_errors"] == 0
    study_run = next(r for r in all_runs if r.data.tags.get("kind") == "study")
    assert study_run.info.status == "FAILED"
    assert not [r for r in all_runs if r.info.status == "RUNNING"]


# The budget was 15 s; 20 s leaves room for trials to train on a loaded machine, where
# Tuner set-up and the first workers' start took 13-14.6 s of the arm's time (load 5-8 on 2 cores)
LATE_BUDGET_S = 20
LATE_STUDY = {
    "name": "late-trials", "seed": 11,
    "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
    "arms": [{"name": "rand", "method": "sgd", "search": "random", "num_samples": 40,
              "space": {"lr": {"loguniform": [0.01, 0.2]}}}],
    "budget": {"seconds": LATE_BUDGET_S, "workers": 2},
    # ~1 s a trial: far more trials than the budget has time for
    "training": {"max_epochs": 120, "epochs_per_step": 30, "checkpoint_every": 2},
}


def test_no_trial_starts_once_the_budget_is_spent(tmp_path, ray_session, events):
    """The issue: with a 15 s budget, 42 of 46 random-search trials started after it, trained 0
    epochs, and left rows and MLflow runs with the untrained net's loss."""
    sd, uri = run_study_file(tmp_path, LATE_STUDY)
    rows = _journal(sd, "rand")
    part = pd.read_parquet(sd / "results.parquet")
    starts = {e.trial_id: e.arm_time for e in events if e.kind == "start"}
    reported = {e.trial_id for e in _results(events, "rand")}
    created = sorted(p.name for p in (sd / "tune" / "rand-seed0").iterdir() if p.is_dir())
    trained = sorted(rows.trial_id.unique())
    runs = {r.data.tags["trial_id"]: r for r in _trial_runs(uri, "late-trials")}
    arms = json.loads((sd / "arms.json").read_text())
    used = arms["rand/seed0"]["wall_time_used_s"]
    partial = sum(g.sort_values("step").epoch.iloc[0] == 0 for _, g in rows.groupby("trial_id"))
    print(f"\ntrials: {len(created)} created by Tune (folders), {len(starts)} started, {len(reported)} reported, "
          f"{len(trained)} trained ({partial} less than an epoch), {len(runs)} MLflow runs, of num_samples 40; "
          f"first start at arm time {min(starts.values()):.1f} s, last at {max(starts.values()):.1f} s; "
          f"arm used {used:.1f} s")

    assert trained, "no trial trained within the budget"
    assert set(runs) == set(trained)  # a run for every trial that trained, none for the others
    assert set(trained) <= set(starts) and set(starts) <= set(created)
    # Tune creates trials ahead of free slots: at most one per worker slot is left unstarted
    assert len(created) - len(starts) <= LATE_STUDY["budget"]["workers"]
    for trial_id, g in rows.groupby("trial_id"):
        first = g.sort_values("step").iloc[0]
        assert starts[trial_id] < LATE_BUDGET_S  # started while the budget lasted
        assert math.isfinite(first.train_loss), trial_id  # at least one minibatch trained
        # a whole epoch, unless the deadline cut the trial's first pass short (then it reports at the deadline)
        assert first.epoch > 0 or first.arm_time_s >= LATE_BUDGET_S - 0.1, (trial_id, first.arm_time_s)
        assert first.epochs_this_step == first.epoch
        # the first report comes at the latest when the budget ends, plus the time to evaluate and
        # report it (up to 0.1 s seen, on 2 busy cores)
        assert first.arm_time_s <= LATE_BUDGET_S + 2.0, (trial_id, first.arm_time_s)
        assert g.step.tolist() == list(range(1, len(g) + 1))
    for df in (rows, part):  # nothing untrained recorded (a pass the deadline cut short counts 0 epochs)
        assert not ((df.epochs_this_step == 0) & df.train_loss.isna()).any()
        assert df.train_loss.map(math.isfinite).all()
    assert len(part) == len(rows)
    assert within_budget(used, LATE_BUDGET_S)
    assert arms["rand/seed0"]["trials"] == len(trained)


DIVERGE_BUDGET_S = 40  # never reached: the trial fails within ~15 s, retry included
DIVERGE_STUDY = {
    "name": "diverging", "seed": 3,
    # regression's Gaussian NLL with a learned noise scale: at lr 1 the loss is NaN at epoch 13 (seed 3)
    "dataset": {"name": "boston"}, "model": {"kind": "mlp", "hidden": [32]},
    "arms": [{"name": "blowup", "method": "sgd", "search": "fixed", "params": {"lr": 1.0}}],
    "budget": {"seconds": DIVERGE_BUDGET_S, "workers": 1},
    # one retry allowed, for a worker that dies: a diverged run must not use it
    "training": {"max_epochs": 60, "epochs_per_step": 1, "checkpoint_every": 1, "max_failures": 1},
}


def test_a_diverging_trial_fails_with_its_reason_and_is_not_retried(tmp_path, ray_session, events):
    result, sd, uri = _run_cli(tmp_path, DIVERGE_STUDY)
    rows = _journal(sd, "blowup")
    runs = _trial_runs(uri, "diverging")
    assert len(runs) == 1  # one trial, not retried
    diverged_at = re.findall(r"^training diverged: non-finite training loss at epoch (\d+)$", runs[0].data.tags["error"])
    assert len(diverged_at) == 1  # the reason, on the trial's run
    assert not (sd / "tune" / "blowup-seed0" / rows.trial_id.iloc[0] / "error.txt").exists()  # no Tune error: no retry
    assert result.exit_code == 1, result.output  # the arm's only trial failed
    # the steps before are kept, finite
    assert rows.step.tolist() == list(range(1, int(diverged_at[0]))) and rows.train_loss.map(math.isfinite).all()
    assert max(e.payload.get("restores", 0) for e in _results(events, "blowup")) == 0
    assert [e.payload for e in events if e.kind == "end"] == [False]
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_failed_arm_says_why_in_one_line():
    from hypersweep.orchestrator.arms import failure_reason
    from hypersweep.orchestrator.progress import ArmStatus
    status = ArmStatus("slow", 0, budget_s=150)
    status.trials_started = 2
    assert failure_reason({"errors": 0}, [], 0, status).startswith("no trial reported within the budget (150 s)")
    assert failure_reason({"errors": 2}, [], 2, status).startswith("every trial failed (2 started")
    status.reason = "every trial failed (2 started; ...)"  # found before the coordinator died ending the arm
    assert failure_reason({"errors": 2}, [], 2, status) == status.reason
    tune_error = {"errors": -1, "error": "TuneError: the experiment could not start\n  more lines"}
    assert failure_reason(tune_error, [], -1, status) == "TuneError: the experiment could not start"

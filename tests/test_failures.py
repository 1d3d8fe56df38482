"""Trial failures inside a running study: a trial worker killed mid-step (retried from its last
checkpoint, or failed when no retry is allowed), trials the budget must not start, and a
diverging trial."""
from __future__ import annotations

import json
import math
import os
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
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").strip("\0")
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
    return pd.read_json(sd / "results" / f"{arm}__seed{seed_index}.jsonl", lines=True)


def _trial_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("kind") == "trial"]


KILL_BUDGET_S = 25
KILL_STUDY = {
    "name": "killed", "seed": 3,
    "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
    "arms": [{"name": "fixed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}}],
    "budget": {"seconds": KILL_BUDGET_S, "workers": 1},
    # ~0.2 s a step, a checkpoint after every one; the trial runs until the budget ends
    "training": {"max_epochs": 100000, "epochs_per_step": 30, "checkpoint_every": 1, "max_failures": 2},
}


def test_a_killed_worker_is_retried_from_its_last_checkpoint(tmp_path, ray_session, events):
    killer = WorkerKiller(events, "fixed", after=4)
    killer.start()
    sd, uri = run_study_file(tmp_path, KILL_STUDY)
    killer.join(timeout=5)
    assert killer.error is None, killer.error
    assert killer.pid is not None

    reports = _results(events, "fixed")
    retried = [e for e in reports if e.payload["restores"] >= 1]
    assert retried, "the trial never reported again after its worker was killed"
    assert len({e.trial_id for e in reports}) == 1  # the same trial went on, no new one
    assert {e.payload["pid"] for e in retried} == {retried[0].payload["pid"]} != {killer.pid}
    first = retried[0]
    resumed_from = int(first.payload["training_iteration"]) - 1  # the checkpoint's step
    print(f"\nkill after step {killer.steps_before}; retry restored step {resumed_from}, "
          f"first retried report {first.at - killer.killed_at:.2f} s after the kill; "
          f"steps redone {killer.steps_before - resumed_from}; reports {len(reports)}")

    rows = _journal(sd, "fixed")
    assert rows.step.tolist() == list(range(1, len(rows) + 1))  # no gap, no duplicate
    assert (rows.restores[rows.step <= killer.steps_before] == 0).all()
    after = rows[rows.step > killer.steps_before]
    assert len(after) >= 3 and (after.restores == 1).all()
    assert after.step.iloc[0] > 1  # went on from a checkpoint, not from zero
    # the checkpoint is at most one step old (checkpoint_every: 1): at most the step in flight is lost
    assert killer.steps_before - resumed_from <= 1
    # every step trained its 30 epochs (the last one: until the deadline); the restored ones too
    assert rows.epoch.tolist()[:-1] == [30 * s for s in rows.step[:-1]]

    runs = _trial_runs(uri, "killed")
    assert len(runs) == 1 and runs[0].data.tags["trial_id"] == rows.trial_id.iloc[0]
    assert runs[0].info.status == "FINISHED"  # stopped at its first report past the budget
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["fixed/seed0"]["status"] == "done"
    assert within_budget(arms["fixed/seed0"]["wall_time_used_s"], KILL_BUDGET_S)
    assert rows.arm_time_s.max() <= KILL_BUDGET_S + 1


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


NO_RETRY_BUDGET_S = 20
NO_RETRY_STUDY = {
    **KILL_STUDY, "name": "no-retry",
    "arms": [{"name": "killed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}},
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
    assert rows.step.tolist() == list(range(1, killer.steps_before + 1))  # what it reported before stays
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["killed/seed0"]["status"] == "failed" and arms["next/seed0"]["status"] == "done"
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
    runs = {r.data.tags.get("kind"): r for r in _trial_runs(uri, "no-retry") if r.data.tags["arm"] == "killed"}
    assert runs["trial"].info.status == "FAILED" and runs["trial"].data.tags["trial_id"] == trial_id
    exp = client.get_experiment_by_name("no-retry")
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    arm_runs = {r.data.tags["arm"]: r for r in all_runs if r.data.tags.get("kind") == "arm"}
    assert arm_runs["killed"].info.status == "FAILED" and arm_runs["killed"].data.metrics["trial_errors"] == 1
    assert arm_runs["next"].info.status == "FINISHED" and arm_runs["next"].data.metrics["trial_errors"] == 0
    study_run = next(r for r in all_runs if r.data.tags.get("kind") == "study")
    assert study_run.info.status == "FAILED"
    assert not [r for r in all_runs if r.info.status == "RUNNING"]

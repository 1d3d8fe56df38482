"""`hypersweep resume` after the coordinator died (SIGKILL) or was stopped (SIGINT) in the middle
of a study: the finished study has every arm x seed, exact records (no report twice, none
lost, every MLflow (run, metric, step) once, no run left RUNNING), equal budgets, and the
interrupted trials went on from their checkpoints."""
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from hypersweep.orchestrator.budget import within_budget

BUDGET_S = 30
STUDY = {
    "name": "resumable", "seed": 5, "seeds": 2,
    "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
    "arms": [
        {"name": "fixed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}, "max_epochs": 20},
        {"name": "rand", "method": "sgd", "search": "random", "num_samples": 4,
         "space": {"lr": {"loguniform": [0.01, 0.2]}}},
    ],
    "budget": {"seconds": BUDGET_S, "workers": 2},
    # trials that outlive the stop: two run side by side until the budget ends
    "training": {"max_epochs": 100000, "epochs_per_step": 10, "checkpoint_every": 2},
}


def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hypersweep.orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """What the dead coordinator's Ray left behind (raylet, workers) goes too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the study ended before the moment to stop it:\n{proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail("the moment to stop the study never came")


def _journal(sd: Path, arm: str, seed_index: int) -> list[dict]:
    path = sd / "results" / f"{arm}__seed{seed_index}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _sigkill(proc: subprocess.Popen, sd: Path, after_s: float, seeds: int = 2) -> dict[tuple[str, int], list[dict]]:
    """Kill the coordinator `proc` `after_s` from now; what its journals held just before."""
    time.sleep(after_s)
    before = {(arm, k): _journal(sd, arm, k) for arm in ("fixed", "rand") for k in range(seeds)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return before


def _running(sd: Path, key: str) -> bool:
    try:
        arms = json.loads((sd / "arms.json").read_text())
    except (OSError, ValueError):
        return False
    return arms.get(key, {}).get("status") == "running"


def _check_finished_study(sd: Path, uri: str, before: dict[tuple[str, int], list[dict]], stopped_arm: str = "rand",
                          restored: bool = True, interruptions: int = 1, resumes: int = 1) -> None:
    arms = json.loads((sd / "arms.json").read_text())
    assert sorted(arms) == ["fixed/seed0", "fixed/seed1", "rand/seed0", "rand/seed1"]
    assert {a["status"] for a in arms.values()} == {"done"}, arms
    for a in arms.values():  # equal budgets: the time before the stop counts, the gap does not
        assert within_budget(a["wall_time_used_s"], BUDGET_S), json.dumps(a)  # the timeline says where it went
    assert arms[f"{stopped_arm}/seed0"]["interruptions"] == interruptions

    results = pd.read_parquet(sd / "results.parquet")
    keys = list(zip(results.arm, results.seed_index, results.trial_id, results.step))
    assert len(keys) == len(set(keys)), "a report recorded twice"
    for (arm, seed_index), rows in before.items():  # nothing recorded before the stop was lost
        had = {(r["trial_id"], r["step"]) for r in rows}
        now = set(zip(results[(results.arm == arm) & (results.seed_index == seed_index)].trial_id,
                      results[(results.arm == arm) & (results.seed_index == seed_index)].step))
        assert had <= now
    # Every trial's steps run 1, 2, ..., n: a restored trial went on from its checkpoint, and a
    # trial that was running when the study stopped says so in `restores`.
    for (arm, seed_index, trial_id), g in results.groupby(["arm", "seed_index", "trial_id"]):
        assert sorted(g.step) == list(range(1, len(g) + 1)), (arm, seed_index, trial_id)
    stopped = results[(results.arm == stopped_arm) & (results.seed_index == 0)]
    if restored:
        went_on = stopped[stopped.restores > 0]
        assert len(went_on), "no trial of the stopped arm went on from a checkpoint"
        first = went_on.sort_values("step").groupby("trial_id").step.first()
        assert (first > 1).all(), "a restored trial started from zero"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resumable")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kinds = Counter(r.data.tags.get("kind") for r in runs)
    assert kinds["study"] == 1 and kinds["arm"] == 4
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed"] == str(resumes)
    assert parent.data.tags["hypersweep.resumed_version"] == parent.data.tags["hypersweep.version"]
    code = json.loads((sd / "runs.json").read_text())["code"]  # the study directory names each execution's code
    assert [c["at"] for c in code] == ["start"] + ["resume"] * resumes and code[1]["version"] == code[0]["version"]
    trials = Counter((r.data.tags["mlflow.parentRunId"], r.data.tags["trial_id"]) for r in runs
                     if r.data.tags.get("kind") == "trial")
    assert trials and max(trials.values()) == 1, "a trial with two runs"
    # its hyperparameters on every trial run (they travel with its first metrics: a run whose
    # first batch the killed coordinator never sent gets them from resume)
    assert all({"lr", "momentum"} <= set(r.data.params) for r in runs if r.data.tags.get("kind") == "trial")
    assert len(trials) == results.groupby(["arm", "seed_index"]).trial_id.nunique().sum()
    for run in runs:  # every (run, metric, step) once
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key)
    # The trial runs carry every report of the results store.
    by_trial = {r.data.tags["trial_id"]: r.info.run_id for r in runs if r.data.tags.get("kind") == "trial"
                and r.data.tags["arm"] == stopped_arm and r.data.tags["seed_index"] == "0"}
    for trial_id, g in stopped.groupby("trial_id"):
        history = client.get_metric_history(by_trial[trial_id], "val_loss")
        assert sorted(m.step for m in history) == sorted(g.step)


# With the slow tests (90 s each; test_one_coordinator_per_study kills a coordinator mid-arm in
# the default suite). The restore costs the arm ~6 s of actor start-up on 2 idle cores (twice
# that under load).
@pytest.mark.parametrize("moment_s", [pytest.param(1.5, id="early", marks=pytest.mark.slow),
                                      pytest.param(3.0, id="mid-arm", marks=pytest.mark.slow),
                                      pytest.param(7.5, id="late-arm", marks=pytest.mark.slow)])
def test_resume_after_sigkill_inside_a_searched_arm(tmp_path, moment_s):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        # inside the searched arm of the first repetition, `moment_s` after its first report (Tune
        # has saved its experiment state with a checkpoint by then: it does every 2 s)
        _wait_for(lambda: _running(sd, "rand/seed0") and _journal(sd, "rand", 0), 120, run)
        before = _sigkill(run, sd, moment_s)
    finally:
        _kill_group(run)
    assert run.returncode == -signal.SIGKILL

    t0 = time.monotonic()
    resume = _cli("resume", str(sd), "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    assert time.monotonic() - t0 < 240
    _check_finished_study(sd, uri, before)

    again = _cli("resume", str(sd), "--no-live")  # a finished study: said so, nothing changed
    stamp = (sd / "arms.json").stat().st_mtime_ns
    assert "has finished" in _finish(again) and again.returncode == 0
    assert (sd / "arms.json").stat().st_mtime_ns == stamp


def _refused(proc: subprocess.Popen, started: float, says: str) -> None:
    """`proc` (a second coordinator) exited 2 within 10 s of `started`, in one line saying `says`."""
    out = _finish(proc, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started < 10, (proc.returncode, out)
    [line] = out.splitlines()
    assert line.startswith("hypersweep: error: ") and says in line, line


class _Planted:
    """A pickle that runs code when loaded: it creates its marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_one_coordinator_per_study(tmp_path):
    """The study's lease: a resume beside the live coordinator is refused; `--break-lease` takes
    the study over and the old coordinator stops without writing more; after a SIGKILL mid-arm,
    of two resumes started together exactly one runs the study to its end, the other is refused
    at once, and the records are exact. On the way, pickles planted in the study directory are
    never loaded (one study serves both, for the suite's time)."""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    host = socket.gethostname()
    first = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    second = None
    try:
        _wait_for(lambda: _running(sd, "rand/seed0") and _journal(sd, "rand", 0), 120, first)
        t0 = time.monotonic()
        _refused(_cli("resume", str(sd), "--no-live"), t0, f"is held by another coordinator: {host} pid {first.pid} "
                 f"(hypersweep run {tmp_path / 'study.yaml'} --study-dir {sd}")
        assert sorted(os.listdir(sd / "lease")) == ["000001.json"]  # the refused wrote nothing

        # taken over from a live coordinator: it stops at its next heartbeat, writing nothing more
        second = _cli("resume", str(sd), "--no-live", "--break-lease", "--yes")
        out = _finish(first, timeout=60)
        assert first.returncode == 1, out
        assert f"hypersweep: error: the lease on {sd} was taken over by {host} pid {second.pid}" in out, out
        had = len(_journal(sd, "rand", 0))
        _wait_for(lambda: len(_journal(sd, "rand", 0)) > had + 2, 120, second)  # the new coordinator trains on
        before = _sigkill(second, sd, 1.5)
    finally:
        _kill_group(first)
        if second is not None:
            _kill_group(second)

    # Nothing planted in the study directory runs: a tuner.pkl that is not the one this study
    # wrote is refused in one line before anything is loaded or written...
    marker, experiment = tmp_path / "PWNED", sd / "tune" / "rand-seed0"
    evil = pickle.dumps(_Planted(marker))
    original = (experiment / "tuner.pkl").read_bytes()
    (experiment / "tuner.pkl").write_bytes(evil)
    stamp = (sd / "arms.json").stat().st_mtime_ns
    t0 = time.monotonic()
    _refused(_cli("resume", str(sd), "--no-live"), t0, f"{experiment / 'tuner.pkl'}: not the file this study's "
             "coordinator wrote")
    assert not marker.exists() and (sd / "arms.json").stat().st_mtime_ns == stamp
    assert sorted(os.listdir(sd / "lease")) == ["000001.json", "000002.json"]
    (experiment / "tuner.pkl").write_bytes(original)
    # ... and the other pickles Tune would load are set aside: a newer search state, a trial's exception
    (experiment / "search_gen_state-2099-01-01_00-00-00.json").write_bytes(evil)
    (next(p for p in experiment.iterdir() if p.is_dir()) / "error.pkl").write_bytes(evil)

    t0 = time.monotonic()  # two resumes at once: the dead holder's lease goes to exactly one
    both = [_cli("resume", str(sd), "--no-live") for _ in range(2)]
    try:
        while all(p.poll() is None for p in both) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        [loser] = [p for p in both if p.poll() is not None]
        _refused(loser, t0, "another coordinator")
        [winner] = [p for p in both if p is not loser]
        out = _finish(winner)
    finally:
        for p in both:
            _kill_group(p)
    assert winner.returncode == 0, out
    assert f"took over the lease of {sd} from {host} pid {second.pid} (its process {second.pid} on {host} is gone)" \
        in out
    assert "set aside" in out and "search_gen_state-2099-01-01_00-00-00.json" in out and "error.pkl" in out, out
    assert not marker.exists()
    _check_finished_study(sd, uri, before, interruptions=2, resumes=2)
    leases = [json.loads((sd / "lease" / name).read_text()) for name in sorted(os.listdir(sd / "lease"))]
    assert [lease["pid"] for lease in leases] == [first.pid, second.pid, winner.pid]
    assert [(lease["took_over"] or {}).get("why") for lease in leases][:2] == [None, "broken"]
    assert leases[-1]["released"]  # the next coordinator may start at once
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("resumable").experiment_id], "tags.kind = 'study'")[0]
    assert f"{host} pid {first.pid} (broken)" in parent.data.tags["hypersweep.lease_broken"]
    assert f"{host} pid {second.pid} (its process" in parent.data.tags["hypersweep.lease_taken_over"]


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True], ids=["unsigned", "trusted"])
def test_a_study_from_before_signing_resumes(tmp_path, trust):
    """A study whose Tune state was never signed (written before hypersweep signed it): the
    interrupted arm runs the rest of its budget in a fresh Tune experiment, said in one line;
    with --trust-study-dir its state is restored as it is, and the study's run says so."""
    study = {**STUDY, "seeds": 1}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        # checkpoints in Tune's saved state (checkpoint_every: 2; it saves every 2 s)
        _wait_for(lambda: _running(sd, "rand/seed0") and len(_journal(sd, "rand", 0)) >= 6, 120, run)
        before = _sigkill(run, sd, 2.5, seeds=1)
    finally:
        _kill_group(run)
    import shutil
    shutil.rmtree(sd / "tune-signed")
    resume = _cli("resume", str(sd), "--no-live", *(["--trust-study-dir"] if trust else []))
    out = _finish(resume)
    assert resume.returncode == 0, out
    results = pd.read_parquet(sd / "results.parquet")
    for (arm, k), rows in before.items():  # nothing recorded before the stop was lost
        assert {(r["trial_id"], r["step"]) for r in rows} <= set(zip(results[results.arm == arm].trial_id,
                                                                     results[results.arm == arm].step))
    arms = json.loads((sd / "arms.json").read_text())
    assert {a["status"] for a in arms.values()} == {"done"} and within_budget(arms["rand/seed0"]["wall_time_used_s"],
                                                                             BUDGET_S)
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("resumable").experiment_id], "tags.kind = 'study'")[0]
    rand = results[results.arm == "rand"]
    if trust:
        assert "hypersweep.trusted_study_dir" in parent.data.tags and "no signed Tune state" not in out
        assert not (sd / "tune" / "rand-seed0.attempt2").exists() and (rand.restores > 0).any()
    else:
        [notice] = [line for line in out.splitlines() if "no signed Tune state" in line]
        assert "rand seed 0" in notice and "--trust-study-dir" in notice
        assert (sd / "tune" / "rand-seed0.attempt2").is_dir() and (rand.restores == 0).all()
        assert "hypersweep.trusted_study_dir" not in parent.data.tags


def test_sigint_stops_the_study_and_resume_finishes_it(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        # a few reports in: the trials have checkpoints Tune has registered (checkpoint_every: 2)
        _wait_for(lambda: _running(sd, "rand/seed0") and len(_journal(sd, "rand", 0)) >= 6, 120, run)
        os.kill(run.pid, signal.SIGINT)
        out = _finish(run, timeout=60)
    finally:
        _kill_group(run)
    assert run.returncode == 130, out
    assert f"hypersweep resume {sd}" in out
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["rand/seed0"]["status"] == "interrupted" and "rand/seed1" not in arms  # the study stopped
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    before = {(arm, k): _journal(sd, arm, k) for arm in ("fixed", "rand") for k in (0, 1)}
    used_before = arms["rand/seed0"]["wall_time_used_s"]
    assert 0 < used_before < BUDGET_S

    resume = _cli("resume", str(sd), "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    _check_finished_study(sd, uri, before)


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    not_a_study = tmp_path / "empty"
    not_a_study.mkdir()
    r = subprocess.run([sys.executable, "-m", "hypersweep.orchestrator.cli", "resume", str(not_a_study)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a study directory" in r.stderr and len(r.stderr.splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.yaml").write_text(yaml.safe_dump({**STUDY, "budget": {"seconds": -1}}))
    r = subprocess.run([sys.executable, "-m", "hypersweep.orchestrator.cli", "resume", str(broken)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "budget.seconds" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sorted(p.name for p in broken.iterdir()) == ["study.yaml"]  # nothing written
    (broken / "study.yaml").write_text(yaml.safe_dump(STUDY))
    r = subprocess.run([sys.executable, "-m", "hypersweep.orchestrator.cli", "resume", str(broken), "--budget-s", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "smaller than the study's recorded budget" in r.stderr
    assert math.isclose(yaml.safe_load((broken / "study.yaml").read_text())["budget"]["seconds"], BUDGET_S)


@pytest.mark.slow
def test_resume_after_sigkill_during_an_arms_ensemble(tmp_path):
    """Killed while the first arm draws its ensemble (its training over): the resume finishes
    that arm's end records once, without training it again, then the rest of the study."""
    study = {**STUDY, "arms": [{**STUDY["arms"][0], "num_samples": 2, "ensemble": {"members": 2}}, STUDY["arms"][1]]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")

    def ending() -> bool:
        try:
            return json.loads((sd / "arms.json").read_text()).get("fixed/seed0", {}).get("status") == "ending"
        except (OSError, ValueError):
            return False

    try:
        _wait_for(ending, 120, run)
        before = _sigkill(run, sd, 0.5)
    finally:
        _kill_group(run)
    resume = _cli("resume", str(sd), "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    _check_finished_study(sd, uri, before, stopped_arm="fixed", restored=False)
    results = pd.read_parquet(sd / "results.parquet")
    assert results[results.arm == "fixed"].restores.max() == 0  # its training was not redone
    for k in (0, 1):
        members = pd.read_parquet(sd / "ensembles" / f"fixed-seed{k}" / "ensemble.parquet")
        assert len(members) == 2 and members.trial_id.nunique() == 2
    client = MlflowClient(uri)
    arm_runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id],
                                  "tags.kind = 'arm' and tags.arm = 'fixed'")
    assert len(arm_runs) == 2 and all(r.data.metrics["ensemble.members"] == 2 for r in arm_runs)


@pytest.mark.slow
def test_a_longer_budget_extends_the_arms_that_ran_out_of_it(tmp_path):
    """`resume --budget-s` on a finished study: the arm whose trials the budget cut goes on from
    their checkpoints to the new budget (its wall time charged in full: old + new part); the arm
    that had finished early is left as it was."""
    study = {**STUDY, "seeds": 1, "budget": {"seconds": 12, "workers": 2},
             "arms": [{**STUDY["arms"][0], "max_epochs": 20}, {**STUDY["arms"][1], "num_samples": 2}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _finish(_cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live"))
    arms = json.loads((sd / "arms.json").read_text())
    assert {a["status"] for a in arms.values()} == {"done"}, out
    assert arms["fixed/seed0"]["wall_time_used_s"] < 10 and within_budget(arms["rand/seed0"]["wall_time_used_s"], 12)
    before = pd.read_parquet(sd / "results.parquet")

    resume = _cli("resume", str(sd), "--budget-s", "24", "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    arms = json.loads((sd / "arms.json").read_text())
    rand, fixed = arms["rand/seed0"], arms["fixed/seed0"]
    assert rand["status"] == "done" and rand["budget_s"] == 24 and rand["extensions"] == 1, rand
    assert within_budget(rand["wall_time_used_s"], 24), rand
    assert fixed["budget_s"] == 12 and fixed["extensions"] == 0 and fixed["interruptions"] == 0
    assert yaml.safe_load((sd / "study.yaml").read_text())["budget"]["seconds"] == 24

    after = pd.read_parquet(sd / "results.parquet")
    keys = list(zip(after.arm, after.trial_id, after.step))
    assert len(keys) == len(set(keys))
    assert after[after.arm == "fixed"].sort_values(["trial_id", "step"]).step.tolist() == \
        before[before.arm == "fixed"].sort_values(["trial_id", "step"]).step.tolist()
    old, new = (df[df.arm == "rand"].groupby("trial_id").step.max() for df in (before, after))
    went_on = [t for t in old.index if new[t] > old[t]]
    assert went_on, "no trial of the extended arm trained on"
    for trial_id, g in after[after.arm == "rand"].groupby("trial_id"):
        # from its checkpoint at the old deadline, not from zero: its next step, or the one after
        # when the old budget ended in a step that began past the deadline (it trained nothing,
        # is not a row, but counted as a step)
        steps = sorted(g.step)
        assert len(steps) == len(set(steps)) and steps[0] == 1, trial_id
        if trial_id in went_on:
            assert min(s for s in steps if s > old[trial_id]) in (old[trial_id] + 1, old[trial_id] + 2), trial_id
            assert (g[g.step > old[trial_id]].restores > 0).all()
            assert g[g.step > old[trial_id]].arm_time_s.min() >= 12 * 0.9  # charged after the old budget

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    assert parent.data.tags["budget_seconds_resumed"] == "24.0"
    arm = next(r for r in runs if r.data.tags.get("kind") == "arm" and r.data.tags["arm"] == "rand")
    assert arm.data.tags["resumed"] == "1" and "best_trial_id" in arm.data.tags
    for run in runs:  # every (run, metric, step) once
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key)
    trial_runs = {r.data.tags["trial_id"]: r.info.run_id for r in runs if r.data.tags.get("kind") == "trial"
                  and r.data.tags["arm"] == "rand"}
    for trial_id, g in after[after.arm == "rand"].groupby("trial_id"):
        assert sorted(m.step for m in client.get_metric_history(trial_runs[trial_id], "val_loss")) == sorted(g.step)
    summaries = client.get_metric_history(arm.info.run_id, "summary/trials")
    assert len(summaries) == 2  # summarised at the end of each budget, at its report count

    again = _cli("resume", str(sd), "--budget-s", "24", "--no-live")
    assert "has finished" in _finish(again) and again.returncode == 0

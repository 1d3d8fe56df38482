"""Anytime curves and the compare report on hand-made tables; every search end to end."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hypersweep.orchestrator.budget import Budget, FakeClock, tolerance
from conftest import run_study_file
from hypersweep.orchestrator.cli import main
from hypersweep.orchestrator.report import aggregate, anytime_curves, arm_table, on_grid


def _rows(arm, search, seed, points):
    """points: (arm_time_s, trial, val_loss, test_error)."""
    return [{"arm": arm, "search": search, "seed_index": seed, "trial_id": trial, "arm_time_s": t, "val_loss": v,
             "test_loss": v + 0.1, "test_error": e} for t, trial, v, e in points]


def test_anytime_curve_of_a_hand_made_table():
    df = pd.DataFrame(_rows("a", "random", 0, [(1.0, "x", 0.9, 0.30), (2.0, "y", 1.2, 0.40), (3.0, "x", 0.5, 0.20),
                                               (4.0, "y", 0.7, 0.25), (5.0, "y", 0.4, 0.10)]))
    c = anytime_curves(df)
    assert c.t.tolist() == [1.0, 3.0, 5.0]  # improvements only, whichever trial made them
    assert c.best_val_loss.tolist() == [0.9, 0.5, 0.4]
    assert c.test_error.tolist() == [0.30, 0.20, 0.10]  # the test metric of that report, not the best test
    grid = np.array([0.5, 1.0, 2.9, 3.0, 10.0])
    values = on_grid(c, grid)
    assert np.isnan(values[0]) and values[1:].tolist() == [0.9, 0.9, 0.5, 0.4]


def test_aggregate_median_band_and_mean_ci():
    df = pd.DataFrame(_rows("a", "random", 0, [(1.0, "x", 1.0, 0.3)]) + _rows("a", "random", 1, [(1.0, "x", 2.0, 0.3)])
                      + _rows("a", "random", 2, [(1.0, "x", 4.0, 0.3), (2.0, "x", 3.0, 0.3)]))
    agg = aggregate(anytime_curves(df), np.array([1.5, 2.5]))
    assert agg.center.tolist() == [2.0, 2.0] and agg.low.tolist() == [1.5, 1.5]
    assert agg.high.tolist() == [3.0, 2.5] and agg.seeds.tolist() == [3, 3]
    mean = aggregate(anytime_curves(df), np.array([2.5]), how="mean")
    assert mean.center.iloc[0] == pytest.approx(2.0)
    assert mean.high.iloc[0] - mean.center.iloc[0] == pytest.approx(1.96 * 1.0 / math.sqrt(3))


def test_arm_table_time_to_baseline():
    rows = []
    for seed in (0, 1):
        rows += _rows("bo", "tpe", seed, [(10.0, "a", 0.8, 0.3), (50.0, "b", 0.5, 0.2)])
        rows += _rows("rand", "random", seed, [(10.0, "a", 0.9, 0.3), (60.0, "b", 0.6, 0.2)])
        rows += _rows("stn", "fixed", seed, [(5.0, "s", 0.7, 0.3), (20.0 + seed * 10, "s", 0.45, 0.1)])
    arms = {f"{a}/seed{s}": {"arm": a, "seed_index": s, "wall_time_used_s": 100.0 + s} for a in ("bo", "rand", "stn")
            for s in (0, 1)}
    table, baseline = arm_table(pd.DataFrame(rows), arms)
    assert baseline == "bo"  # the best black-box arm; stn is not a baseline
    t = table.set_index("arm")
    assert t.loc["stn", "time to baseline (s, median)"] == 25.0 and t.loc["stn", "seeds reaching baseline"] == "2/2"
    assert math.isnan(t.loc["rand", "time to baseline (s, median)"])
    assert t.loc["bo", "final best val_loss (median)"] == 0.5 and t.loc["bo", "wall time used (s, median)"] == 100.5
    assert t.loc["stn", "test_error at best val (median)"] == 0.1 and t.loc["bo", "trials (median)"] == 2
    df = pd.DataFrame(rows).assign(step=lambda d: d.arm_time_s)
    last, _ = arm_table(df, arms, last_k=2)
    # bo: best trial "b" has one report per seed (0.2): mean 0.2, s.e. 0
    assert last.set_index("arm").loc["bo", "test_error, last 2 reports (mean +- s.e. over seeds)"] == "0.2 +- 0"


def test_budget_tolerance_with_a_fake_clock():
    assert tolerance(100) == 5.0 and tolerance(1000) == 20.0
    clock = FakeClock()
    b = Budget(100, clock).start()
    clock.advance(104.9)
    assert b.exhausted() and b.within_tolerance()
    clock.advance(0.2)
    assert b.overrun() == pytest.approx(5.1) and not b.within_tolerance()


SPACE = {"lr": {"loguniform": [0.01, 0.2]}, "dropout": {"uniform": [0.0, 0.5]}}
SEARCH_STUDY = {
    "name": "searches",
    "seed": 11,
    "seeds": 1,
    "dataset": {"name": "digits"},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [
        {"name": "grid", "method": "sgd", "search": "grid", "params": {"batch_size": 64},
         "space": {"lr": {"grid": [0.02, 0.1]}, "dropout": {"choice": [0.0, 0.3]}}},
        {"name": "random", "method": "sgd", "search": "random", "num_samples": 3, "params": {"batch_size": 64},
         "space": SPACE},
        {"name": "tpe", "method": "sgd", "search": "tpe", "num_samples": 3, "params": {"batch_size": 64}, "space": SPACE},
        {"name": "gp", "method": "sgd", "search": "gp", "num_samples": 3, "params": {"batch_size": 64}, "space": SPACE},
        {"name": "asha", "method": "sgd", "search": "random", "num_samples": 6, "scheduler": "asha",
         "scheduler_options": {"grace_period": 1, "reduction_factor": 2}, "params": {"batch_size": 64}, "space": SPACE},
        {"name": "pbt", "method": "sgd", "search": "random", "num_samples": 2, "scheduler": "pbt",
         "scheduler_options": {"perturbation_interval": 2}, "params": {"batch_size": 64}, "space": SPACE},
    ],
    "budget": {"seconds": 40, "workers": 2},
    "training": {"max_epochs": 4, "epochs_per_step": 1, "checkpoint_every": 1},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_session):
    return run_study_file(tmp_path_factory.mktemp("searches"), SEARCH_STUDY)


def test_every_search_runs_with_the_right_trials_and_records(searched):
    study_dir, uri = searched
    df = pd.read_parquet(study_dir / "results.parquet")
    trials = df.groupby("arm").trial_id.nunique().to_dict()
    assert trials == {"grid": 4, "random": 3, "tpe": 3, "gp": 3, "asha": 6, "pbt": 2}
    steps = df.groupby(["arm", "trial_id"]).step.max()
    assert (steps.loc["grid"] == 4).all() and (steps.loc["tpe"] == 4).all()
    assert (steps.loc["asha"] < 4).any()  # ASHA stopped some trials early
    assert set(df[df.arm == "grid"].hp_lr) == {0.02, 0.1}
    for arm in ("tpe", "gp"):
        assert df[df.arm == arm].hp_lr.between(0.01, 0.2).all()
    arms = json.loads((study_dir / "arms.json").read_text())
    assert len(arms) == 6 and all(a["within_budget"] for a in arms.values())
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = json.loads((study_dir / "runs.json").read_text())
    for key, run_id in runs["arms"].items():
        children = client.search_runs([runs["experiment_id"]], f"tags.mlflow.parentRunId = '{run_id}'")
        assert len(children) == trials[key.split("/")[0]], key  # one nested run per Tune trial


def test_compare_writes_report_and_plot(searched):
    study_dir, uri = searched
    r = CliRunner().invoke(main, ["compare", str(study_dir), "--log-time"])
    assert r.exit_code == 0, r.output
    report = (study_dir / "report.md").read_text()
    assert "| arm | search | seeds | val_loss | IQR | test_error | t_base | reached | wall | CPU | trials |" in report
    assert "finished" in report and "- **val_loss**: final best validation loss, median over seeds" in report
    code = json.loads((study_dir / "runs.json").read_text())["code"]  # the code that ran it, named in the report
    assert [c["at"] for c in code] == ["start"] and code[0]["version"]
    assert f"Code: hypersweep {code[0]['version']}" in report and code[0]["commit"][:12] in report
    assert f"browse it: hypersweep ui {study_dir}" in r.output  # (a sqlite store: no server to link to yet)
    assert all(f"| {arm} |" in report for arm in ("grid", "random", "tpe", "gp", "asha", "pbt"))
    # narrow enough for MLflow's artifact pane: no table line over 100 characters
    assert max(len(line) for line in report.splitlines() if line.startswith("|")) <= 100, report
    assert (study_dir / "anytime.png").stat().st_size > 1000
    from mlflow.tracking import MlflowClient
    parent = json.loads((study_dir / "runs.json").read_text())["parent_run_id"]
    assert {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")} == {
        "report/report.md", "report/report.html", "report/anytime.png"}
    # The HTML version (MLflow's artifact pane previews it): the same table, and one curve per
    # arm in the SVG chart, its points with tooltips.
    page = (study_dir / "report.html").read_text()
    arms = ("grid", "random", "tpe", "gp", "asha", "pbt")
    assert page.startswith("<!doctype html>") and "<th>final best val_loss (median)</th>" in page
    assert all(f"<td>{arm}</td>" in page and f'<g class="arm" data-arm="{arm}">' in page for arm in arms)
    assert page.count("<polyline") == len(arms) and "<title>grid: " in page
    r = CliRunner().invoke(main, ["compare", str(study_dir / "results")])
    assert r.exit_code == 2 and "not a study directory" in r.output


def test_concurrent_schedule_runs_arms_side_by_side(tmp_path, ray_session):
    study = {"name": "conc", "seed": 3, "seeds": 1, "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [16]},
             "arms": [{"name": "a", "method": "sgd", "search": "random", "num_samples": 3, "params": {"batch_size": 64},
                       "space": SPACE},
                      {"name": "b", "method": "sgd", "search": "tpe", "num_samples": 3, "params": {"batch_size": 64},
                       "space": SPACE}],
             "budget": {"seconds": 30, "workers": 2, "schedule": "concurrent"},
             "training": {"max_epochs": 3, "epochs_per_step": 1}}
    _, uri = run_study_file(tmp_path, study)
    df = pd.read_parquet(tmp_path / "sd" / "results.parquet")
    assert df.groupby("arm").trial_id.nunique().to_dict() == {"a": 3, "b": 3}
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = json.loads((tmp_path / "sd" / "runs.json").read_text())["arms"]
    a, b = (client.get_run(runs[k]).info for k in ("a/seed0", "b/seed0"))
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the two arms overlapped in time
    assert a.status == b.status == "FINISHED"
    for key in ("a", "b"):  # each arm had one of the two slots: its trials never overlapped
        trials = df[df.arm == key].groupby("trial_id").arm_time_s.agg(["min", "max"]).sort_values("min")
        assert (trials["min"].iloc[1:].to_numpy() >= trials["max"].iloc[:-1].to_numpy() - 1.0).all()
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "sd"), "--no-mlflow"])
    assert "concurrently, 1 of 2 worker slots each" in r.output


def test_code_sentence_names_the_code_of_each_execution():
    from hypersweep.orchestrator.report import code_sentence
    start = {"at": "start", "version": "0.3.0", "commit": "0123456789abcdef", "dirty": "false"}
    resume = {"at": "resume", "version": "0.3.1", "commit": "", "dirty": ""}
    assert code_sentence([start]) == "Code: hypersweep 0.3.0 at commit 0123456789ab."
    assert code_sentence([{**start, "dirty": "true"}, resume]) == (
        "Code: hypersweep 0.3.0 at commit 0123456789ab with uncommitted changes; resumed with hypersweep 0.3.1.")
    assert code_sentence(None) == code_sentence([]) == code_sentence("x") == ""  # older studies: not recorded

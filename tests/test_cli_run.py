"""`hypersweep run` end to end on local Ray with a tiny budget: the records of DESIGN.md."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from click.testing import CliRunner

from hypersweep.orchestrator.cli import main
from hypersweep.orchestrator.planning import plan
from hypersweep.orchestrator.study import load_study

STUDY = {
    "name": "tiny",
    "seed": 7,
    "seeds": 2,
    "dataset": {"name": "digits"},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [
        {"name": "fixed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05, "batch_size": 64}},
        {"name": "rand", "method": "sgd", "search": "random", "num_samples": 3, "params": {"batch_size": 64},
         "space": {"lr": {"loguniform": [0.01, 0.2]}, "dropout": {"uniform": [0.0, 0.5]}}},
    ],
    "budget": {"seconds": 20, "workers": 2, "cpus_per_worker": 1},
    "training": {"max_epochs": 4, "epochs_per_step": 1, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("run")
    study_file = tmp / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(study_file), "--study-dir", str(tmp / "sd"), "--tracking-uri", uri,
                                       "--no-live", "--register", "tiny best"])
    assert result.exit_code == 0, result.output + str(result.exception)
    return tmp / "sd", uri, result.output


def test_arm_models_predict_as_the_trials_reported_and_the_best_is_registered(finished_study):
    """Every arm x seed's model is an MLflow model on its arm run: loaded with pyfunc, it
    predicts what the trial's net computes, with the test error the trial reported at its last
    step; `--register` made version 1 of the one with the lowest validation loss."""
    import mlflow
    import numpy as np
    import torch

    from hypersweep.methods.ensembles import member_outputs
    from hypersweep.orchestrator.studydir import StudyDir
    from hypersweep.orchestrator.trials import find_trials
    from hypersweep.workers.base import build_target_for, load_splits
    from hypersweep.workers.ensemble import sample_members
    study_dir, uri, output = finished_study
    models = json.loads((study_dir / "models.json").read_text())
    runs = json.loads((study_dir / "runs.json").read_text())
    assert set(models) == set(runs["arms"]) and all(m["members"] == 1 for m in models.values())
    df = pd.read_parquet(study_dir / "results.parquet")
    trials = {t.trial_id: t for t in find_trials(StudyDir(study_dir))}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for key, entry in models.items():
            assert entry["run_id"] == runs["arms"][key]
            mine = df[(df.arm == entry["arm"]) & (df.seed_index == entry["seed_index"])]
            assert entry["trial_id"] == mine.loc[mine.val_loss.idxmin()].trial_id  # the arm's best trial
            trial = trials[entry["trial_id"]]
            config = {**trial.config, "device": "cpu"}
            splits = load_splits(config)
            weights = torch.as_tensor(sample_members(config, trial.checkpoint(), 1, 0)["weights"])
            expected = member_outputs(build_target_for(config, splits), weights, splits.x_test).softmax(-1)[0]
            got = mlflow.pyfunc.load_model(entry["model_uri"]).predict(splits.x_test.numpy())
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
            error = float((got.argmax(1) != splits.y_test.numpy()).mean())
            last = mine[mine.trial_id == entry["trial_id"]].sort_values("step").iloc[-1]
            if last.step == last.step // 2 * 2:  # checkpoints every 2 steps: the last one is that report's net
                assert error == pytest.approx(last.test_error) == pytest.approx(entry["test_error"])
        best = min(models, key=lambda k: models[k]["val_loss"])
        version = MlflowClient(uri).get_model_version("tiny best", "1")
        assert version.run_id == models[best]["run_id"]
        assert f"registered {best} ({models[best]['model_uri']}) as models:/tiny best/1" in output
        assert "models: 4 arm x seed models on the arm runs" in output
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_bad_model_name_is_refused_before_anything_runs(tmp_path):
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    result = CliRunner().invoke(main, ["run", str(study_file), "--study-dir", str(tmp_path / "sd"), "--register", " "])
    assert result.exit_code == 2 and "--register ' ': a model name is" in result.output
    assert not (tmp_path / "sd").exists()


def test_summary_is_printed(finished_study):
    _, _, output = finished_study
    assert "summary" in output
    for arm in ("fixed", "rand"):
        assert output.count(f"│ {arm}") == 2  # one row per seed


def test_results_parquet_one_row_per_report(finished_study):
    study_dir, _, _ = finished_study
    df = pd.read_parquet(study_dir / "results.parquet")
    assert set(df.arm) == {"fixed", "rand"} and set(df.seed_index) == {0, 1}
    per_trial = df.groupby(["arm", "seed_index", "trial_id"]).step.agg(["count", "max"])
    assert (per_trial["count"] == per_trial["max"]).all()  # steps 1..n, none lost or doubled
    assert per_trial.loc["fixed"]["count"].tolist() == [4, 4]  # max_epochs / epochs_per_step
    assert df.groupby(["arm", "seed_index"]).trial_id.nunique().loc["rand"].tolist() == [3, 3]
    for col in ("train_loss", "val_loss", "val_error", "test_loss", "test_error", "wall_time_s", "arm_time_s", "hp_lr"):
        assert df[col].notna().all(), col
    assert df[df.arm == "rand"].hp_lr.between(0.01, 0.2).all()
    # Arms are paired: the same seed per repetition for every arm.
    assert df.groupby("seed_index").seed.nunique().eq(1).all()
    # Where every report was made; the one-trial arm had both slots' CPUs as torch threads.
    assert (df.device == "cpu").all() and df.node_id.str.fullmatch("[0-9a-f]{56}").all() and df.node_ip.notna().all()
    assert set(df[df.arm == "fixed"].torch_threads) == {2} and set(df[df.arm == "rand"].torch_threads) == {1}
    arms = json.loads((study_dir / "arms.json").read_text())
    assert arms["fixed/seed0"]["trial_resources"] == {"cpu": 2.0, "gpu": 0.0}
    assert arms["rand/seed0"]["trial_resources"] == {"cpu": 1.0, "gpu": 0.0}
    # The compute each arm used beside its wall time: per trial, CPU time never falls between
    # reports, and the arm's total is the sum of its trials' last figures, within what its
    # 2 CPUs could give in its wall time (the trials' setup falls inside the arm's time).
    assert df.groupby("trial_id").cpu_time_s.apply(lambda c: c.is_monotonic_increasing).all()
    for key, arm in arms.items():
        name, k = key.split("/seed")
        mine = df[(df.arm == name) & (df.seed_index == int(k))]
        assert arm["cpu_s"] == pytest.approx(mine.groupby("trial_id").cpu_time_s.max().sum(), abs=1e-3)
        assert 0 < arm["cpu_s"] <= 2 * arm["wall_time_used_s"] + 1.0, (key, arm)
        assert arm["gpu_s"] == 0.0
    assert "CPU time (s)" in (study_dir / "summary.md").read_text()


def test_mlflow_records(finished_study):
    from mlflow.tracking import MlflowClient
    study_dir, uri, _ = finished_study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.status != "RUNNING" for r in runs)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    import re
    assert re.fullmatch(r"tiny · \d{4}-\d\d-\d\d \d\d:\d\d UTC", parent.info.run_name), parent.info.run_name
    assert parent.data.params["tracking.uri"] == uri  # given by --tracking-uri, not the study file
    assert parent.data.params["model.hidden"] == "[16]" and "model.channels" not in parent.data.params
    assert "**fixed**: sgd, search fixed" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["hypersweep.version"] not in ("", "unknown")
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():  # run from a checkout (CI's clone): its commit
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert parent.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    df_best = pd.read_parquet(study_dir / "results.parquet").groupby(["arm", "seed_index"]).val_loss.min()
    for arm in ("fixed", "rand"):  # the experiment table ranks arms by these
        assert parent.data.metrics[f"arm/{arm}/median_best_val_loss"] == pytest.approx(df_best.loc[arm].median())
        assert f"arm/{arm}/median_test_error" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["fixed · seed 0", "fixed · seed 1", "rand · seed 0",
                                                                  "rand · seed 1"]
    df = pd.read_parquet(study_dir / "results.parquet")
    units = {u.key: u for u in plan(load_study(study_dir / "study.yaml"))}
    for child in children:
        tags = child.data.tags
        unit = units[f"{tags['arm']}/seed{tags['seed_index']}"]  # the seeds used are recorded on the arm run
        assert (child.data.params["seed"], child.data.params["search_seed"]) == (str(unit.seed), str(unit.search_seed))
        assert set(df[(df.arm == unit.arm.name) & (df.seed_index == unit.seed_index)].seed) == {unit.seed}
        assert {tags["arm"], tags["method"], tags["dataset"]} <= {"fixed", "rand", "sgd", "digits"}
        assert tags["study_id"] == study_dir.name and tags["search"] in ("fixed", "random")
        history = client.get_metric_history(child.info.run_id, "best_trial/val_loss")
        best_trial = child.data.params["best_trial_id"]
        rows = df[df.trial_id == best_trial].sort_values("step")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(rows.val_loss.tolist())
        curve = sorted(client.get_metric_history(child.info.run_id, "anytime/best_val_loss"), key=lambda m: m.step)
        anytime = [m.value for m in curve]
        assert anytime == sorted(anytime, reverse=True)  # best so far only improves
        # its step is the arm's wall time in milliseconds, beside the same time in seconds
        times = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "anytime/arm_time_s")}
        assert [times[m.step] for m in curve] == pytest.approx([m.step / 1000 for m in curve], abs=0.002)
        summary = child.data.metrics
        assert summary["summary/best_val_loss"] == pytest.approx(min(anytime)) and summary["summary/trials"] >= 1
        assert summary["summary/cpu_time_s"] > 0 and summary["summary/gpu_s"] == 0
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        arm_rows = df[(df.arm == tags["arm"]) & (df.seed_index == int(tags["seed_index"]))]
        assert len(trials) == arm_rows.trial_id.nunique()
        assert sum(len(client.get_metric_history(t.info.run_id, "val_loss")) for t in trials) == len(arm_rows)
        assert min(anytime) == pytest.approx(arm_rows.val_loss.min())
        for key in child.data.metrics:  # no two series share a (metric, step) in one run
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)), key
    assert "study.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_study_dir_contents(finished_study):
    study_dir, uri, _ = finished_study
    resolved = load_study(study_dir / "study.yaml")
    assert resolved.name == "tiny" and resolved.budget.seconds == 20 and len(resolved.arms) == 2
    run_map = json.loads((study_dir / "runs.json").read_text())
    assert run_map["tracking_uri"] == uri and set(run_map["arms"]) == {
        "fixed/seed0", "fixed/seed1", "rand/seed0", "rand/seed1"}
    assert (study_dir / "tune" / "rand-seed1").is_dir()
    assert sorted(p.name for p in (study_dir / "results").iterdir()) == sorted(
        f"{arm}__seed{k}.{ext}" for arm in ("fixed", "rand") for k in (0, 1) for ext in ("parquet", "jsonl"))
    # The journal (appended at every report) and the part (rewritten) hold the same reports.
    for arm in ("fixed", "rand"):
        part = pd.read_parquet(study_dir / "results" / f"{arm}__seed0.parquet")
        journal = pd.DataFrame([json.loads(line) for line in
                                (study_dir / "results" / f"{arm}__seed0.jsonl").read_text().splitlines()])
        assert list(zip(journal.trial_id, journal.step)) == list(zip(part.trial_id, part.step))
        assert journal.val_loss.tolist() == pytest.approx(part.val_loss.tolist())
    # Every trial run is in runs.json, under its arm x seed.
    client = MlflowClient(uri)
    for key, trials in run_map["trials"].items():
        for trial_id, run_id in trials.items():
            tags = client.get_run(run_id).data.tags
            assert tags["trial_id"] == trial_id and tags["mlflow.parentRunId"] == run_map["arms"][key]


def test_every_run_of_the_store_is_whole(finished_study):
    """Over the whole store: every run has its kind and has ended, no run holds two values of
    a metric at one step, and no trial run is empty (each trained at least one epoch)."""
    from mlflow.tracking import MlflowClient
    _, uri, _ = finished_study
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=1000)
    assert {r.data.tags.get("kind") for r in runs} == {"study", "arm", "trial"}
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key)
        if run.data.tags["kind"] == "trial":
            assert run.data.metrics["epoch"] >= 1 and run.data.tags["device"] == "cpu", run.info.run_name
            assert run.info.run_name.startswith(f"{run.data.tags['arm']} · seed {run.data.tags['seed_index']} · trial ")


@contextlib.contextmanager
def hypersweep_ui(study_dir):
    """`hypersweep ui STUDY_DIR --port 0` in its own process group: (process, its output up to
    the last link, the UI's base URL); stopped afterwards as Ctrl-C would if it is still up (so it
    stops its MLflow server, which runs in a session of its own), killed if that fails."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "hypersweep.orchestrator.cli", "ui", str(study_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        lines = []
        end = time.monotonic() + 120
        while time.monotonic() < end and not any("compare the arms, seed 1" in x for x in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        out = "".join(lines)
        yield proc, out, re.search(r"MLflow UI on (http://127\.0\.0\.1:\d+)", out).group(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # a test that failed mid-way left servers running (CI)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_ui_serves_the_store_on_loopback_with_links_that_resolve(finished_study):
    """`hypersweep ui STUDY_DIR --port 0`: an MLflow server on 127.0.0.1 over the study's
    store; the printed links name the study's experiment (model-training view, arm runs), its
    parent run, its report and a compare page per seed, all of which the server knows; Ctrl-C
    stops it."""
    import urllib.parse
    import urllib.request
    study_dir, uri, _ = finished_study
    with hypersweep_ui(study_dir) as (proc, out, base):
        runs = json.loads((study_dir / "runs.json").read_text())
        exp, parent = runs["experiment_id"], runs["parent_run_id"]
        assert f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&searchFilter=" in out
        assert f"{base}/#/experiments/{exp}/runs/{parent}?workflowType=machine_learning" in out
        assert f"{base}/#/experiments/{exp}/runs/{parent}/artifacts/report/report.html?workflowType=" in out
        for seed in (0, 1):
            link = re.search(rf"compare the arms, seed {seed}: (\S+)", out).group(1)
            ids = json.loads(urllib.parse.unquote(re.search(r"runs=([^&]+)", link).group(1)))
            assert sorted(ids) == sorted(runs["arms"][f"{a}/seed{seed}"] for a in ("fixed", "rand"))
            for run_id in ids:  # the server knows them
                with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as r:
                    assert json.load(r)["run"]["data"]["tags"]
        with urllib.request.urlopen(base, timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in rest, rest


def chromium_path() -> str | None:
    """A system Chromium (Debian's `chromium`; HYPERSWEEP_CHROMIUM names another)."""
    return os.environ.get("HYPERSWEEP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_the_study_reads_in_the_mlflow_ui_of_a_real_browser(finished_study, tmp_path):
    """What a user sees, in headless Chromium against `hypersweep ui`: the experiment in its
    model-training view lists the arm runs of both arms by readable names; a seed's compare
    page shows anytime/best_val_loss of both arms; the study run's artifact pane shows the HTML
    report (its table and one curve per arm) and the anytime plot. Screenshots: tmp_path."""
    chromium = chromium_path()
    if not chromium:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium; or set HYPERSWEEP_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from mlflow.tracking import MlflowClient
    study_dir, uri, _ = finished_study
    r = CliRunner().invoke(main, ["compare", str(study_dir)])  # the report, logged on the study run
    assert r.exit_code == 0, r.output
    runs = json.loads((study_dir / "runs.json").read_text())
    client = MlflowClient(uri)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with hypersweep_ui(study_dir) as (proc, out, base), sync_api.sync_playwright() as p:
        links = dict(re.findall(r"^\s+(.*?): (http\S+)$", out, re.M))
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            @contextlib.contextmanager
            def page_at(url, name):
                """A fresh page at `url`; a check that fails there fails with the page's text
                (and a screenshot `<name>-failed.png`)."""
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(url)
                try:
                    yield page
                except AssertionError as e:
                    page.screenshot(path=shots / f"{name}-failed.png")
                    raise AssertionError(f"{e}\n--- {url}, page text ---\n{page.inner_text('body')[:6000]}") from None

            expect = sync_api.expect
            # The UI's first render can take longer than expect's 5 s default on a loaded 2-core
            # machine (CI saw the runs table still "Loading..." at 5 s); a real failure still fails.
            expect.set_options(timeout=60_000)
            # 1. the arm runs, filtered by kind, in the model-training view (not GenAI's)
            with page_at(links["arm runs (model-training view)"], "experiment") as page:
                expect(page.get_by_placeholder(re.compile("metrics"))).to_have_value("tags.kind = 'arm'")
                expect(page.get_by_text("Model training", exact=True)).to_be_visible()
                page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # unfold the study run
                for arm in ("fixed", "rand"):
                    for seed in (0, 1):
                        expect(page.get_by_role("link", name=f"{arm} · seed {seed}", exact=True)).to_be_visible()
                page.screenshot(path=shots / "experiment.png")
            # 2. seed 0's compare page: both arm runs, with their anytime/best_val_loss
            with page_at(links["compare the arms, seed 0"], "compare") as page:
                expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
                metric = page.get_by_role("link", name="anytime/best_val_loss", exact=True)
                expect(metric).to_be_visible()
                for arm in ("fixed", "rand"):  # each run's final value, on the plot's axis (5 decimals)
                    final = client.get_run(runs["arms"][f"{arm}/seed0"]).data.metrics["anytime/best_val_loss"]
                    expect(page.locator("body")).to_contain_text(f"{final:.5f}")
                    expect(page.get_by_text(f"{arm} · seed 0", exact=True).first).to_be_visible()
                page.screenshot(path=shots / "compare-seed0.png", full_page=True)
                metric.click()  # the metric's chart: both runs' curves against step = arm milliseconds
                expect(page.get_by_text("fixed · seed 0").first).to_be_visible()
                expect(page.get_by_text("rand · seed 0").first).to_be_visible()
                page.wait_for_timeout(2000)  # (the chart draws after its data arrives)
                page.screenshot(path=shots / "compare-seed0-anytime.png")
            # 3. the study run's artifact pane: report.html (table, a curve per arm), anytime.png
            with page_at(links["its report (once `hypersweep compare` wrote it)"], "report") as page:
                report = page.frame_locator("iframe").first
                expect(report.get_by_text("Anytime: best validation loss against arm wall time")).to_be_visible()
                expect(report.locator("polyline")).to_have_count(2)
                expect(report.locator("td", has_text="rand").first).to_be_visible()
                page.screenshot(path=shots / "report.png")
                page.get_by_text("anytime.png", exact=True).click()
                image = page.locator("img[src^='blob:'], img[src*='get-artifact']").first
                expect(image).to_be_visible()
                assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) > 300
                page.screenshot(path=shots / "anytime.png")
        finally:
            browser.close()
    print(f"screenshots: {shots}")
    assert sorted(x.name for x in shots.iterdir()) == ["anytime.png", "compare-seed0-anytime.png", "compare-seed0.png",
                                                       "experiment.png", "report.png"]

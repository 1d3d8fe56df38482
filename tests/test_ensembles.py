"""Ensembles and Polyak distillation: the evaluation rules on hand-made members, the gauge's
role in averaging, and the study/CLI path that writes ensemble.parquet and MLflow records."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from hypersweep.methods import data
from hypersweep.methods.diversity import gauge_fix
from hypersweep.methods.ensembles import evaluate_ensemble, polyak_average
from hypersweep.methods.targets import MLP
from conftest import run_study_file
from hypersweep.orchestrator.cli import main
from hypersweep.orchestrator.studydir import StudyDir as StudyFolder


def _weights(net, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([net.init_weights(g) for _ in range(k)])


def test_mean_and_vote_on_identical_members_equal_one_member():
    splits = data.load("digits", seed=0)
    net = MLP(splits.input_shape, (16,), 10)
    w = _weights(net, 1)
    one = evaluate_ensemble(net, splits, w, "val")
    three = evaluate_ensemble(net, splits, w.repeat(3, 1), "val")
    assert three["member_error"] == one["member_error"] * 3
    assert three["mean_error"] == pytest.approx(one["mean_error"]) == pytest.approx(three["vote_error"])
    assert three["mean_loss"] == pytest.approx(one["mean_loss"], abs=1e-6)


def test_vote_and_mean_differ_as_defined():
    """Two members confidently wrong on an example and one right: the vote follows the two; the
    mean follows whoever is most confident."""
    splits = data.load("synthetic-classification", seed=0)
    net = MLP(splits.input_shape, (8,), splits.n_outputs)
    w = _weights(net, 5, seed=1)
    r = evaluate_ensemble(net, splits, w, "test")
    x, y = splits.split("test")
    logits = net.forward(w, x)
    votes = torch.nn.functional.one_hot(logits.argmax(-1), splits.n_outputs).sum(0)
    assert r["vote_error"] == pytest.approx(float((votes.argmax(-1) != y).float().mean()))
    mean_p = logits.softmax(-1).mean(0)
    assert r["mean_error"] == pytest.approx(float((mean_p.argmax(-1) != y).float().mean()))
    assert len(r["member_error"]) == 5


def test_regression_mixture_nll_and_rmse():
    splits = data.load("synthetic-regression", seed=0)
    net = MLP(splits.input_shape, (8,), 1)
    w = _weights(net, 4)
    r = evaluate_ensemble(net, splits, w, "val", log_noise_std=torch.zeros(4))
    x, y = splits.split("val")
    mean = net.forward(w, x).squeeze(-1).mean(0)
    assert r["mean_rmse"] == pytest.approx(float(((mean - y) ** 2).mean().sqrt()) * splits.y_std, rel=1e-5)
    same = evaluate_ensemble(net, splits, w[:1].repeat(4, 1), "val", log_noise_std=torch.zeros(4))
    single = evaluate_ensemble(net, splits, w[:1], "val", log_noise_std=torch.zeros(1))
    assert same["mean_loss"] == pytest.approx(single["mean_loss"], rel=1e-5)  # a mixture of one Gaussian


def test_gauge_fixed_average_of_equivalent_nets_is_the_same_function():
    """A net and a rescaled copy compute one function; averaging their raw weights does not,
    averaging after gauge fixing does."""
    net = MLP((6,), (5, 4), 3)
    w = _weights(net, 1, seed=3)[0]
    p = net.spec.unflatten(w[None])
    s = torch.rand(5) * 3 + 0.2  # rescale hidden layer 1, compensate in layer 2's fan-in
    q = {k: v.clone() for k, v in p.items()}
    q["layers.0.weight"] = p["layers.0.weight"] * s[None, :, None]
    q["layers.0.bias"] = p["layers.0.bias"] * s[None]
    q["layers.1.weight"] = p["layers.1.weight"] / s[None, None, :]
    q["layers.2.bias"] = p["layers.2.bias"] + 1.5  # logits shifted: the same softmax
    pair = torch.cat([w[None], net.spec.flatten(q)])
    x = torch.randn(20, 6)
    probs = net.forward(pair, x).softmax(-1)
    assert torch.allclose(probs[0], probs[1], atol=1e-5)
    raw = polyak_average(net, pair, gauge=False)
    fixed = polyak_average(net, pair, gauge=True)
    assert not torch.allclose(net.forward(raw[None], x).softmax(-1)[0], probs[0], atol=1e-3)
    assert torch.allclose(net.forward(fixed[None], x).softmax(-1)[0], probs[0], atol=1e-5)


def test_gauge_fix_keeps_regression_outputs_without_centring():
    net = MLP((4,), (6,), 1)
    w = _weights(net, 3)
    x = torch.randn(10, 4)
    fixed = gauge_fix(net, w, centre_logits=False)
    assert torch.allclose(net.forward(fixed, x), net.forward(w, x), atol=1e-5)


STUDY = {
    "name": "ens",
    "seed": 3,
    "seeds": 1,
    "dataset": {"name": "digits"},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [
        {"name": "deep", "method": "sgd", "num_samples": 3, "params": {"lr": 0.05, "batch_size": 64},
         "ensemble": {"members": 3}},
        {"name": "hml", "method": "hyper-ml", "params": {"batch_size": 64, "hyper_hidden": [16], "lr": 0.003},
         "ensemble": {"members": 6, "distill": "polyak"}},
    ],
    "budget": {"seconds": 30, "workers": 2, "cpus_per_worker": 1},
    "training": {"max_epochs": 3, "epochs_per_step": 1, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def ensembled_study(tmp_path_factory, ray_session):
    return run_study_file(tmp_path_factory.mktemp("ens"), STUDY)


def test_arm_ensembles_are_written_and_recorded(ensembled_study):
    study_dir, uri = ensembled_study
    deep = pd.read_parquet(study_dir / "ensembles" / "deep-seed0" / "ensemble.parquet")
    assert len(deep) == 3 and deep.trial_id.nunique() == 3  # the three replicas, one member each
    weights = np.stack(deep.weights.to_numpy())
    assert weights.dtype == np.float32 and weights.shape[1] == 64 * 16 + 16 + 16 * 10 + 10
    assert not np.allclose(weights[0], weights[1])  # replicas start from different seeds
    hml = pd.read_parquet(study_dir / "ensembles" / "hml-seed0" / "ensemble.parquet")
    assert len(hml) == 6 and hml.trial_id.nunique() == 1 and hml.sample_index.tolist() == list(range(6))
    for col in ("source_run", "seed", "val_error", "test_error", "config"):
        assert hml[col].notna().all(), col
    assert json.loads(hml.config[0])["method"] == "hyper-ml"
    distilled = json.loads((study_dir / "ensembles" / "hml-seed0" / "distill.json").read_text())
    assert set(distilled) == {"raw", "gauge"}
    saved = torch.load(study_dir / "ensembles" / "hml-seed0" / "distilled-raw.pt", weights_only=True)
    assert saved["weights"].shape == (weights.shape[1],) and saved["names"][0] == "layers.0.weight"

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = json.loads((study_dir / "runs.json").read_text())["arms"]
    for key in ("deep/seed0", "hml/seed0"):
        run = client.get_run(runs[key])
        m = run.data.metrics
        for name in ("ensemble.test.mean_error", "ensemble.test.vote_error", "ensemble.test.member_error_mean",
                     "distill.raw.test.error", "distill.gauge.test.error"):
            assert name in m, (key, name)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ensemble")}
        assert {"ensemble/members.png", "ensemble/ensemble.parquet", "ensemble/distilled-raw.pt"} <= artifacts
        assert run.info.status == "FINISHED"


def test_ensemble_and_distill_commands(ensembled_study, tmp_path):
    study_dir, _ = ensembled_study
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["ensemble", str(study_dir), "-k", "4", "--arm", "hml", "--out", str(out),
                                  "--no-mlflow", "--no-distill", "--sample-seed", "5"])
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(out / "hml-seed0" / "ensemble.parquet")
    assert len(table) == 4 and set(table.sample_seed) == {5}
    assert not (out / "hml-seed0" / "distill.json").exists()
    r = CliRunner().invoke(main, ["distill", str(out / "hml-seed0"), "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert (out / "hml-seed0" / "distilled-gauge.pt").is_file() and "polyak" in r.output


def _hypersweep_prediction(config, weights):
    """hypersweep's own evaluation path: the members' outputs on the test split, averaged as
    evaluate_ensemble averages them (class probabilities)."""
    from hypersweep.methods.ensembles import member_outputs
    from hypersweep.workers.base import build_target_for, load_splits
    splits = load_splits(config)
    out = member_outputs(build_target_for(config, splits), torch.as_tensor(weights), splits.x_test)
    return splits, out.softmax(-1).mean(0).numpy()


def test_models_load_with_pyfunc_and_predict_as_hypersweep_evaluates(ensembled_study):
    """The generative arm's model (the mean of eval_samples weight samples of its best trial)
    and its distilled averages are MLflow models on the arm run whose pyfunc predictions are
    hypersweep's, and whose recorded errors are those of the study's own evaluation."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from hypersweep.orchestrator.trials import find_trials, groups
    from hypersweep.workers.ensemble import sample_members
    study_dir, uri = ensembled_study
    models = json.loads((study_dir / "models.json").read_text())
    runs = json.loads((study_dir / "runs.json").read_text())["arms"]
    assert set(models) == {"deep/seed0", "hml/seed0"}
    hml = models["hml/seed0"]
    trials = groups(find_trials(StudyFolder(study_dir)))[("hml", 0)]
    config = {**trials[0].config, "device": "cpu"}
    assert hml["run_id"] == runs["hml/seed0"] and hml["members"] == 16  # hyper-ml's eval_samples
    drawn = sample_members(config, trials[0].checkpoint(), hml["members"], 0)
    splits, expected = _hypersweep_prediction(config, drawn["weights"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(hml["model_uri"])
        same = mlflow.pyfunc.load_model(f"runs:/{hml['run_id']}/model")  # the arm run names it too
        x = splits.x_test.numpy()
        got = model.predict(x)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(same.predict(x[:7]), expected[:7], atol=1e-5)
        assert float((got.argmax(1) != splits.y_test.numpy()).mean()) == pytest.approx(hml["test_error"])
        shape = model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]
        assert list(shape) == [-1, *splits.x_test.shape[1:]]  # the data set's input shape (digits: 1 x 8 x 8)
        assert model.metadata.saved_input_example_info is not None
        # the distilled averages, one net each, as the ensemble folder's distill.json scores them
        distilled = json.loads((study_dir / "ensembles" / "hml-seed0" / "models.json").read_text())
        scores = json.loads((study_dir / "ensembles" / "hml-seed0" / "distill.json").read_text())
        assert set(distilled) == {"raw", "gauge"}
        for kind, entry in distilled.items():
            saved = torch.load(study_dir / "ensembles" / "hml-seed0" / f"distilled-{kind}.pt", weights_only=True)
            _, expected = _hypersweep_prediction(config, saved["weights"][None])
            got = mlflow.pyfunc.load_model(entry["model_uri"]).predict(x)
            np.testing.assert_allclose(got, expected, atol=1e-5)
            assert entry["test_error"] == pytest.approx(scores[kind]["test"]["mean_error"])
        logged = {m.name for m in MlflowClient(uri).search_logged_models(
            experiment_ids=[MlflowClient(uri).get_run(runs["hml/seed0"]).info.experiment_id])
                  if m.source_run_id == runs["hml/seed0"]}
        assert logged == {"model", "distilled-raw", "distilled-gauge"}
    finally:
        mlflow.set_tracking_uri(previous)


def test_distill_registers_the_better_average(ensembled_study, tmp_path):
    from mlflow.tracking import MlflowClient
    study_dir, uri = ensembled_study
    r = CliRunner().invoke(main, ["distill", str(study_dir / "ensembles" / "hml-seed0"), "--out", str(tmp_path / "d"),
                                  "--tracking-uri", uri, "--register", "hml distilled"])
    assert r.exit_code == 0, r.output
    entries = json.loads((tmp_path / "d" / "models.json").read_text())
    best = min(entries, key=lambda k: entries[k]["val_loss"])
    assert f"registered distilled-{best} ({entries[best]['model_uri']}) as models:/hml distilled/1" in r.output
    version = MlflowClient(uri).get_model_version("hml distilled", "1")
    assert version.run_id == entries[best]["run_id"]
    r = CliRunner().invoke(main, ["distill", str(study_dir / "ensembles" / "hml-seed0"), "--out", str(tmp_path / "e"),
                                  "--register", "no/slash"])
    assert r.exit_code == 2 and "--register 'no/slash': a model name is" in r.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,message", [
    (["-k", "4", "--arm", "deep"], "4 members need 4 independent trials of the non-generative method 'sgd', found 3"),
    (["-k", "4", "--arm", "nope"], "--arm 'nope' not in this study; arms: deep, hml"),
    (["-k", "4", "--seed-index", "7"], "--seed-index 7 not in this study"),
    (["-k", "0", "--arm", "hml"], "--members must be at least 1"),
])
def test_ensemble_bad_input_exits_2_and_writes_nothing(ensembled_study, tmp_path, args, message):
    study_dir, _ = ensembled_study
    r = CliRunner().invoke(main, ["ensemble", str(study_dir), "--out", str(tmp_path / "x"), "--no-mlflow", *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_ensemble_refuses_to_overwrite_and_bad_paths(ensembled_study, tmp_path):
    study_dir, _ = ensembled_study
    before = (study_dir / "ensembles" / "hml-seed0" / "ensemble.parquet").read_bytes()
    r = CliRunner().invoke(main, ["ensemble", str(study_dir), "-k", "2", "--arm", "hml"])
    assert r.exit_code == 2 and "already holds an ensemble" in r.output
    assert (study_dir / "ensembles" / "hml-seed0" / "ensemble.parquet").read_bytes() == before
    r = CliRunner().invoke(main, ["ensemble", str(tmp_path), "-k", "2"])
    assert r.exit_code == 2 and "neither a study directory" in r.output
    (tmp_path / "junk.parquet").write_text("not parquet")
    r = CliRunner().invoke(main, ["distill", str(tmp_path / "junk.parquet")])
    assert r.exit_code == 2 and "not an ensemble table" in r.output


def test_ensembles_report(ensembled_study, tmp_path):
    study_dir, _ = ensembled_study
    r = CliRunner().invoke(main, ["ensembles-report", str(study_dir)])
    assert r.exit_code == 0, r.output
    lines = (study_dir / "ensembles.md").read_text().splitlines()
    assert lines[0].startswith("| arm | seeds | members | single member test error (%)")
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    assert set(rows) == {"deep", "hml"} and "| 1 | 3 |" in rows["deep"] and "| 1 | 6 |" in rows["hml"]
    # hyper-ml's ensemble is said not to be one (the paper's collapse); the deep ensemble gets no note
    notes = [line for line in lines if line.startswith("- **")]
    assert len(notes) == 1 and notes[0].startswith("- **hml** (hyper-ml)") and "not an ensemble method" in notes[0]
    r = CliRunner().invoke(main, ["ensembles-report", str(tmp_path)])
    assert r.exit_code == 2 and "no ensembles" in r.output


def test_an_arm_cut_by_the_budget_still_gets_its_ensemble(tmp_path, ray_session):
    """The trial's last report before the deadline asks Tune for a checkpoint, so members can be
    drawn from the state the budget ended on (an arm stopped by the budget gets no end checkpoint
    from Tune otherwise)."""
    study = {"name": "cut", "seed": 1, "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [16]},
             "arms": [{"name": "hml", "method": "hyper-ml", "params": {"batch_size": 64, "hyper_hidden": [8]},
                       "ensemble": {"members": 3}}],
             "budget": {"seconds": 10, "workers": 1},
             "training": {"max_epochs": 100000, "epochs_per_step": 1, "checkpoint_every": 100000}}
    study_dir, _ = run_study_file(tmp_path, study)
    assert len(pd.read_parquet(study_dir / "ensembles" / "hml-seed0" / "ensemble.parquet")) == 3
    assert json.loads((study_dir / "arms.json").read_text())["hml/seed0"]["within_budget"]

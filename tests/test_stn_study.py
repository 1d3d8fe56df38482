"""An STN arm and an sgd arm replaying its schedule, through `hypersweep run`; replay errors."""
import copy
import json

import pandas as pd
import pytest

from conftest import run_study_file
from hypersweep.orchestrator.planning import replay_schedule
from hypersweep.orchestrator.study import StudyError, parse_study

STUDY = {
    "name": "stn-tiny",
    "seed": 5,
    "seeds": 1,
    "dataset": {"name": "digits"},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [
        {"name": "stn", "method": "stn", "params": {"batch_size": 64, "warmup_epochs": 1, "hyper_lr": 0.05}},
        {"name": "replayed", "method": "sgd", "search": {"replay": "stn"}, "params": {"batch_size": 64}},
        {"name": "final", "method": "sgd", "search": {"final": "stn"}, "params": {"batch_size": 64}},
    ],
    "budget": {"seconds": 30, "workers": 1},
    "training": {"max_epochs": 4, "epochs_per_step": 1, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def stn_study(tmp_path_factory, ray_session):
    return run_study_file(tmp_path_factory.mktemp("stn"), STUDY)


def test_schedules_are_recorded_and_replayed(stn_study):
    study_dir, uri = stn_study
    df = pd.read_parquet(study_dir / "results.parquet")
    stn = df[df.arm == "stn"].sort_values("epoch")
    replayed = df[df.arm == "replayed"].sort_values("epoch")
    names = ["dropout_in", "dropout_1", "input_noise"]
    for name in names:
        assert stn[f"hp/{name}"].notna().all() and stn[f"perturb_scale/{name}"].notna().all()
    assert stn["hp/dropout_in"].iloc[-1] != stn["hp/dropout_in"].iloc[0]  # lambda moved after the warm-up
    # The replay arm used, in epoch k + 1, the value the STN had after epoch k.
    for name in names:
        assert replayed[f"hp/{name}"].iloc[0] == pytest.approx(0.05)  # the STN's start value in epoch 1
        assert replayed[f"hp/{name}"].iloc[1:].tolist() == pytest.approx(stn[f"hp/{name}"].iloc[:-1].tolist())
    # The final arm held the STN's last values from its first epoch to its last (Table 1's "final").
    final = df[df.arm == "final"].sort_values("epoch")
    assert len(final) == len(stn)
    for name in names:
        assert final[f"hp/{name}"].tolist() == pytest.approx([stn[f"hp/{name}"].iloc[-1]] * len(final))

    # every arm's model was logged, the STN's as its net at the values it ended with (STN.plain_weights)
    models = json.loads((study_dir / "models.json").read_text())
    assert set(models) == {"stn/seed0", "replayed/seed0", "final/seed0"}
    assert models["stn/seed0"]["test_error"] == pytest.approx(stn.test_error.iloc[-1], abs=0.006)  # <= 2 images

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = json.loads((study_dir / "runs.json").read_text())["arms"]
    for key in ("stn/seed0", "replayed/seed0"):
        assert {a.path for a in client.list_artifacts(runs[key], "plots")} == \
            {f"plots/schedule-{key.split('/')[0]}-seed0.png"}
    history = client.get_metric_history(runs["stn/seed0"], "hp/dropout_in")
    assert len(history) == 4  # the schedule under its own name on the arm run, beside best_trial/...
    assert len(client.get_metric_history(runs["stn/seed0"], "perturb_scale/dropout_in")) == 4
    assert len(client.get_metric_history(runs["stn/seed0"], "best_trial/val_loss")) == 4


def test_replay_schedule_starts_every_data_hyperparameter_at_the_stns_start():
    rows = pd.DataFrame({"trial_id": ["a"], "epoch": [1], "val_loss": [0.5], "hp/brightness": [0.2],
                         "hp/cutout_length": [5.3], "hp/cutout_holes": [1.7], "hp/dropout_1": [0.1]})
    schedule = replay_schedule(rows, {"init_jitter": 0.1, "init_cutout_length": 6.0})
    assert schedule[0] == [0, {"brightness": 0.1, "cutout_length": 6.0, "cutout_holes": 1.0, "dropout_1": 0.05}]
    assert schedule[1] == [1, {"brightness": 0.2, "cutout_length": 5.3, "cutout_holes": 1.7, "dropout_1": 0.1}]


def test_replay_schedule_from_rows():
    rows = pd.DataFrame({"trial_id": ["a", "a", "b"], "epoch": [2, 4, 2], "val_loss": [0.5, 0.4, 0.9],
                         "hp/dropout_in": [0.1, 0.2, 0.7], "hp/input_noise": [0.3, 0.4, 0.9]})
    schedule = replay_schedule(rows, {"init_dropout": 0.02})
    assert schedule == [[0, {"dropout_in": 0.02, "input_noise": 0.05}], [2, {"dropout_in": 0.1, "input_noise": 0.3}],
                        [4, {"dropout_in": 0.2, "input_noise": 0.4}]]
    rows.loc[1, "hp/input_noise"] = float("nan")  # the STN diverged after epoch 2: replay stops there
    assert replay_schedule(rows, {})[-1] == [2, {"dropout_in": 0.1, "input_noise": 0.3}]


@pytest.mark.parametrize("change,message", [
    (lambda arms: arms[1].update(search={"replay": "nope"}), "arms[1].search.replay: 'nope' is not an stn arm"),
    (lambda arms: arms.reverse(), "arms[0].search.replay: 'stn' is not an stn arm listed before this one"),
    (lambda arms: arms[1].update(method="hyper-ml"), "arms[1].method: a replayed schedule trains 'sgd'"),
    (lambda arms: arms[2].update(search={"final": "replayed"}), "arms[2].search.replay: 'replayed' is not an stn arm"),
    (lambda arms: arms[2].update(search={"final": "stn", "replay": "stn"}), "search as a mapping takes one key"),
    (lambda arms: arms[1].update(search={"replay": "stn", "x": 1}), "search as a mapping takes one key"),
    (lambda arms: arms[0]["params"].update(variant="stn2"), "arms[0].params.variant: 'stn2' is not one of stn, delta-stn"),
    (lambda arms: arms[0]["params"].update(tune="dropout,colour"), "'colour' is not one of dropout, input_noise"),
    (lambda arms: arms[1].update(space={"lr": {"uniform": [0.01, 0.1]}}), "arms[1].space: search 'replay' takes no space"),
    (lambda arms: arms[1].update(num_samples=2), "arms[1].num_samples: search 'replay' runs one trial per seed"),
    (lambda arms: arms[1].update(replay="stn", search="fixed"), "arms[1].replay: only with search: replay"),
])
def test_replay_and_stn_errors(change, message):
    raw = copy.deepcopy(STUDY)
    change(raw["arms"])
    with pytest.raises(StudyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_study(raw, "s.yaml")


def test_replay_needs_the_sequential_schedule():
    raw = copy.deepcopy(STUDY)
    raw["budget"] = {"seconds": 30, "workers": 3, "schedule": "concurrent"}
    with pytest.raises(StudyError, match=r"budget\.schedule: a replay arm needs its STN arm's schedule first"):
        parse_study(raw, "s.yaml")

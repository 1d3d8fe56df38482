"""Study files: every problem is one line naming the file and key, exit 2, nothing created."""
import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hypersweep.orchestrator.cli import main
from hypersweep.orchestrator.searches import SEARCHES
from hypersweep.orchestrator.study import StudyError, load_study, parse_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = {
    "name": "t",
    "dataset": {"name": "digits"},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [{"name": "a", "method": "sgd", "search": "random", "num_samples": 2,
              "space": {"lr": {"loguniform": [1e-3, 0.1]}}}],
    "budget": {"seconds": 5},
}


def _set(path, value):
    def apply(raw):
        node = raw
        *parents, leaf = path
        for key in parents:
            node = node[key]
        node[leaf] = value
    return apply


BAD = [
    ("unknown top-level key", _set(["bogus"], 1), "bogus: unknown key"),
    ("unknown nested key", _set(["budget", "minutes"], 3), "budget.minutes: unknown key"),
    ("wrong type", _set(["budget", "seconds"], "ten"), "budget.seconds: Input should be a valid number"),
    ("budget zero", _set(["budget", "seconds"], 0), "budget.seconds: Input should be greater than 0"),
    ("budget negative", _set(["budget", "seconds"], -5), "budget.seconds"),
    ("unknown method", _set(["arms", 0, "method"], "nope"), "arms[0].method: unknown method 'nope'; valid: hyper-diverse, hyper-hpo, hyper-ml, hyper-posterior, sgd, stn"),
    ("unknown search", _set(["arms", 0, "search"], "bohb"),
     f"arms[0].search: unknown search 'bohb'; valid: {', '.join(SEARCHES)}"),
    ("unknown dataset", _set(["dataset", "name"], "imagenet"), "dataset.name: unknown dataset 'imagenet'"),
    ("unknown hyperparameter", _set(["arms", 0, "space", "momentum2"], {"uniform": [0, 1]}),
     "arms[0].space.momentum2: unknown hyperparameter"),
    ("bad domain", _set(["arms", 0, "space", "lr"], {"normal": [0, 1]}), "arms[0].space.lr: expected one of"),
    ("out of range", _set(["arms", 0, "space", "lr"], {"uniform": [0.1, 20]}), "arms[0].space.lr: 20 is outside"),
    ("missing key", lambda raw: raw.pop("budget"), "budget: required key is missing"),
    ("fixed with space", _set(["arms", 0, "search"], "fixed"), "arms[0].space: search 'fixed' takes no space"),
    ("bad model kind", _set(["model", "kind"], "transformer"), "model.kind"),
    ("resnet depth", lambda raw: raw["model"].update(kind="resnet", depth=20), "model.depth: a resnet's depth is 6n + 4"),
    ("ensemble too big", _set(["arms", 0, "ensemble"], {"members": 5}),
     "arms[0].ensemble.members: 'sgd' is not generative: an ensemble of 5 takes the best of its trials, and num_samples is 2"),
    ("ensemble of one", _set(["arms", 0, "ensemble"], {"members": 1}), "arms[0].ensemble.members: Input should be greater than or equal to 2"),
    ("distill kind", _set(["arms", 0, "ensemble"], {"members": 2, "distill": "kd"}), "arms[0].ensemble.distill"),
    ("concurrent needs slots", lambda raw: raw["budget"].update(schedule="concurrent", workers=1) or
     raw["arms"].append(dict(raw["arms"][0], name="b")), "budget.workers: schedule 'concurrent' splits the worker slots"),
    ("unknown schedule", _set(["budget", "schedule"], "parallel"), "budget.schedule"),
    ("unknown scheduler", _set(["arms", 0, "scheduler"], "hyperband"),
     "arms[0].scheduler: unknown scheduler 'hyperband'; valid: none, asha, pbt"),
    ("scheduler option", lambda raw: raw["arms"][0].update(scheduler="asha", scheduler_options={"eta": 3}),
     "arms[0].scheduler_options.eta: not an option of scheduler 'asha'"),
    ("pbt with tpe", lambda raw: raw["arms"][0].update(scheduler="pbt", search="tpe"),
     "arms[0].scheduler: scheduler 'pbt' mutates the trials of a non-learning search; it works with search grid, random, not 'tpe'"),
    ("asha with fixed", lambda raw: raw["arms"][0].update(scheduler="asha", search="fixed", space={}),
     "arms[0].scheduler: scheduler 'asha' stops the worse of several trials; it works with search "
     f"{', '.join(name for name, search in SEARCHES.items() if search.black_box)}, not 'fixed'"),
    ("asha reduction factor", lambda raw: raw["arms"][0].update(scheduler="asha", scheduler_options={"reduction_factor": 1}),
     "arms[0].scheduler_options.reduction_factor: expected a number > 1, got 1.0"),
    ("asha grace period", lambda raw: raw["arms"][0].update(scheduler="asha", scheduler_options={"grace_period": 0}),
     "arms[0].scheduler_options.grace_period: expected a whole number >= 1, got 0.0"),
    ("asha grace period nan", lambda raw: raw["arms"][0].update(scheduler="asha", scheduler_options={"grace_period": float("nan")}),
     "arms[0].scheduler_options.grace_period: Input should be a finite number, got nan"),
    ("asha grace period fraction", lambda raw: raw["arms"][0].update(scheduler="asha", scheduler_options={"grace_period": 1.5}),
     "arms[0].scheduler_options.grace_period: expected a whole number >= 1, got 1.5"),
    ("pbt quantile zero", lambda raw: raw["arms"][0].update(scheduler="pbt", scheduler_options={"quantile_fraction": 0}),
     "arms[0].scheduler_options.quantile_fraction: expected a number in (0, 0.5], got 0.0"),
    ("pbt quantile above half", lambda raw: raw["arms"][0].update(scheduler="pbt", scheduler_options={"quantile_fraction": 0.6}),
     "arms[0].scheduler_options.quantile_fraction: expected a number in (0, 0.5], got 0.6"),
    ("pbt interval", lambda raw: raw["arms"][0].update(scheduler="pbt", scheduler_options={"perturbation_interval": 0}),
     "arms[0].scheduler_options.perturbation_interval: expected a whole number >= 1, got 0.0"),
    ("uniform on an integer", _set(["arms", 0, "space", "batch_size"], {"uniform": [16, 128]}),
     "arms[0].space.batch_size: uniform draws real numbers and 'batch_size' is an integer; use int: [low, high]"),
    ("loguniform on an integer", _set(["arms", 0, "space", "batch_size"], {"loguniform": [16, 128]}),
     "arms[0].space.batch_size: loguniform draws real numbers and 'batch_size' is an integer"),
    ("grid form in random", _set(["arms", 0, "space", "lr"], {"grid": [0.01, 0.1]}),
     "arms[0].space.lr: search 'random' samples its space (uniform, loguniform, int, choice), got 'grid'; "
     "grid values belong to search: grid (use choice)"),
    ("uniform in grid", lambda raw: raw["arms"][0].update(search="grid"),
     "arms[0].space.lr: search 'grid' crosses listed values (grid, choice), got 'loguniform'"),
    ("grid values in tpe", lambda raw: raw["arms"][0].update(search="tpe", space={"lr": {"grid": [0.1, 0.2]}}),
     "search 'tpe' samples its space"),
]


@pytest.mark.parametrize("label,mutate,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_study_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, label, mutate, expected):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    study_file = tmp_path / "bad.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    for args in (["validate", str(study_file)], ["run", str(study_file), "--study-dir", str(tmp_path / "sd")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(study_file) in lines[0] and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no study dir, no mlflow.db


def test_budget_override_must_be_positive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(CONFIGS / "quickstart.yaml"), "--budget-s", "0"])
    assert result.exit_code == 2
    assert "budget.seconds" in result.stderr and "greater than 0" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_data_files_name_the_place(tmp_path, monkeypatch):
    raw = copy.deepcopy(BASE)
    raw["dataset"] = {"name": "mnist", "root": str(tmp_path / "data")}
    study_file = tmp_path / "mnist.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(study_file)])
    assert result.exit_code == 2
    assert "MNIST/raw" in result.stderr and "hypersweep download mnist" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.yaml"]


def test_existing_study_dir_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "keep.txt").write_text("recorded")
    result = CliRunner().invoke(main, ["run", str(CONFIGS / "quickstart.yaml"), "--study-dir", "sd"])
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (tmp_path / "sd" / "keep.txt").read_text() == "recorded"


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(StudyError, match="cannot read"):
        load_study(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(StudyError, match="not valid YAML at line"):
        load_study(tmp_path / "broken.yaml")


def test_scientific_notation_is_a_float(tmp_path):
    raw = copy.deepcopy(BASE)
    text = yaml.safe_dump(raw).replace("0.001", "1e-3")
    assert "1e-3" in text
    (tmp_path / "s.yaml").write_text(text)
    study = load_study(tmp_path / "s.yaml")
    assert study.arms[0].space["lr"]["loguniform"] == [1e-3, 0.1]


def test_study_objects_are_frozen():
    study = parse_study(copy.deepcopy(BASE))
    with pytest.raises(Exception):
        study.budget.seconds = 10


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every shipped study is valid; one on a file-based data set says, as `run` would, that it
    needs a data root (unless the files are where it points)."""
    from hypersweep.methods.data import DataNotFoundError, check_available
    from hypersweep.orchestrator.study import load_study
    study = load_study(path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    try:
        check_available(study.dataset.name, study.dataset.root)
    except DataNotFoundError as e:
        assert result.exit_code == 2 and result.stderr.strip() == f"hypersweep: error: {path}: dataset: {e}"
        return
    assert result.exit_code == 0, result.output
    assert ": ok: study" in result.output


def test_set_overrides_any_key_and_reports_bad_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = CONFIGS / "quickstart.yaml"
    r = CliRunner().invoke(main, ["run", str(quick), "--set", "budget.cpus_per_worker=64", "--study-dir", "sd"])
    assert r.exit_code == 2 and "budget.cpus_per_worker: 64" in r.output and not (tmp_path / "sd").exists()
    r = CliRunner().invoke(main, ["run", str(quick), "--set", "budget.cpu=2", "--study-dir", "sd"])
    assert r.exit_code == 2 and "budget.cpu: unknown key" in r.output
    r = CliRunner().invoke(main, ["run", str(quick), "--set", "arms.0.method=x"])
    assert r.exit_code == 2 and "outside arms" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_recorded_study_pins_every_default_so_an_upgrade_cannot_change_what_it_resumes(monkeypatch):
    """study.yaml holds each arm's unsearched hyperparameters with the defaults written out
    (Study.pinned): a later hypersweep that changes a default resumes the recorded value, and
    the trial config Tune keeps carries it too."""
    from hypersweep.methods import hyper_diverse
    from hypersweep.orchestrator.planning import plan, trial_config
    raw = copy.deepcopy(BASE)
    raw["arms"].append({"name": "hd", "method": "hyper-diverse", "params": {"lambda_": 100.0}})
    pinned = parse_study(raw).pinned()
    searched, diverse = pinned.arms
    assert "lr" not in searched.params and searched.params["momentum"] == 0.9  # searched stays searched
    assert "dropout_1" not in searched.params  # None: follows `dropout`, nothing to pin
    assert diverse.params["lambda_"] == 100.0 and diverse.params["batch_norm"] == 1
    assert diverse.params["extractor_hidden"] == [300, 300]
    recorded = pinned.to_yaml()

    declared = hyper_diverse.hyperparameters
    def changed(n):  # a later version's defaults: no batch norm, a smaller extractor
        hps = declared(n)
        hps["batch_norm"] = hps["batch_norm"].__class__(**{**hps["batch_norm"].__dict__, "default": 0})
        hps["extractor_hidden"] = hps["extractor_hidden"].__class__(
            **{**hps["extractor_hidden"].__dict__, "default": [50]})
        return hps
    monkeypatch.setattr(hyper_diverse, "hyperparameters", changed)
    assert parse_study(BASE | {"arms": raw["arms"][1:]}).pinned().arms[0].params["batch_norm"] == 0  # new studies: new
    resumed = parse_study(yaml.safe_load(recorded))
    assert resumed.pinned() == resumed  # nothing left to pin
    unit = [u for u in plan(resumed) if u.arm.name == "hd"][0]
    hp = trial_config(resumed, unit)["hp"]
    assert hp["batch_norm"] == 1 and hp["extractor_hidden"] == [300, 300] and hp["lambda_"] == 100.0

"""The contract of every registered search and scheduler (orchestrator/searches.py): proposals
inside the space, seeded draws, and trials through Tune whose reports match their configs.

The searches are parametrised from the registry itself, with a space built from the forms each
one accepts, so a new entry in SEARCHES is put through the whole contract without more code.
"""
import json
import math
import random
import sys
import tempfile
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hypersweep.orchestrator.planning import ArmSeed, num_samples, scheduler, searcher, trial_config
from hypersweep.orchestrator.searches import SCHEDULERS, SEARCHES
from hypersweep.orchestrator.study import ArmConfig, parse_study

# One sgd hyperparameter per space form: a search's example space has one entry per form it takes.
FORM_EXAMPLES = {"uniform": ("dropout", [0.0, 0.5]), "loguniform": ("lr", [1e-3, 0.1]), "int": ("batch_size", [16, 64]),
                 "choice": ("momentum", [0.0, 0.9]), "grid": ("weight_decay", [0.0, 1e-4])}
PARAMS = {"lr": 0.05, "batch_size": 64}  # fixed values, where the space does not search them
STUDY = parse_study({"name": "contract", "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [16]},
                     "arms": [{"name": "a", "method": "sgd"}], "budget": {"seconds": 5}})
SEED = 12345
PROPOSALS = 12  # past Optuna's 10 random start-up trials, so TPE and GP propose from their models too


def _arm(name: str, n: int, space: dict | None = None) -> ArmConfig:
    search = SEARCHES[name]
    if space is None:
        space = {FORM_EXAMPLES[f][0]: {f: FORM_EXAMPLES[f][1]} for f in search.forms}
    return ArmConfig(name="contract", method="sgd", search=name, space=space,
                     params={k: v for k, v in PARAMS.items() if k not in space}, num_samples=1 if search.one_trial else n)


def _objective(hp: dict, replica: int = 0) -> float:
    """What the toy trainable reports: a function of every hyperparameter a config can have."""
    return ((math.log10(hp["lr"]) + 2) ** 2 + hp.get("dropout", 0.0) + hp["batch_size"] / 100
            + hp.get("momentum", 0.0) + 1e3 * hp.get("weight_decay", 0.0) + replica)


def _key(config: dict) -> tuple:
    return tuple(sorted(config["hp"].items())) + (config.get("replica", 0),)


def _inside(config: dict, arm: ArmConfig) -> None:
    hp = config["hp"]
    assert set(hp) == set(arm.space) | set(arm.params)
    for key, value in arm.params.items():
        assert hp[key] == value
    for key, domain in arm.space.items():
        (form, values), = domain.items()
        if form in ("uniform", "loguniform"):
            assert values[0] <= hp[key] <= values[1], (key, hp[key])
        elif form == "int":
            assert isinstance(hp[key], (int, np.integer)) and values[0] <= hp[key] <= values[1], (key, hp[key])
        else:
            assert hp[key] in values, (key, hp[key])


def _expected_trials(param_space, samples: int) -> int:
    """Tune's count: num_samples times every grid_search crossed."""
    if isinstance(param_space, dict):
        if set(param_space) == {"grid_search"}:
            return len(param_space["grid_search"]) * samples
        return math.prod(_expected_trials(v, 1) for v in param_space.values()) * samples
    return samples


def _propose(name: str, seed: int, n: int, tmp_path: Path) -> list[dict]:
    """The configs the arm's searcher proposes, without running trials: a Tune Searcher is
    asked n times (and told each result), the variant generator enumerates its trials."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import Searcher
    unit = ArmSeed(_arm(name, n), 0, 7, seed, ensemble_seed=11)
    param_space = trial_config(STUDY, unit)
    alg = searcher(unit)
    if isinstance(alg, Searcher):
        assert alg.set_search_properties("val_loss", "min", param_space)
        out = []
        for i in range(n):
            config = alg.suggest(f"t{i}")
            alg.on_trial_complete(f"t{i}", {"val_loss": _objective(config["hp"])})
            out.append(config)
        return out
    alg.add_configurations([Experiment("contract", _trainable, config=param_space, num_samples=num_samples(unit),
                                       storage_path=str(tmp_path))])
    return [trial.config for trial in iter(alg.next_trial, None)]


def _samples(name: str) -> bool:
    return bool(SEARCHES[name].forms) and not SEARCHES[name].crosses


@pytest.mark.parametrize("name", SEARCHES)
def test_proposals_are_inside_the_space(name, tmp_path):
    arm = _arm(name, PROPOSALS)
    configs = _propose(name, SEED, PROPOSALS, tmp_path)
    unit = ArmSeed(arm, 0, 7, SEED, ensemble_seed=11)
    assert len(configs) == (PROPOSALS if SEARCHES[name].learns else
                            _expected_trials(trial_config(STUDY, unit), num_samples(unit)))
    for config in configs:
        _inside(config, arm)
    if _samples(name):
        assert len({_key(c) for c in configs}) == len(configs)  # real draws, not one point again


@pytest.mark.parametrize("name", SEARCHES)
def test_proposals_are_seeded(name, tmp_path):
    first = _propose(name, SEED, 4, tmp_path / "a")
    assert [_key(c) for c in _propose(name, SEED, 4, tmp_path / "b")] == [_key(c) for c in first]
    other = [_key(c) for c in _propose(name, SEED + 1, 4, tmp_path / "c")]
    arm = _arm(name, 4)
    if _samples(name):
        assert other != [_key(c) for c in first]
    elif SEARCHES[name].crosses:  # every combination of the listed values, whatever the seed
        listed = {k: next(iter(d.values())) for k, d in arm.space.items()}
        grid = [tuple(sorted({**arm.params, **dict(zip(listed, combo))}.items())) + (0,)
                for combo in product(*listed.values())]
        assert sorted(other) == sorted(grid * arm.num_samples)
    else:  # no space: the fixed values, once per replica
        replicas = range(arm.num_samples) if SEARCHES[name].replicas else [0]
        assert other == [tuple(sorted(arm.params.items())) + (r,) for r in replicas]


def _trainable(config):
    """Reports _objective every step; a checkpoint carries the step and the sum of lr so far, so
    a trial that continues from another's checkpoint (PBT) shows it in `lr_sum`."""
    from ray import tune
    state = {"step": 0, "lr_sum": 0.0}
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
    while True:
        state = {"step": state["step"] + 1, "lr_sum": state["lr_sum"] + config["hp"]["lr"]}
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps(state))
            tune.report({"val_loss": _objective(config["hp"], config["replica"]), "lr": config["hp"]["lr"], **state},
                        checkpoint=tune.Checkpoint.from_directory(d))


def _tune(unit: ArmSeed, tmp_path: Path, max_steps: int, cpus: int = 1):
    """The arm's trials through Tune as the runner builds them: searcher, num_samples, scheduler."""
    import ray.cloudpickle
    from ray import tune
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    reports = {}  # trial id -> its reports in the order made (no CSV loggers in tests)

    class Reports(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            reports.setdefault(trial.trial_id, []).append(result)

    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": cpus}),
        param_space=trial_config(STUDY, unit),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", search_alg=searcher(unit), num_samples=num_samples(unit),
                                    scheduler=scheduler(unit, max_steps), max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name="contract", storage_path=str(tmp_path), verbose=0,
                                  stop={"training_iteration": max_steps}, callbacks=[Reports()],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))
    results = tuner.fit()
    assert not results.errors, results.errors
    results = sorted(results, key=lambda r: r.metrics["trial_id"])  # creation order
    for r in results:
        r.reports = reports[r.metrics["trial_id"]]
    return results


@pytest.mark.parametrize("name", SEARCHES)
def test_trials_through_tune_report_their_configs(name, ray_session, tmp_path):
    n = 1 if SEARCHES[name].crosses else 2  # a crossing search's example space has 4 points already
    unit = ArmSeed(_arm(name, n), 0, 7, SEED, ensemble_seed=11)
    results = _tune(unit, tmp_path, max_steps=1)
    assert len(results) == _expected_trials(trial_config(STUDY, unit), num_samples(unit))
    for r in results:
        _inside(r.config, unit.arm)
        assert r.metrics["val_loss"] == _objective(r.config["hp"], r.config["replica"])
    # The trials are what the searcher proposes for this seed (tpe, gp: their first random draws).
    proposed = _propose(name, SEED, n, tmp_path / "proposed")
    assert sorted(_key(r.config) for r in results) == sorted(_key(c) for c in proposed)


@pytest.mark.parametrize("name", SEARCHES)
def test_learns_says_whether_the_tune_object_is_a_searcher(name):
    from ray.tune.search import Searcher
    # Tune's PBT refuses a Searcher; the registry lets pbt fit only searches that do not learn.
    assert isinstance(SEARCHES[name].build(seed=SEED), Searcher) == SEARCHES[name].learns


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_defaults_are_valid_and_build(name):
    from ray.tune.schedulers import TrialScheduler
    entry = SCHEDULERS[name]
    for option in entry.options.values():
        assert option.check(option.default) is None and option.check(math.nan) is not None
    fits = [s for s, search in SEARCHES.items() if entry.works_with(search)]
    assert fits, name
    built = entry.build(seed=SEED, options=entry.resolve({}), space=_arm(fits[0], 2).space, max_steps=4)
    assert built is None if name == "none" else isinstance(built, TrialScheduler)


def _pbt_explores(seed: int) -> list[tuple]:
    """PBT's explore step, 8 times on the same trial: the new (lr, batch_size, momentum)."""
    entry = SCHEDULERS["pbt"]
    space = {"lr": {"loguniform": [1e-3, 0.1]}, "batch_size": {"int": [16, 64]}, "momentum": {"choice": [0.0, 0.5, 0.9]}}
    pbt = entry.build(seed=seed, options=entry.resolve({}), space=space, max_steps=8)
    trial = SimpleNamespace(config={"hp": {"lr": 0.01, "batch_size": 32, "momentum": 0.5}, "replica": 0})
    out = []
    for _ in range(8):
        config, _operations = pbt._get_new_config(trial, trial)
        hp = config["hp"]
        assert isinstance(hp["batch_size"], int) and hp["momentum"] in (0.0, 0.5, 0.9)
        out.append((hp["lr"], hp["batch_size"], hp["momentum"]))
    return out


def test_pbt_draws_are_seeded_and_leave_global_state_alone():
    _pbt_explores(0)  # imports Ray, which draws from the global generators on import
    before = (random.getstate(), np.random.get_state()[1].copy())
    first = _pbt_explores(SEED)
    assert _pbt_explores(SEED) == first and _pbt_explores(SEED + 1) != first
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    from ray.tune.schedulers import pbt
    assert pbt.random is random  # the module's name is pointed back after each draw


def test_asha_stops_the_worse_trial_at_the_first_rung(ray_session, tmp_path):
    # grid order: the better lr (0.01, loss term 0) runs first; one slot (2 CPUs a trial), so
    # the worse one reaches rung 1 with the better one's value recorded there
    arm = _arm("grid", 1, space={"lr": {"grid": [0.01, 0.001]}}).model_copy(
        update={"scheduler": "asha", "scheduler_options": {"grace_period": 1, "reduction_factor": 2}})
    results = _tune(ArmSeed(arm, 0, 7, SEED, ensemble_seed=11), tmp_path, max_steps=3, cpus=2)
    assert [r.config["hp"]["lr"] for r in results] == [0.01, 0.001]
    assert [r.metrics["step"] for r in results] == [3, 1]
    assert results[1].metrics["val_loss"] - results[0].metrics["val_loss"] == pytest.approx(1.0)


def test_pbt_exploits_a_checkpoint_and_mutates_within_the_list(ray_session, tmp_path):
    arm = _arm("grid", 1, space={"lr": {"grid": [0.01, 0.001]}}).model_copy(
        update={"scheduler": "pbt", "scheduler_options": {"perturbation_interval": 1, "quantile_fraction": 0.5}})
    results = _tune(ArmSeed(arm, 0, 7, SEED, ensemble_seed=11), tmp_path, max_steps=4, cpus=2)
    # Every report continues the trial's own last state or, after an exploit, a state the other
    # trial reported (its checkpoint) one step before; a mutated lr stays in the grid's list.
    exploits = 0
    for me, other in ((0, 1), (1, 0)):
        last = {"step": 0, "lr_sum": 0.0}  # before the first report
        for report in results[me].reports:
            assert report["lr"] in (0.01, 0.001)
            before = report["lr_sum"] - report["lr"]
            if (report["step"], before) != pytest.approx((last["step"] + 1, last["lr_sum"])):
                exploits += 1
                theirs = [r["lr_sum"] for r in results[other].reports if r["step"] == report["step"] - 1]
                assert any(before == pytest.approx(v) for v in theirs), (report, theirs)
            last = report
    assert exploits >= 1

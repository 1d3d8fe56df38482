"""From a study to Tune: the per-trial config, search spaces as Tune domains, the searcher.

Kept free of Ray imports at module level, so planning can be tested and `validate` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypersweep.methods.seeding import Stream, child_seed, repetition_seeds
from hypersweep.orchestrator.study import ArmConfig, Study


@dataclass(frozen=True)
class ArmSeed:
    """One unit of work: an arm at one repetition, with its seeds (methods/seeding.py)."""
    arm: ArmConfig
    seed_index: int
    seed: int  # the repetition's seed, parent of the data split's and the methods' seeds (shared by all arms)
    search_seed: int  # the searcher's seed, distinct per arm
    ensemble_seed: int  # the generator of ensemble members drawn after the budget (shared by all arms)

    @property
    def key(self) -> str:
        return f"{self.arm.name}/seed{self.seed_index}"


def plan(study: Study) -> list[ArmSeed]:
    """Every arm x seed, seed-major: a study stopped half-way still has paired comparisons."""
    out = []
    for k, seed in enumerate(repetition_seeds(study.seed, study.seeds)):
        for arm in study.arms:
            out.append(ArmSeed(arm, k, seed, search_seed=child_seed(seed, Stream.SEARCH, arm.name),
                               ensemble_seed=child_seed(seed, Stream.ENSEMBLE)))
    return out


def tune_domain(domain: dict[str, list[Any]], grid: bool = False):
    """The Tune domain of a YAML space entry; under search 'grid', listed values (grid or
    choice) are all crossed."""
    from ray import tune
    (form, values), = domain.items()
    if grid:
        return tune.grid_search(values)
    if form == "uniform":
        return tune.uniform(*values)
    if form == "loguniform":
        return tune.loguniform(*values)
    if form == "int":
        return tune.randint(values[0], values[1] + 1)  # YAML bounds are inclusive
    if form == "choice":
        return tune.choice(values)
    return tune.grid_search(values)


def trial_config(study: Study, unit: ArmSeed, data_root: str | None = None) -> dict[str, Any]:
    """The param_space of one arm x seed: fixed values plus Tune domains for searched ones."""
    root = data_root or study.dataset.root
    split_index = unit.seed_index  # the UCI protocol's split index is the repetition
    return {
        "method": unit.arm.method,
        "dataset": {"name": study.dataset.name, "root": str(Path(root).expanduser().resolve()) if root else None,
                    "val_fraction": study.dataset.val_fraction, "test_fraction": study.dataset.test_fraction,
                    "split_index": split_index},
        "model": study.model.target_options(),
        "hp": {**unit.arm.params, **{k: tune_domain(v, grid=unit.arm.search == "grid") for k, v in unit.arm.space.items()}},
        "seed": unit.seed,
        # a fixed arm's num_samples: independent replicas (own init and noise seeds), e.g. a deep ensemble
        "replica": tune_domain({"grid": list(range(unit.arm.num_samples))}) if unit.arm.search == "fixed" else 0,
        "schedule": None,  # search 'replay': filled in by the runner from the STN arm's records
        "data_seed": child_seed(unit.seed, Stream.SPLIT),
        "epochs_per_step": study.training.epochs_per_step,
        "device": study.training.device,
    }


def searcher(unit: ArmSeed):
    """The Tune search algorithm for the arm's `search`, seeded with the arm's search seed:
    Tune's variant generator (fixed, grid, random, replay) or Optuna's TPE / Gaussian-process
    samplers through OptunaSearch (tpe, gp)."""
    seed = unit.search_seed % (2 ** 32)
    if unit.arm.search in ("fixed", "grid", "random", "replay"):
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(random_state=np.random.default_rng(unit.search_seed))
    if unit.arm.search in ("tpe", "gp"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed) if unit.arm.search == "tpe" else \
            optuna.samplers.GPSampler(seed=seed)
        return OptunaSearch(sampler=sampler, seed=seed)
    raise ValueError(f"unknown search {unit.arm.search!r}")


def scheduler(unit: ArmSeed, max_steps: int):
    """The arm's Tune trial scheduler (None: FIFO). Times are in reports (training_iteration)."""
    options = dict(unit.arm.scheduler_options)
    if unit.arm.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler
        return ASHAScheduler(time_attr="training_iteration", max_t=max(max_steps, 1),
                             grace_period=int(options.get("grace_period", 1)),
                             reduction_factor=options.get("reduction_factor", 3))
    if unit.arm.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining
        mutations = {"hp": {k: (v["grid"] if "grid" in v else v["choice"] if "choice" in v else tune_domain(v))
                            for k, v in unit.arm.space.items()}}
        return PopulationBasedTraining(time_attr="training_iteration",
                                       perturbation_interval=int(options.get("perturbation_interval", 2)),
                                       quantile_fraction=options.get("quantile_fraction", 0.25),
                                       hyperparam_mutations=mutations)  # PBT draws from Python's `random`
    return None


def replay_schedule(rows, stn_hp: dict[str, Any]) -> list[list[Any]]:
    """The schedule an STN trial learned, for `sgd` to replay: [[epoch, {hp: value}], ...] from
    the reports (`hp/<name>` after `epoch` epochs) of its best trial by validation loss, led by
    the STN's start values at epoch 0. `rows`: the STN arm x seed's results (a DataFrame)."""
    from hypersweep.methods.hparams import resolve
    from hypersweep.methods.stn import hyperparameters
    best = rows.loc[rows.val_loss.idxmin(), "trial_id"]
    trial = rows[rows.trial_id == best].sort_values("epoch")
    names = [c[3:] for c in trial.columns if c.startswith("hp/")]
    hp = resolve(hyperparameters(0), stn_hp)
    schedule = [[0, {n: float(hp["init_dropout"] if n.startswith("dropout") else hp["init_input_noise"])
                     for n in names}]]
    for epoch, values in zip(trial.epoch, trial[[f"hp/{n}" for n in names]].to_dict("records")):
        entry = {n: float(values[f"hp/{n}"]) for n in names}
        if not all(math.isfinite(v) for v in entry.values()):
            break  # a diverged STN: the schedule ends with its last finite values
        schedule.append([int(epoch), entry])
    return schedule


def num_samples(unit: ArmSeed) -> int:
    """Tune's num_samples: a fixed arm's replicas are a grid, which Tune runs once."""
    return 1 if unit.arm.search == "fixed" else unit.arm.num_samples

"""From a study to Tune: the per-trial config, search spaces as Tune domains, the searcher and
scheduler (built by their entries in searches.py).

Kept free of Ray imports at module level, so planning can be tested and `validate` stays fast.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from hypersweep.methods.seeding import Stream, child_seed, repetition_seeds
from hypersweep.orchestrator.jobs import JOB_ENV
from hypersweep.orchestrator.searches import scheduler_entry, search_entry, tune_domain
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


def trial_config(study: Study, unit: ArmSeed, data_root: str | None = None) -> dict[str, Any]:
    """The param_space of one arm x seed: fixed values plus Tune domains for searched ones."""
    root = data_root or study.dataset.root
    if root and not (os.environ.get(JOB_ENV) and not os.path.isabs(os.path.expanduser(root))):
        root = str(Path(root).expanduser().resolve())
    # (in a submitted job a relative root stays relative: each node resolves it against its own
    # copy of the job's folder, workers/base.py load_splits)
    search = search_entry(unit.arm.search)
    split_index = unit.seed_index  # the UCI protocol's split index is the repetition
    return {
        "method": unit.arm.method,
        "dataset": {"name": study.dataset.name, "root": root or None,
                    "val_fraction": study.dataset.val_fraction, "test_fraction": study.dataset.test_fraction,
                    "split_index": split_index},
        "model": study.model.target_options(),
        "hp": {**unit.arm.params, **{k: tune_domain(v, grid=search.crosses) for k, v in unit.arm.space.items()}},
        "seed": unit.seed,
        # replicas (a fixed arm's num_samples): own init and noise seeds, e.g. a deep ensemble
        "replica": tune_domain({"grid": list(range(unit.arm.num_samples))}) if search.replicas else 0,
        "schedule": None,  # search 'replay': filled in by the runner from the STN arm's records
        "data_seed": child_seed(unit.seed, Stream.SPLIT),
        "epochs_per_step": study.training.epochs_per_step,
        "device": study.training.device,
    }


def searcher(unit: ArmSeed):
    """The Tune search algorithm of the arm's search (searches.SEARCHES), seeded with the arm's
    search seed."""
    return search_entry(unit.arm.search).build(seed=unit.search_seed)


def scheduler(unit: ArmSeed, max_steps: int):
    """The arm's Tune trial scheduler (None: FIFO), seeded with the arm's search seed. Times are
    in reports (training_iteration); `max_steps` is a trial's last report."""
    entry = scheduler_entry(unit.arm.scheduler)
    return entry.build(seed=unit.search_seed, options=entry.resolve(unit.arm.scheduler_options),
                       space=unit.arm.space, max_steps=max_steps)


def replay_schedule(rows, stn_hp: dict[str, Any]) -> list[list[Any]]:
    """The schedule an STN trial learned, for `sgd` to replay: [[epoch, {hp: value}], ...] from
    the reports (`hp/<name>` after `epoch` epochs) of its best trial by validation loss, led by
    the STN's start values at epoch 0. `rows`: the STN arm x seed's results (a DataFrame)."""
    from hypersweep.methods.hparams import resolve
    from hypersweep.methods.stn import hyperparameters, start_value
    best = rows.loc[rows.val_loss.idxmin(), "trial_id"]
    trial = rows[rows.trial_id == best].sort_values("epoch")
    names = [c[3:] for c in trial.columns if c.startswith("hp/")]
    hp = resolve(hyperparameters(0), stn_hp)
    schedule = [[0, {n: start_value(hp, n) for n in names}]]
    for epoch, values in zip(trial.epoch, trial[[f"hp/{n}" for n in names]].to_dict("records")):
        entry = {n: float(values[f"hp/{n}"]) for n in names}
        if not all(math.isfinite(v) for v in entry.values()):
            break  # a diverged STN: the schedule ends with its last finite values
        schedule.append([int(epoch), entry])
    return schedule


def one_trial(unit: ArmSeed) -> bool:
    """Whether the arm x seed runs a single trial (stn, the hypernet methods, a fixed config)."""
    return unit.arm.num_samples == 1 and not search_entry(unit.arm.search).crosses


def trial_resources(study: Study, unit: ArmSeed, workers: int) -> dict[str, float]:
    """Ray resources of one trial of the arm, which has `workers` slots. A search runs up to
    `workers` trials at once, each on one slot (cpus_per_worker; a fraction of
    gpus_per_worker packs trials on a GPU). A one-trial arm gets the arm's whole share instead
    of one slot: workers x cpus_per_worker CPUs (its torch threads, workers/base.py) and, when
    the study has GPUs, one whole GPU (a trial trains on one device)."""
    b = study.budget
    if not one_trial(unit):
        return {"cpu": b.cpus_per_worker, "gpu": b.gpus_per_worker}
    return {"cpu": workers * b.cpus_per_worker, "gpu": 1.0 if b.gpus_per_worker > 0 else 0.0}


def num_samples(unit: ArmSeed) -> int:
    """Tune's num_samples: replicas are a grid over `replica`, which Tune runs once."""
    return 1 if search_entry(unit.arm.search).replicas else unit.arm.num_samples

"""Seeds: every child is a named stream of its parent; one master seed gives the same seeds and
the same numbers in a fresh process."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hypersweep.methods.seeding import Stream, child_seed, repetition_seeds
from hypersweep.orchestrator.planning import plan
from hypersweep.orchestrator.study import parse_study

ROOT = Path(__file__).resolve().parents[1]

STUDY = {"name": "seeds", "seed": 2026, "seeds": 2, "dataset": {"name": "digits"},
         "model": {"kind": "mlp", "hidden": [16]},
         "arms": [{"name": "a", "method": "sgd", "params": {"lr": 0.05, "dropout": 0.2, "batch_size": 64}},
                  {"name": "b", "method": "sgd", "params": {"lr": 0.1, "batch_size": 64}}],
         "budget": {"seconds": 5}}


def test_every_stream_and_key_has_its_own_seed():
    parent = 12345
    seeds = ([parent] + [child_seed(parent, s) for s in Stream] + repetition_seeds(parent, 3)
             + [child_seed(parent, Stream.REPLICA, r) for r in (1, 2)]
             + [child_seed(parent, Stream.SEARCH, arm) for arm in ("a", "b")])
    assert len(set(seeds)) == len(seeds)
    assert child_seed(parent, Stream.NOISE) != child_seed(parent + 1, Stream.NOISE)
    assert all(0 <= s < 2 ** 32 for s in seeds)  # what torch, numpy and Optuna all take


def test_arms_of_a_repetition_share_its_seeds_but_not_their_searches():
    units = plan(parse_study(STUDY))
    by_rep = [[u for u in units if u.seed_index == k] for k in (0, 1)]
    for a, b in by_rep:
        assert a.seed == b.seed and a.ensemble_seed == b.ensemble_seed  # paired arms
        assert a.search_seed != b.search_seed
    first, second = (rep[0] for rep in by_rep)
    # each repetition trains, searches and draws its ensemble members differently
    assert len({first.seed, second.seed, first.ensemble_seed, second.ensemble_seed,
                first.search_seed, second.search_seed}) == 6


def derived_numbers() -> dict:
    """The seeds `plan` derives from STUDY's master seed, the data split's and a replica's, and
    the first training loss of the first arm x seed."""
    import torch

    from hypersweep.orchestrator.planning import trial_config
    from hypersweep.workers.base import trial_seed
    from hypersweep.workers.sgd_trainable import SGDTrainable
    torch.set_num_threads(1)
    study = parse_study(STUDY)
    units = plan(study)
    config = {**trial_config(study, units[0]), "replica": 0, "device": "cpu"}
    return {"units": [[u.seed, u.search_seed, u.ensemble_seed] for u in units], "data_seed": config["data_seed"],
            "replica_1": trial_seed({**config, "replica": 1}),
            "first_loss": SGDTrainable(config=config).train()["train_loss"]}


def test_same_master_seed_same_seeds_and_loss_in_a_fresh_process():
    script = "import json, test_seeding; print(json.dumps(test_seeding.derived_numbers()))"
    env = {**os.environ, "PYTHONHASHSEED": "1"}  # a salt unlike this process's: seeds must not hash names
    fresh = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "tests", env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()[-1]
    assert json.loads(fresh) == derived_numbers()


def test_trial_resources_one_trial_arms_get_the_arms_share():
    """A search packs trials on its slots (a GPU fraction each); an arm of one trial gets every
    slot's CPUs and one whole GPU (planning.trial_resources)."""
    from hypersweep.orchestrator.planning import trial_resources
    study = parse_study({**STUDY, "budget": {"seconds": 10, "workers": 4, "cpus_per_worker": 1.5,
                                             "gpus_per_worker": 0.25},
                         "arms": [{"name": "one", "method": "sgd", "search": "fixed", "params": {"lr": 0.1}},
                                  {"name": "reps", "method": "sgd", "search": "fixed", "num_samples": 3,
                                   "params": {"lr": 0.1}},
                                  {"name": "grid", "method": "sgd", "search": "grid",
                                   "space": {"lr": {"grid": [0.01, 0.1]}}},
                                  {"name": "rand", "method": "sgd", "search": "random", "num_samples": 8,
                                   "space": {"lr": {"loguniform": [0.01, 0.1]}}}]})
    got = {u.arm.name: trial_resources(study, u, study.budget.workers) for u in plan(study) if u.seed_index == 0}
    assert got["one"] == {"cpu": 6.0, "gpu": 1.0}
    assert got["reps"] == got["grid"] == got["rand"] == {"cpu": 1.5, "gpu": 0.25}
    cpu_only = parse_study({**STUDY, "budget": {"seconds": 10, "workers": 2}})
    assert {trial_resources(cpu_only, u, 2)["gpu"] for u in plan(cpu_only)} == {0.0}

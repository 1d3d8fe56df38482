"""The contract every registered trainable keeps: setup, step, save, restore, pickle; and a
restored trial takes exactly the step the original would have taken."""
import math
import pickle

import cloudpickle
import pytest

from hypersweep.methods import METHODS
from hypersweep.methods.clock import Deadline, FakeClock
from hypersweep.workers import trainable_class

# One small config per method; a new method adds its line here.
CONFIGS = {
    "sgd": {"hp": {"lr": 0.05, "dropout": 0.2, "input_noise": 0.1, "batch_size": 32}},
    "hyper-ml": {"hp": {"lr": 1e-3, "batch_size": 64, "samples_per_step": 16, "hyper_hidden": [16, 8]}},
    "hyper-diverse": {"hp": {"noise_batch": 8, "image_batch": 16, "latent_dim": 20, "extractor_hidden": [32],
                             "first_generator_hidden": [16], "generator_hidden": [16],
                             "last_generator_hidden": [16], "batch_norm": 1}},
    "hyper-posterior": {"hp": {"batch_size": 64, "latent_dim": 8, "hidden": 16, "sharing": "block-wise",
                               "prior": "normal"}},
    "stn": {"hp": {"batch_size": 64, "warmup_epochs": 0, "tune": "dropout,input_noise"}},
    "hyper-hpo": {"hp": {"batch_size": 64, "warmup_epochs": 0, "tune": "weight_decay,input_noise", "hidden": [8]}},
}

# Keys that differ between two runs of the same step (timings).
TIMING = {"step_time_s", "wall_time_s", "time_this_iter_s", "time_total_s", "time_since_restore", "timestamp",
          "date", "pid", "hostname", "node_ip", "iterations_since_restore",
          "restores", "cpu_time_s"}  # restores: counts the restore itself; cpu_time_s: process time


def test_every_trainable_is_in_the_contract():
    assert set(CONFIGS) == set(METHODS)


def _config(method, dataset="digits"):
    return {"dataset": {"name": dataset, "root": None, "val_fraction": 0.2, "test_fraction": 0.2, "split_index": 0},
            "model": {"kind": "mlp", "hidden": [32, 32]}, "seed": 123, "data_seed": 123, "epochs_per_step": 1,
            "device": "cpu", "method": method, **CONFIGS[method]}


def _metrics(result):
    return {k: v for k, v in result.items() if k not in TIMING and k != "config"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dataset", ["digits", "synthetic-regression"])
def test_contract(method, dataset, tmp_path):
    cls = trainable_class(method)
    config = _config(method, dataset)
    a = cls(config=config)
    r1 = a.train()
    quality = "val_error" if dataset == "digits" else "val_rmse"
    for key in ("train_loss", "val_loss", quality, "test_loss", quality.replace("val", "test"), "wall_time_s"):
        assert math.isfinite(r1[key]), key
    a.train()
    checkpoint = a.save(str(tmp_path / "ckpt"))
    r3 = a.train()

    b = cls(config=config)
    b.restore(checkpoint)
    r3_restored = b.train()
    assert _metrics(r3_restored) == _metrics(r3)  # identical next step, to the bit
    assert r3_restored["training_iteration"] == 3

    # Ray ships the class and its config to workers: both must pickle.
    assert cloudpickle.loads(cloudpickle.dumps(cls)).__name__ == cls.__name__
    assert pickle.loads(pickle.dumps(config)) == config

    # reset_config (reuse_actors) starts a fresh trial: same numbers as a new actor.
    a.reset_config(config)
    c = cls(config=config)
    assert _metrics(a.train())["val_loss"] == _metrics(c.train())["val_loss"]
    for t in (a, b, c):
        t.stop()


def test_a_diverged_trial_ends_instead_of_reporting_nan():
    t = trainable_class("sgd")(config=_config("sgd"))
    t.train()
    t.method.train_epoch = lambda: float("nan")  # what a blown-up run returns
    last = t.train()
    assert last["diverged"] == 1 and last["done"] and math.isnan(last["val_loss"])
    assert last["error"] == "training diverged: non-finite training loss at epoch 1"
    t.stop()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_deadline_ends_an_epoch_between_minibatches(method):
    """Past the deadline, a pass stops after one minibatch and is not counted as an epoch."""
    t = trainable_class(method)(config=_config(method))
    m = t.method
    calls = []
    step = m.train_step if hasattr(m, "train_step") else (m.train_batch if hasattr(m, "train_batch") else None)
    if step is not None:
        name = "train_step" if hasattr(m, "train_step") else "train_batch"
        setattr(m, name, lambda *a: (calls.append(1), step(*a))[1])
    loss = m.train_epoch(deadline=Deadline(0.0, FakeClock(1.0)))
    assert math.isfinite(loss) and m.epoch == 0
    if step is not None:
        assert len(calls) == 1
    m.train_epoch()
    assert m.epoch == 1
    t.stop()


def test_a_trial_past_its_last_step_ends_without_training(tmp_path):
    """An extended arm resumes its finished trials with the others: one that had run all its
    `max_steps` ends at once, trains nothing, and its report is not recorded (trained() False)."""
    from hypersweep.orchestrator.recorder import trained
    config = {**_config("sgd"), "max_steps": 2}
    a = trainable_class("sgd")(config=config)
    a.train()
    last = a.train()
    checkpoint = a.save(str(tmp_path / "ckpt"))
    b = trainable_class("sgd")(config=config)
    b.restore(checkpoint)
    epoch = b.method.epoch
    extra = b.train()
    assert extra["done"] and extra["epochs_this_step"] == 0 and b.method.epoch == epoch
    assert extra["val_loss"] == last["val_loss"] and not trained(extra)
    for t in (a, b):
        t.stop()


def test_a_trainable_made_in_a_ray_driver_reports_where_it_ran(ray_session):
    """In a process connected to Ray that is not a Ray worker (a driver, as here), a trainable
    reports its node and keeps the process's torch threads (Ray assigned it nothing)."""
    import torch
    torch.set_num_threads(1)
    result = trainable_class("sgd")(config=_config("sgd")).train()
    assert result["device"] == "cpu" and result["node_id"] == ray_session.get_runtime_context().get_node_id()
    assert result["torch_threads"] == 1 == torch.get_num_threads()


def test_a_trial_whose_recorded_checkpoint_was_deleted_restores_from_its_newest(tmp_path):
    """Tune's experiment snapshot (every 2 s) can name a checkpoint that `num_to_keep` deleted
    before the next snapshot, when the coordinator is killed between the two (a clean-clone CI
    run): the trial restores from the newest checkpoint beside it, at that checkpoint's step,
    instead of failing every retry. With none left, Tune's own error stands."""
    import shutil
    cls = trainable_class("sgd")
    config = _config("sgd")
    a = cls(config=config)
    a.train()
    recorded = a.save(str(tmp_path / "trial" / "checkpoint_000001"))
    a.train()
    a.train()
    a.save(str(tmp_path / "trial" / "checkpoint_000002"))
    r4 = a.train()
    shutil.rmtree(tmp_path / "trial" / "checkpoint_000001")
    b = cls(config=config)
    b.restore(recorded)  # names the deleted one, with its metrics (step 1)
    r4_restored = b.train()
    assert r4_restored["training_iteration"] == 4 and r4_restored["restores"] == 1
    assert _metrics(r4_restored) == _metrics(r4)  # from step 3's state, to the bit
    shutil.rmtree(tmp_path / "trial" / "checkpoint_000002")
    c = cls(config=config)
    with pytest.raises(ValueError, match="does not exist on storage"):
        c.restore(recorded)
    for t in (a, b, c):
        t.stop()

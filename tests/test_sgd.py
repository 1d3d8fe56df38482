"""`sgd` learns, regularises as asked, and the same seed gives the same numbers in a fresh process."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from hypersweep.methods import data
from hypersweep.methods.sgd import SGD, dropout_rates, hyperparameters
from hypersweep.methods.targets import build_target
from tests.conftest import ROOT


def _sgd(dataset="digits", hidden=(64,), seed=0, **hp):
    splits = data.load(dataset, seed=0)
    net = build_target("mlp", splits.input_shape, splits.n_outputs, hidden=hidden)
    return SGD(net, splits, hp, seed=seed)


def test_learns_digits():
    m = _sgd(lr=0.05, batch_size=32)
    before = m.evaluate("val")
    for _ in range(10):
        m.train_epoch()
    after = m.evaluate("val")
    assert before["error"] > 0.8 and after["error"] < 0.06
    assert after["loss"] < before["loss"] / 5


def test_regression_reports_in_data_units():
    m = _sgd("boston", hidden=(50,), lr=0.01, batch_size=16)
    base_rmse = float(torch.cat([m.splits.y_val]).std()) * m.splits.y_std  # predicting the mean
    for _ in range(40):
        m.train_epoch()
    val = m.evaluate("val")
    assert val["rmse"] < 0.6 * base_rmse  # learned something real, in dollars x 1000
    assert 1.0 < val["loss"] < 5.0  # a Gaussian NLL per house in data units, not standardised


def test_dropout_rates_per_layer():
    hps = {"dropout_in": 0.1, "dropout": 0.3, "dropout_2": 0.5}
    full = {**{n: h.default for n, h in hyperparameters(3).items()}, **hps}
    assert dropout_rates(full, 3) == [0.1, 0.3, 0.5]
    with pytest.raises(ValueError, match="unknown hyperparameter 'dropout_3'"):
        _sgd(hidden=(8, 8), dropout_3=0.1)
    with pytest.raises(ValueError, match="hyperparameter 'lr'"):
        _sgd(lr=-1.0)


def test_regularisation_changes_training_but_not_evaluation():
    plain, noisy = _sgd(seed=1), _sgd(seed=1, dropout=0.5, input_noise=0.5)
    assert plain.evaluate("val") == noisy.evaluate("val")  # same init, eval mode has no noise
    assert plain.train_epoch() != noisy.train_epoch()


def test_learned_input_noise_is_trained_and_restored_exactly():
    """learn_input_noise (hyper-ml's, for the paper's SGD baseline): its std starts at
    input_noise, moves with training, is reported, and a restored run takes the same next step."""
    m = _sgd("boston", hidden=(16,), seed=3, lr=0.01, batch_size=16, input_noise=0.3, learn_input_noise=1)
    assert m.diagnostics()["input_noise"] == pytest.approx(0.3, rel=1e-5)
    assert m.module.reg.input_noise == 0.0  # the learned noise replaces the fixed one, not added to it
    m.train_epoch()
    state = copy.deepcopy(m.state_dict())  # (as a checkpoint on disk holds it)
    moved = m.diagnostics()["input_noise"]
    assert moved != pytest.approx(0.3, rel=1e-3)
    expected = m.train_epoch()
    twin = _sgd("boston", hidden=(16,), seed=3, lr=0.01, batch_size=16, input_noise=0.3, learn_input_noise=1)
    twin.load_state_dict(state)
    assert twin.diagnostics()["input_noise"] == pytest.approx(moved)
    assert twin.train_epoch() == expected
    with pytest.raises(ValueError, match="input_noise cannot be scheduled when it is learned"):
        splits = data.load("digits", seed=0)
        SGD(build_target("mlp", splits.input_shape, 10, hidden=(8,)), splits, {"learn_input_noise": 1}, seed=0,
            schedule=[[0, {"input_noise": 0.1}]])


_SCRIPT = """
import json, torch
torch.set_num_threads(1)
from hypersweep.methods import data
from hypersweep.methods.sgd import SGD
from hypersweep.methods.targets import build_target
s = data.load("digits", seed=5)
m = SGD(build_target("mlp", s.input_shape, 10, hidden=(32,)), s, {"dropout": 0.2, "input_noise": 0.1}, seed=9)
losses = [m.train_epoch() for _ in range(2)]
print(json.dumps({"train": losses, "val": m.evaluate("val")["loss"]}))
"""


def test_same_seed_same_numbers_in_a_fresh_process():
    runs = [json.loads(subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1]
    s = data.load("digits", seed=5)
    m = SGD(build_target("mlp", s.input_shape, 10, hidden=(32,)), s, {"dropout": 0.2, "input_noise": 0.1}, seed=9)
    assert [m.train_epoch() for _ in range(2)] == runs[0]["train"]


def _cnn_sgd(**hp):
    splits = data.load("digits", seed=0)
    net = build_target("cnn", splits.input_shape, splits.n_outputs, channels=(4, 3), fc_hidden=5)
    return SGD(net, splits, {"batch_size": 64, **hp}, seed=0)


def test_the_stns_data_hyperparameters_as_fixed_values_and_as_a_schedule():
    """sgd takes the STN's jitter and cutout hyperparameters (so searches and replays tune the
    same ones): at 0 the batches and the noise stream are untouched; set, they change the
    batches; a schedule sets them per epoch and reports them as hp/<name>, as the STN does."""
    plain, off = _cnn_sgd(), _cnn_sgd(brightness=0.0, cutout_length=0.0)
    x = plain.data["train"][0][:32]
    assert torch.equal(off._augment(x), x) and torch.equal(off.noise_gen.get_state(), plain.noise_gen.get_state())
    jittered = _cnn_sgd(brightness=0.5, contrast=0.5)._augment(x)
    assert not torch.equal(jittered, x) and jittered.shape == x.shape
    cut = _cnn_sgd(cutout_length=4.9, cutout_holes=1.0)._augment(x)  # floored: a 4 x 4 square, set to 0
    changed = (cut != x).flatten(1).sum(1)
    assert (changed > 0).any() and (changed <= 16 * x.shape[1]).all()
    for hp in ({"brightness": 0.5}, {"cutout_length": 3.0}):
        with pytest.raises(ValueError, match="needs image inputs"):
            _sgd("boston", **hp)
    scheduled = SGD(plain.target, plain.splits, {"batch_size": 64}, seed=0,
                    schedule=[[0, {"brightness": 0.3, "cutout_length": 5.0}], [1, {"brightness": 0.1, "cutout_length": 0.0}]])
    scheduled.train_epoch()
    assert scheduled.diagnostics()["hp/brightness"] == 0.3 and scheduled.diagnostics()["hp/cutout_length"] == 5.0
    scheduled.train_epoch()
    assert scheduled.diagnostics()["hp/brightness"] == 0.1 and scheduled.diagnostics()["hp/cutout_length"] == 0.0
    with pytest.raises(ValueError, match="'hue' is not a dropout, input-noise or augmentation setting"):
        tabular = _sgd("boston")
        SGD(tabular.target, tabular.splits, {}, seed=0, schedule=[[0, {"hue": 0.1}]])

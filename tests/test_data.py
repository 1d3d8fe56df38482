"""Data sets: deterministic, disjoint splits; standardisation from the training split only;
the file-based loaders read files written here in the real formats."""
import pickle
import struct

import numpy as np
import pytest
import torch

from hypersweep.methods import data
from tests.conftest import SHARED_DATA


def _all_rows(s):
    return {k: set(v.tolist()) for k, v in s.indices.items()}


@pytest.mark.parametrize("name", ["digits", "mnist-5k", "synthetic-classification", "synthetic-regression"])
def test_splits_deterministic_per_seed_and_disjoint(name):
    a, b, c = data.load(name, seed=7), data.load(name, seed=7), data.load(name, seed=8)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split)[0], b.split(split)[0])
        assert np.array_equal(a.indices[split], b.indices[split])
    assert not np.array_equal(a.indices["val"], c.indices["val"])
    rows = _all_rows(a)
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    n = sum(len(v) for v in rows.values())
    assert len(set().union(*rows.values())) == n


def test_digits_sizes_and_standardisation():
    s = data.load("digits", seed=0, val_fraction=0.2, test_fraction=0.2)
    assert s.task == "classification" and s.n_outputs == 10 and s.input_shape == (1, 8, 8)
    assert len(s.x_train) + len(s.x_val) + len(s.x_test) == 1797
    assert len(s.x_test) == round(0.2 * 1797)
    # Per-channel statistics of the training split only: exactly 0/1 there, not on validation.
    assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std()) - 1) < 1e-3
    assert abs(float(s.x_val.mean())) > 1e-5


def test_embedded_sets_are_the_real_ones():
    m = data.load("mnist-5k", seed=0)
    assert m.input_shape == (1, 28, 28) and len(m.x_train) + len(m.x_val) + len(m.x_test) == 5000
    b = data.load("boston", seed=0, split_index=0)
    assert b.task == "regression" and b.input_shape == (13,)
    assert len(b.x_test) == round(0.1 * 506)  # the UCI protocol's 90/10 split
    assert abs(float(b.y_train.mean())) < 1e-5  # targets standardised on training data
    y_data = torch.cat([b.y_train, b.y_val, b.y_test]) * b.y_std + b.y_mean
    assert abs(float(y_data.mean()) - 22.5328) < 0.01  # mean MEDV of Boston housing


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    code = {1: 0x801, 3: 0x803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_files_through_torchvision(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    x_tr, y_tr = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    x_te, y_te = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    _write_idx(raw / "train-images-idx3-ubyte", x_tr)
    _write_idx(raw / "train-labels-idx1-ubyte", y_tr)
    _write_idx(raw / "t10k-images-idx3-ubyte", x_te)
    _write_idx(raw / "t10k-labels-idx1-ubyte", y_te)
    s = data.load(name, seed=0, data_root=str(tmp_path), val_fraction=0.2)
    assert s.input_shape == (1, 28, 28) and (len(s.x_train), len(s.x_val), len(s.x_test)) == (40, 10, 20)
    assert torch.equal(s.y_test, torch.from_numpy(y_te.astype(np.int64)))  # the official test split, in order
    # The training rows are the files' rows, standardised with training statistics.
    tr = x_tr[s.indices["train"]].astype(np.float32)
    expected = (x_tr[s.indices["val"]].astype(np.float32) - tr.mean()) / tr.std()
    assert torch.allclose(s.x_val[:, 0], torch.from_numpy(expected), atol=1e-4)


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels[name] = rng.integers(0, 10, 4).tolist()
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": labels[name]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    s = data.load("cifar10", seed=0, data_root=str(tmp_path), val_fraction=0.25)
    assert s.input_shape == (3, 32, 32) and len(s.x_train) + len(s.x_val) == 20 and len(s.x_test) == 4
    assert s.y_test.tolist() == labels["test_batch"]
    assert torch.allclose(s.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # per channel


def test_missing_files_say_where_and_how():
    with pytest.raises(data.DataNotFoundError, match=r"missing .*t10k-images-idx3-ubyte.* under .*MNIST/raw.*--data-root"):
        data.load("mnist", seed=0, data_root="/nonexistent")
    with pytest.raises(data.DataNotFoundError, match="set dataset.root"):
        data.load("cifar10", seed=0)
    with pytest.raises(ValueError, match="unknown dataset 'foo'; valid: boston"):
        data.load("foo", seed=0)


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_uci_protocol(tmp_path, fmt):
    rng = np.random.default_rng(2)
    table = np.column_stack([rng.normal(size=(200, 3)), rng.normal(size=200) * 5 + 10])
    (tmp_path / "uci").mkdir()
    if fmt == "csv":
        np.savetxt(tmp_path / "uci" / "toy.csv", table, delimiter=",", header="a,b,c,y", comments="")
    else:
        np.savetxt(tmp_path / "uci" / "toy.txt", table)
    load = lambda **kw: data.load("uci:toy", data_root=str(tmp_path), val_fraction=0.1, **kw)
    s0, s0b, s1, s0_other_seed = load(seed=0, split_index=0), load(seed=0, split_index=0), \
        load(seed=0, split_index=1), load(seed=5, split_index=0)
    assert len(s0.x_test) == 20 and len(s0.x_train) + len(s0.x_val) == 180
    assert np.array_equal(s0.indices["test"], s0b.indices["test"])
    assert not np.array_equal(s0.indices["test"], s1.indices["test"])  # index = repetition
    assert np.array_equal(s0.indices["test"], s0_other_seed.indices["test"])  # the split is the index's
    assert not set(s0.indices["test"]) & (set(s0.indices["train"]) | set(s0.indices["val"]))
    y = torch.cat([s0.y_train, s0.y_val, s0.y_test]) * s0.y_std + s0.y_mean
    idx = np.concatenate([s0.indices[k] for k in ("train", "val", "test")])
    assert np.allclose(y.numpy(), table[idx, -1], atol=1e-4)
    with pytest.raises(ValueError, match=r"split_index must be in \[0, 20\)"):
        load(seed=0, split_index=20)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").exists(), reason="full MNIST not present")
def test_full_mnist_from_shared_data():
    s = data.load("mnist", seed=0, data_root=str(SHARED_DATA), val_fraction=10000 / 60000)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (50000, 10000, 10000)

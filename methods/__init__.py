"""Pure PyTorch: data sets, target networks, methods. Imports no Ray, click or MLflow.

`METHODS` maps a method name to the module that implements it; each such module exposes
`hyperparameters(n_dropout_sites) -> {name: HParam}` and `METHOD`, a class that follows the
`Method` protocol below. Modules load lazily, on first use.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch


class Method(Protocol):
    """What a trainer (workers/) needs of a method. `generative` methods define a distribution
    over the target's weights and also draw from it: `sample_weights(k, generator) -> (k, P)`;
    ensembles of the others are independent trials."""

    family: ClassVar[str]  # which Trainable drives it: plain, generative or tuner (workers/)
    generative: ClassVar[bool]
    epoch: int  # complete passes over the training split so far

    def train_epoch(self, deadline: Any = None) -> float: ...  # one pass (stops early at the deadline)

    def evaluate(self, split: str) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...  # everything a restore needs, generators included

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def sample_weights(self, k: int, generator: "torch.Generator") -> "torch.Tensor": ...  # generative only

METHODS: dict[str, str] = {
    "sgd": "hypersweep.methods.sgd",
    "hyper-ml": "hypersweep.methods.hyper_ml",
    "hyper-diverse": "hypersweep.methods.hyper_diverse",
    "hyper-posterior": "hypersweep.methods.hyper_posterior",
    "stn": "hypersweep.methods.stn",
    "hyper-hpo": "hypersweep.methods.hyper_hpo",
}


def method_module(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])


def is_generative(name: str) -> bool:
    """Whether the method draws weight samples (its ensembles are samples of one trial)."""
    return bool(method_module(name).METHOD.generative)

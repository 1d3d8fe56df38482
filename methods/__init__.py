"""Pure PyTorch: data sets, target networks, methods. Imports no Ray, click or MLflow.

`METHODS` maps a method name to the module that implements it; each such module exposes
`hyperparameters(n_dropout_sites) -> {name: HParam}` and `METHOD`, the class with
`train_epoch()`, `evaluate(split)`, `state_dict()`, `load_state_dict()` (generative methods
also `sample_weights(k, generator)`). Modules load lazily, on first use.
"""
from __future__ import annotations

import importlib
from types import ModuleType

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

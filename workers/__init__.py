"""What runs on Ray workers: one Tune Trainable per method family. Nothing here talks to MLflow
or the CLI; reports go back to the coordinator through Tune.

`TRAINABLES` maps a method name to its Trainable class ("module:Class"), loaded on first use.
"""
from __future__ import annotations

import importlib

TRAINABLES: dict[str, str] = {
    "sgd": "hypersweep.workers.sgd_trainable:SGDTrainable",
    "hyper-ml": "hypersweep.workers.hypernet_trainable:HypernetTrainable",
    "hyper-diverse": "hypersweep.workers.hypernet_trainable:HypernetTrainable",
    "hyper-posterior": "hypersweep.workers.hypernet_trainable:HypernetTrainable",
    "stn": "hypersweep.workers.stn_trainable:STNTrainable",
    "hyper-hpo": "hypersweep.workers.stn_trainable:STNTrainable",
}


def trainable_class(method: str):
    if method not in TRAINABLES:
        raise ValueError(f"no trainable for method {method!r}; valid: {', '.join(sorted(TRAINABLES))}")
    module, cls = TRAINABLES[method].split(":")
    return getattr(importlib.import_module(module), cls)

"""What runs on Ray workers: one Tune Trainable per method family. Nothing here talks to MLflow
or the CLI; reports go back to the coordinator through Tune.

`TRAINABLES` maps a method family (`Method.family`: plain, generative, tuner) to its Trainable
class ("module:Class"), loaded on first use; a new method of an existing family needs no
line here.
"""
from __future__ import annotations

import importlib

TRAINABLES: dict[str, str] = {
    "plain": "hypersweep.workers.sgd_trainable:SGDTrainable",
    "generative": "hypersweep.workers.hypernet_trainable:HypernetTrainable",
    "tuner": "hypersweep.workers.stn_trainable:STNTrainable",
}


def trainable_class(method: str):
    """The Trainable of a registered method's family."""
    from hypersweep.methods import method_module
    family = method_module(method).METHOD.family
    if family not in TRAINABLES:
        raise ValueError(f"no trainable for family {family!r} of method {method!r}; valid: {', '.join(TRAINABLES)}")
    module, cls = TRAINABLES[family].split(":")
    return getattr(importlib.import_module(module), cls)

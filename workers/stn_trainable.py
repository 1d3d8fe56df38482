"""Tune trainable for the methods that tune hyperparameters by gradient within one run: `stn`
(and Delta-STN through its `variant`) and `hyper-hpo`. The base lifecycle; each step also
reports the hyperparameters' current values (`hp/<name>`, and for the STN the perturbation
scales `perturb_scale/<name>`), the schedule the coordinator plots."""
from __future__ import annotations

from hypersweep.workers.base import MethodTrainable


class STNTrainable(MethodTrainable):
    pass

"""Tune trainable for `stn` (and `delta-stn` through its `variant`): the base lifecycle; each
step also reports the hyperparameters' current values (`hp/<name>`) and perturbation scales
(`hp_scale/<name>`), the schedule the coordinator plots."""
from __future__ import annotations

from workers.base import MethodTrainable


class STNTrainable(MethodTrainable):
    pass

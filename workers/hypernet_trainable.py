"""Tune trainable for the generative hypernetwork methods (`hyper-ml`, `hyper-diverse`,
`hyper-posterior`): the base lifecycle; each step also reports the method's diagnostics
(`weight_std`, ...)."""
from __future__ import annotations

from hypersweep.workers.base import MethodTrainable


class HypernetTrainable(MethodTrainable):
    pass

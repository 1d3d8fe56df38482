"""Tune trainable for `sgd`: the base lifecycle as it is."""
from __future__ import annotations

from hypersweep.workers.base import MethodTrainable


class SGDTrainable(MethodTrainable):
    pass

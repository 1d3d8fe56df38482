"""Tune trainable for `sgd`."""
from __future__ import annotations

from methods.sgd import SGD
from workers.base import MethodTrainable


class SGDTrainable(MethodTrainable):
    def build(self, config, splits, target, device):
        return SGD(target, splits, config["hp"], seed=config["seed"], device=device)

"""Tune trainable for the generative hypernetwork methods (`hyper-ml`, ...): the method class
comes from the registry by name; each step also reports the method's diagnostics."""
from __future__ import annotations

from methods import method_module
from workers.base import MethodTrainable


class HypernetTrainable(MethodTrainable):
    def build(self, config, splits, target, device):
        return method_module(config["method"]).METHOD(target, splits, config["hp"], seed=config["seed"], device=device)

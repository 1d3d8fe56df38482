"""What an MLflow model logged by hypersweep computes (orchestrator/models.py logs it).

`ServedNet` holds one or more trained target nets (a trial's net, the samples of a generative
method, a Polyak average) and returns their mean prediction, as hypersweep's own evaluation
(`methods.ensembles.evaluate_ensemble`) scores it:
- classification: the mean over members of the class probabilities, (B, classes);
- regression: the mean over members of the predicted target, in the data's units, (B,).
Its input is what hypersweep's data loaders give a net (`methods.data.load`): standardised
features or images, float32, shaped as the data set's inputs (B, *input_shape).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ServedNet(nn.Module):
    def __init__(self, nets: Sequence[nn.Module], task: str, y_mean: float = 0.0, y_std: float = 1.0):
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be classification or regression, got {task!r}")
        self.nets = nn.ModuleList(nets)
        self.task, self.y_mean, self.y_std = task, float(y_mean), float(y_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([net(x) for net in self.nets])  # (K, B, outputs)
        if self.task == "classification":
            return out.softmax(-1).mean(0)
        return out.mean(0).squeeze(-1) * self.y_std + self.y_mean

"""Hyperparameters tuned by gradient (STN, hyper-hpo): stored unconstrained, mapped to their
range by a stretched sigmoid (bounded) or a shifted softplus (no upper bound), as the STN
reference code does. Discrete ones (cutout length and holes) stay continuous for the
hypernetwork and are floored only where the data pipeline uses them. `inv_softplus` gives the
unconstrained start of any softplus-parametrised scale (STN's perturbation scales, hyper-ml's
noise scales).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# Floor tolerance: a discrete start value of 4 survives the sigmoid round trip as 4, not 3
# (the reference code's cutout length starts at 4 and is used as 3).
FLOOR_TOLERANCE = 1e-4


def inv_softplus(y: float) -> float:
    """x with softplus(x) = y > 0: log(e^y - 1), written to stay finite for large y."""
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class Tuned:
    name: str
    low: float
    high: float  # math.inf: softplus
    init: float
    discrete: bool = False

    def check(self) -> None:
        if not self.low < self.init < self.high:  # the sigmoid never reaches its ends
            raise ValueError(f"start value of {self.name} must lie inside ({self.low}, {self.high}), got {self.init}")


class Space:
    """An ordered set of tuned hyperparameters; tensors (..., H) in the same column order."""

    def __init__(self, tuned: Sequence[Tuned]):
        self.tuned = list(tuned)
        for t in self.tuned:
            t.check()
        self.names = [t.name for t in self.tuned]
        self.index = {n: i for i, n in enumerate(self.names)}
        low = torch.tensor([t.low for t in self.tuned])
        high = torch.tensor([t.high if math.isfinite(t.high) else 0.0 for t in self.tuned])
        self._low, self._span = low, high - low
        self._bounded = torch.tensor([math.isfinite(t.high) for t in self.tuned])
        self._discrete = torch.tensor([t.discrete for t in self.tuned])

    def __len__(self) -> int:
        return len(self.tuned)

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Unconstrained (..., H) -> values in range (continuous)."""
        low, span, bounded = (t.to(u.device) for t in (self._low, self._span, self._bounded))
        return torch.where(bounded, low + span * torch.sigmoid(u), low + F.softplus(u))

    def unproject(self, v: torch.Tensor) -> torch.Tensor:
        low, span, bounded = (t.to(v.device) for t in (self._low, self._span, self._bounded))
        frac = ((v - low) / torch.where(bounded, span, torch.ones_like(span))).clamp(1e-6, 1 - 1e-6)
        shifted = (v - low).clamp_min(1e-6)
        return torch.where(bounded, torch.logit(frac), shifted + torch.log(-torch.expm1(-shifted)))

    def pipeline(self, v: torch.Tensor) -> torch.Tensor:
        """The values the data pipeline uses: discrete ones floored."""
        return torch.where(self._discrete.to(v.device), torch.floor(v + FLOOR_TOLERANCE), v)

    def initial(self) -> torch.Tensor:
        return self.unproject(torch.tensor([t.init for t in self.tuned], dtype=torch.float32))

    def column(self, values: torch.Tensor, name: str) -> torch.Tensor | None:
        i = self.index.get(name)
        return None if i is None else values[..., i]

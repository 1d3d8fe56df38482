"""Task losses and metrics shared by every method: cross-entropy for classification, Gaussian
negative log-likelihood with a learned homoscedastic noise scale for regression. Regression
metrics are reported in the data's units (Splits.y_std)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hypersweep.methods.data import Splits


def gaussian_nll(mean: torch.Tensor, y: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (0.5 * math.log(2 * math.pi) + log_std + 0.5 * ((y - mean) / log_std.exp()) ** 2).mean()


def task_loss(out: torch.Tensor, y: torch.Tensor, task: str, log_noise_std: torch.Tensor) -> torch.Tensor:
    """out (..., n_outputs) against y (...): the training loss, in standardised units."""
    if task == "classification":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return gaussian_nll(out.squeeze(-1), y, log_noise_std)


def metrics(out: torch.Tensor, y: torch.Tensor, splits: Splits, log_noise_std: torch.Tensor | None = None,
            probabilities: bool = False) -> dict[str, float]:
    """`loss` and `error` (classification) or `loss` and `rmse` (regression) of predictions
    `out` (B, n_outputs): logits (or probabilities when `probabilities`), or standardised means."""
    if splits.task == "classification":
        log_p = out.clamp_min(1e-12).log() if probabilities else F.log_softmax(out, -1)
        return {"loss": float(F.nll_loss(log_p, y)), "error": float((out.argmax(-1) != y).float().mean())}
    mean = out.squeeze(-1)
    log_std = log_noise_std if log_noise_std is not None else torch.zeros((), device=out.device)
    nll = float(gaussian_nll(mean, y, log_std)) + math.log(splits.y_std)  # data units
    rmse = float(((mean - y) ** 2).mean().sqrt()) * splits.y_std
    return {"loss": nll, "rmse": rmse}

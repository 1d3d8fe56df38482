"""Ensembles of weight vectors and their Polyak-style distillation, in pure PyTorch.

An ensemble is K flat weight vectors (K, P) of one target net: samples of a generative method,
or K independently trained nets. It is evaluated three ways on a split:
- each member alone (`members`: one error or RMSE per member);
- the mean of the members' probabilities (classification) or means (regression): `mean`;
- the majority vote of the members' predicted classes (ties go to the lowest class): `vote`.
Distillation averages the weights themselves (Polyak averaging over members instead of over
iterates): one net, evaluated the same way. Averaging raw weights only makes sense when the
members sit in one basin; averaging after gauge fixing (methods/diversity.py) first removes
the scale and logit-shift symmetries that make equal functions look different.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from hypersweep.methods.data import Splits
from hypersweep.methods.diversity import gauge_fix
from hypersweep.methods.targets import MLP, SmallCNN, TargetNet


def supports_gauge_fix(target: TargetNet) -> bool:
    """Gauge fixing is defined for the plain ReLU nets (MLP, small CNN), not the normalised resnet."""
    return isinstance(target, (MLP, SmallCNN))


@torch.no_grad()
def member_outputs(target: TargetNet, weights: torch.Tensor, x: torch.Tensor, chunk: int = 1024,
                   member_chunk: int = 64) -> torch.Tensor:
    """(K, N, out) outputs, in chunks of examples and of members (memory), batched within."""
    rows = []
    for xc in x.split(chunk):
        rows.append(torch.cat([target.forward(wc, xc) for wc in weights.split(member_chunk)], dim=0))
    return torch.cat(rows, dim=1)


@torch.no_grad()
def evaluate_ensemble(target: TargetNet, splits: Splits, weights: torch.Tensor, split: str,
                      log_noise_std: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of the members (lists), their mean prediction and (classification) their vote.
    Regression: RMSE in data units, and the NLL of the mixture of the members' Gaussians when
    `log_noise_std` (K,) is given."""
    x, y = (t.to(weights.device) for t in splits.split(split))
    out = member_outputs(target, weights, x)  # (K, N, out)
    if splits.task == "classification":
        log_p = F.log_softmax(out, -1)
        member_err = (out.argmax(-1) != y).float().mean(1)
        member_loss = -log_p.gather(-1, y.expand(out.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)
        mean_p = log_p.exp().mean(0)
        votes = F.one_hot(out.argmax(-1), out.shape[-1]).sum(0)  # (N, classes)
        return {"member_error": member_err.tolist(), "member_loss": member_loss.tolist(),
                "mean_error": float((mean_p.argmax(-1) != y).float().mean()),
                "mean_loss": float(F.nll_loss(mean_p.clamp_min(1e-12).log(), y)),
                "vote_error": float((votes.argmax(-1) != y).float().mean())}
    mean = out.squeeze(-1)  # (K, N), standardised units
    member_rmse = ((mean - y) ** 2).mean(1).sqrt() * splits.y_std
    result = {"member_rmse": member_rmse.tolist(),
              "mean_rmse": float(((mean.mean(0) - y) ** 2).mean().sqrt()) * splits.y_std}
    if log_noise_std is not None:
        std = log_noise_std.to(mean).exp()[:, None]
        log_pdf = -0.5 * math.log(2 * math.pi) - std.log() - 0.5 * ((y - mean) / std) ** 2  # (K, N)
        mixture = torch.logsumexp(log_pdf, 0) - math.log(mean.shape[0])
        result["mean_loss"] = float(-mixture.mean()) + math.log(splits.y_std)
    return result


def polyak_average(target: TargetNet, weights: torch.Tensor, *, gauge: bool, centre_logits: bool = True) -> torch.Tensor:
    """(K, P) -> (P,): the members' mean weights, optionally after gauge fixing each member."""
    if gauge:
        if not supports_gauge_fix(target):
            raise ValueError(f"gauge fixing is not defined for a {type(target).__name__} target")
        weights = gauge_fix(target, weights, centre_logits=centre_logits)
    return weights.mean(0)

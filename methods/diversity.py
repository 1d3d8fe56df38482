"""Gauge fixing and the Kozachenko-Leonenko entropy estimator (Deutsch et al. 2019).

Gauge fixing removes the symmetries that make different weight vectors compute the same
function, so that entropy measures diversity of functions, not of parametrisations:
- ReLU and max-pooling are positively homogeneous, so each hidden neuron's incoming weights and
  bias can be divided by a scale s > 0 if its outgoing weights are multiplied by s. We pick
  s = sqrt((|w_in|^2 + b^2) / (fan_in + 1) + 1e-8), making every hidden neuron's scale 1, and
  carry s into the next layer's fan-in slice (for a conv, the input-channel axis; for the first
  fully connected layer after a conv, the channel's block of the flattened features);
- softmax is invariant to adding a constant to all logits, so the last bias loses its mean.
  (The reference code subtracts the *sum*, which is invertible and removes nothing.)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hypersweep.methods.targets import TargetNet

GAUGE_EPS = 1e-8


def _layers(target: TargetNet) -> list[tuple[str, str]]:
    names = target.spec.names
    return [(names[i], names[i + 1]) for i in range(0, len(names), 2)]


def gauge_fix(target: TargetNet, weights: torch.Tensor, *, eps: float = GAUGE_EPS, return_scales: bool = False,
              centre_logits: bool = True, flat: bool = True):
    """(S, P) -> (S, P) computing the same function, every hidden neuron at scale 1 and the
    logits' bias centred. With `return_scales`, also the scales (S, n) divided out per layer.
    `eps` guards the square root (the reference's 1e-8); with it, scales come out at
    sqrt(m / (m + eps)) for a neuron of mean square m, i.e. 1 unless the neuron is tiny.
    `centre_logits=False` for regression outputs, which no softmax makes shift-invariant.
    `flat=False` returns the parameter tensors as a list of (S, size) parts in spec order instead
    of their concatenation, for sums over coordinates (L1 distances) that need no (S, P) copy."""
    p = dict(target.spec.unflatten(weights))
    layers = _layers(target)
    S = weights.shape[0]
    scales = []
    for (w_name, b_name), (w_next, _) in zip(layers[:-1], layers[1:]):
        w, b = p[w_name], p[b_name]  # (S, out, fan_in...), (S, out)
        out = w.shape[1]
        fan_in = w[0, 0].numel()
        s = ((w.reshape(S, out, -1).pow(2).sum(-1) + b.pow(2)) / (fan_in + 1) + eps).sqrt()  # (S, out)
        p[w_name] = w / s.reshape(S, out, *[1] * (w.dim() - 2))
        p[b_name] = b / s
        nxt = p[w_next]  # its fan-in groups by this layer's neurons: (S, out_next, out, rest)
        p[w_next] = (nxt.reshape(S, nxt.shape[1], out, -1) * s[:, None, :, None]).reshape(nxt.shape)
        scales.append(s)
    last_bias = layers[-1][1]
    if centre_logits:
        p[last_bias] = p[last_bias] - p[last_bias].mean(-1, keepdim=True)
    fixed = target.spec.flatten(p) if flat else [p[n].reshape(S, -1) for n in target.spec.names]
    return (fixed, scales) if return_scales else fixed


def log_unit_ball_volume(d: int, p: float) -> float:
    """log volume of the unit ball of the L_p norm in d dimensions."""
    return d * math.log(2 * math.gamma(1 / p + 1)) - math.lgamma(d / p + 1)


def _parts(samples: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not parts:
        raise ValueError("no samples: an empty list of parts")
    return parts


@torch.no_grad()
def neighbours(samples: torch.Tensor | Sequence[torch.Tensor], *, p: float = 1.0, k: int = 1) -> torch.Tensor:
    """(N,) index of each sample's k-th nearest other sample in L_p distance. `samples` (N, D),
    or a list of parts (N, D_j) whose concatenation along the last axis is the samples.

    The estimator's value and gradient depend on N distances only, so the N x N search runs
    without autograd and only the chosen pairs are differentiated: the same result as
    differentiating through the full distance matrix and top-k (which pass gradient to the
    chosen entries alone), at N instead of N^2 vector-lengths of backward work."""
    parts = _parts(samples)
    N = parts[0].shape[0]
    if p == 1:
        # L1 is a sum over coordinates: each pair once, row by row, over blocks of each part's
        # columns that stay in cache (~4 MB): 32 samples of 478 k weights, 56 ms against 322 ms
        # unblocked and 225 ms for cdist's L1 path on the 2-core CPU here (the sums' order
        # changes; relative error ~1e-7).
        dist = parts[0].new_zeros(N, N)
        width = max(1024, (1 << 20) // N)
        for part in parts:
            for start in range(0, part.shape[1], width):
                block = part[:, start:start + width].contiguous()  # (N, width)
                for i in range(N - 1):
                    dist[i, i + 1:] += (block[i + 1:] - block[i]).abs_().sum(1)
        dist = dist + dist.T
    else:
        flat = torch.cat(parts, 1)
        dist = torch.cdist(flat, flat, p=p)  # (N, N)
    dist.fill_diagonal_(math.inf)  # exclude the self-match
    return dist.topk(k, dim=1, largest=False).indices[:, -1]


def mean_log_distance(parts: Sequence[torch.Tensor], nearest: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """mean_i log(rho_i + 1e-8), rho_i the L_p distance from sample i to sample nearest[i], the
    samples given as parts (N, D_j) along their last axis."""
    # ||x||_p is the L_p norm of the parts' norms (for p = inf too: their largest).
    norms = [torch.linalg.vector_norm(part - part[nearest], ord=p, dim=1) for part in parts]
    rho = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), ord=p, dim=0)
    return torch.log(rho + 1e-8).mean()


def kozachenko_leonenko(samples: torch.Tensor | Sequence[torch.Tensor], *, p: float = 1.0, k: int = 1,
                        dim: int | None = None, constants: bool = True,
                        log_distance: Callable[..., torch.Tensor] = mean_log_distance) -> torch.Tensor:
    """Nearest-neighbour entropy estimate of the distribution of `samples` (N, D), given whole or
    as a list of parts (N, D_j) along D (for p = 1, no (N, D) concatenation is built then):

        H = psi(N) - psi(k) + log V_d + d * mean_i log(rho_i + 1e-8)

    rho_i: L_p distance to the k-th nearest other sample. `dim` replaces d in the last term (and
    V_d), as Deutsch et al. do with the latent dimension: the generated weights live on a
    manifold of at most that dimension. `constants=False` keeps psi(N) and drops
    -psi(k) + log V_d, as the reference training loss does (they do not change gradients).
    `log_distance`: `mean_log_distance` or a compiled version of it (hyper-diverse's option)."""
    parts = _parts(samples)
    N = parts[0].shape[0]
    d = sum(part.shape[1] for part in parts) if dim is None else dim
    h = d * log_distance(parts, neighbours(parts, p=p, k=k), p) + torch.special.digamma(torch.tensor(float(N)))
    if constants:
        h = h - torch.special.digamma(torch.tensor(float(k))) + log_unit_ball_volume(d, p)
    return h

"""Target networks, described by a parameter spec and evaluated on a batch of weight vectors.

A target net has two faces that compute the same function:
- `module()`: an ordinary nn.Module whose named parameters are exactly the spec's entries, for
  plain training (`sgd`);
- `forward(weights, x)`: the functional path, evaluating S flat weight vectors (S, P) at once on
  a shared batch x (B, ...) or on one batch per sample (S, B, ...), giving (S, B, out). There is
  no Python loop over samples: linear layers are batched matmuls, convolutions are grouped
  convolutions with one group per sample.

Dropout and Gaussian input noise draw from an explicit `torch.Generator`, so the two paths give
the same numbers for S = 1 with the same generator state, and checkpoints restore them exactly.
Dropout sites: 0 is the input, k is the output of hidden layer k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a target's parameters, in the order of the flat weight vector."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def flat_size(self) -> int:
        return sum(self.sizes)

    def unflatten(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """(S, P) -> {name: (S, *shape)} as views."""
        chunks = torch.split(weights, self.sizes, dim=1)
        return {n: c.reshape(weights.shape[0], *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (S, *shape)} -> (S, P)."""
        return torch.cat([params[n].reshape(params[n].shape[0], -1) for n in self.names], dim=1)


class Regularisation(nn.Module):
    """Gaussian input noise and dropout at each site, drawing from an explicit generator."""

    def __init__(self, n_sites: int):
        super().__init__()
        self.n_sites = n_sites
        self.dropout = [0.0] * n_sites
        self.input_noise = 0.0
        self.generator: torch.Generator | None = None

    def configure(self, *, dropout: Sequence[float], input_noise: float, generator: torch.Generator | None):
        if len(dropout) != self.n_sites:
            raise ValueError(f"expected {self.n_sites} dropout rates (input + hidden layers), got {len(dropout)}")
        self.dropout, self.input_noise, self.generator = list(dropout), float(input_noise), generator

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.input_noise == 0.0:
            return x
        return x + self.input_noise * torch.randn(x.shape, generator=self.generator, device=x.device)

    def drop(self, x: torch.Tensor, site: int) -> torch.Tensor:
        return sample_dropout(x, self.dropout[site], self.training, self.generator)


def sample_dropout(x, p, training, generator):
    """Inverted dropout whose mask comes from `generator` (nn.Dropout draws from the global RNG)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)


class TargetNet:
    """Base class: `spec`, `module()`, `forward(weights, x, ...)`."""
    spec: ParamSpec
    n_dropout_sites: int

    def module(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, weights: torch.Tensor, x: torch.Tensor, *, dropout: Sequence[float] | None = None,
                input_noise: float = 0.0, training: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """weights (S, P), x (B, ...) or (S, B, ...) -> (S, B, n_outputs)."""
        raise NotImplementedError

    def init_bounds(self) -> torch.Tensor:
        """(P,) PyTorch's default init bound 1/sqrt(fan_in) of the layer each weight belongs to
        (a bias uses its layer's weight fan-in)."""
        parts, fan_in = [], 1
        for name, shape in zip(self.spec.names, self.spec.shapes):
            if not name.endswith(".bias"):
                fan_in = math.prod(shape[1:])
            parts.append(torch.full((math.prod(shape),), 1.0 / math.sqrt(fan_in)))
        return torch.cat(parts)

    def init_weights(self, generator: torch.Generator) -> torch.Tensor:
        """A flat (P,) draw of PyTorch's default initialisation, U(+-1/sqrt(fan_in)) for weights
        and biases, from an explicit generator instead of the global one."""
        bounds = self.init_bounds()
        return (torch.rand(bounds.shape, generator=generator) * 2 - 1) * bounds

    def flat_weights(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters as one flat vector (P,), in spec order."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.spec.names])

    def load_flat(self, module: nn.Module, flat: torch.Tensor) -> None:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, w in self.spec.unflatten(flat.reshape(1, -1)).items():
                params[name].copy_(w[0])

    def _regularise(self, h, site, dropout, training, generator):
        return sample_dropout(h, dropout[site], training, generator) if dropout is not None else h

    def _input(self, x, S, input_noise, dropout, training, generator, per_sample_ndim):
        """Noise and input dropout applied per sample: returns x (B, ...) when untouched and
        shared, else (S, B, ...)."""
        shared = x.dim() == per_sample_ndim
        regularised = training and (input_noise > 0 or (dropout is not None and dropout[0] > 0))
        if shared and not regularised:
            return x
        if shared:
            x = x.unsqueeze(0).expand(S, *x.shape)
        if training and input_noise > 0:
            x = x + input_noise * torch.randn(x.shape, generator=generator, device=x.device)
        return self._regularise(x, 0, dropout, training, generator)


def _linear_shared(x, w, b):
    """x (B, in), w (S, out, in), b (S, out) -> (S, B, out) as one GEMM over all samples."""
    S, out, _ = w.shape
    y = x @ w.reshape(S * out, -1).T  # (B, S*out)
    return y.reshape(x.shape[0], S, out).transpose(0, 1) + b.unsqueeze(1)


def _linear(h, w, b):
    """h (S, B, in) or (B, in) -> (S, B, out)."""
    if h.dim() == 2:
        return _linear_shared(h, w, b)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class MLP(TargetNet):
    """in -> hidden... -> out with ReLU."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], n_outputs: int):
        self.input_shape = tuple(input_shape)
        self.in_features = math.prod(self.input_shape)
        self.hidden = tuple(hidden)
        self.n_outputs = n_outputs
        dims = (self.in_features, *self.hidden, n_outputs)
        names, shapes = [], []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            names += [f"layers.{i}.weight", f"layers.{i}.bias"]
            shapes += [(d_out, d_in), (d_out,)]
        self.spec = ParamSpec(tuple(names), tuple(shapes))
        self.n_dropout_sites = 1 + len(self.hidden)
        self.dims = dims

    def module(self) -> nn.Module:
        return _MLPModule(self.dims)

    def forward(self, weights, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        S = weights.shape[0]
        p = self.spec.unflatten(weights)
        per_sample = x.dim() == len(self.input_shape) + 2
        h = x.reshape(S, x.shape[1], -1) if per_sample else x.reshape(x.shape[0], -1)
        h = self._input(h, S, input_noise, dropout, training, generator, per_sample_ndim=2)
        n_layers = len(self.dims) - 1
        for i in range(n_layers):
            h = _linear(h, p[f"layers.{i}.weight"], p[f"layers.{i}.bias"])
            if i < n_layers - 1:
                h = self._regularise(torch.relu(h), i + 1, dropout, training, generator)
        return h


class _MLPModule(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.reg = Regularisation(len(dims) - 1)

    def forward(self, x):
        h = self.reg.drop(self.reg.noise(x.reshape(x.shape[0], -1)), 0)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.reg.drop(torch.relu(h), i + 1)
        return h


class SmallCNN(TargetNet):
    """The MNIST net of Deutsch et al. 2019: conv5x5 (c1) -> pool2 -> conv5x5 (c2) -> pool2 ->
    fc (f1) -> fc (out), ReLU, 'same' padding; 20,018 weights on MNIST with the defaults."""

    def __init__(self, input_shape: Sequence[int], n_outputs: int, channels: Sequence[int] = (32, 16),
                 fc_hidden: int = 8, kernel_size: int = 5):
        self.input_shape = tuple(input_shape)
        C, H, W = self.input_shape
        c1, c2 = channels
        k = kernel_size
        self.kernel_size, self.channels, self.fc_hidden, self.n_outputs = k, (c1, c2), fc_hidden, n_outputs
        self.flat_features = c2 * (H // 4) * (W // 4)
        self.spec = ParamSpec(
            ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"),
            ((c1, C, k, k), (c1,), (c2, c1, k, k), (c2,), (fc_hidden, self.flat_features), (fc_hidden,),
             (n_outputs, fc_hidden), (n_outputs,)))
        self.n_dropout_sites = 4  # input, after conv1 block, after conv2 block, after fc1

    def module(self) -> nn.Module:
        return _SmallCNNModule(self)

    def forward(self, weights, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        S = weights.shape[0]
        p = self.spec.unflatten(weights)
        pad = self.kernel_size // 2
        x = self._input(x, S, input_noise, dropout, training, generator, per_sample_ndim=4)
        if x.dim() == 4:  # shared (B, C, H, W): one ordinary conv with the S filter banks stacked
            h = F.conv2d(x, p["conv1.weight"].flatten(0, 1), p["conv1.bias"].flatten(), padding=pad)
        else:  # (S, B, C, H, W) -> (B, S*C, H, W), one group per sample
            B = x.shape[1]
            h = F.conv2d(x.transpose(0, 1).reshape(B, -1, *x.shape[3:]), p["conv1.weight"].flatten(0, 1),
                         p["conv1.bias"].flatten(), padding=pad, groups=S)
        h = F.max_pool2d(torch.relu(h), 2)  # (B, S*c1, H/2, W/2)
        h = self._drop_maps(h, S, 1, dropout, training, generator)
        h = F.conv2d(h, p["conv2.weight"].flatten(0, 1), p["conv2.bias"].flatten(), padding=pad, groups=S)
        h = F.max_pool2d(torch.relu(h), 2)  # (B, S*c2, H/4, W/4)
        h = self._drop_maps(h, S, 2, dropout, training, generator)
        B = h.shape[0]
        h = h.reshape(B, S, -1).transpose(0, 1)  # (S, B, c2*H/4*W/4)
        h = torch.relu(_linear(h, p["fc1.weight"], p["fc1.bias"]))
        h = self._regularise(h, 3, dropout, training, generator)
        return _linear(h, p["fc2.weight"], p["fc2.bias"])

    def _drop_maps(self, h, S, site, dropout, training, generator):
        if dropout is None or not training or dropout[site] == 0:
            return h
        # Draw the mask in (S, B, ...) order so S = 1 matches the module's (B, ...) draw.
        B = h.shape[0]
        h5 = h.reshape(B, S, -1, *h.shape[2:]).transpose(0, 1)
        h5 = sample_dropout(h5, dropout[site], training, generator)
        return h5.transpose(0, 1).reshape(h.shape)


class _SmallCNNModule(nn.Module):
    def __init__(self, net: SmallCNN):
        super().__init__()
        C = net.input_shape[0]
        (c1, c2), k = net.channels, net.kernel_size
        self.conv1 = nn.Conv2d(C, c1, k, padding=k // 2)
        self.conv2 = nn.Conv2d(c1, c2, k, padding=k // 2)
        self.fc1 = nn.Linear(net.flat_features, net.fc_hidden)
        self.fc2 = nn.Linear(net.fc_hidden, net.n_outputs)
        self.reg = Regularisation(net.n_dropout_sites)

    def forward(self, x):
        h = self.reg.drop(self.reg.noise(x), 0)
        h = self.reg.drop(F.max_pool2d(torch.relu(self.conv1(h)), 2), 1)
        h = self.reg.drop(F.max_pool2d(torch.relu(self.conv2(h)), 2), 2)
        h = self.reg.drop(torch.relu(self.fc1(h.flatten(1))), 3)
        return self.fc2(h)


TARGETS = {"mlp": MLP, "cnn": SmallCNN}


def n_dropout_sites(kind: str, hidden: Sequence[int] = ()) -> int:
    """Dropout sites of a target before it is built (input + one per hidden layer)."""
    return 1 + len(hidden) if kind == "mlp" else 4


def build_target(kind: str, input_shape: Sequence[int], n_outputs: int, **options) -> TargetNet:
    """`kind` from TARGETS; options: `hidden` for the MLP, `channels`/`fc_hidden`/`kernel_size` for the CNN."""
    if kind not in TARGETS:
        raise ValueError(f"unknown model {kind!r}; valid: {', '.join(sorted(TARGETS))}")
    if kind == "mlp":
        return MLP(input_shape, options.get("hidden", (400, 400)), n_outputs)
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return SmallCNN(input_shape, n_outputs, **{k: v for k, v in options.items() if k != "hidden"})

"""Best-response layers and the STN versions of the target nets (MacKay et al. 2019).

A best-response layer computes, for an example x with hyperparameter input h (one row per
example, so every example has its own hyperparameters at no extra cost):

    StnLinear:  y = (W x + b) + (V h) * (W_h x) + (C h) * b_h
    StnConv2d:  the same with convolutions, (V h) and (C h) scaling output channels

W, b are the elementary ("general") weights; W_h, b_h and the bottleneck [V; C] (no bias)
form the hyper path ("response" weights). The bottleneck starts at N(0, 0.01^2) (STN) or at
zero (Delta-STN), so the hyper path starts near or at zero.

The nets take (x, h, dropout, training, generator): `dropout` (B, n_sites) per-example rates
(detached by the caller: the hypergradient flows only through h, as in the reference code),
site 0 the input and the others as in methods/targets.py. Input noise and augmentation are the
caller's (methods/stn.py), applied to x before.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hypersweep.methods.targets import MLP, AlexNet, SmallCNN, TargetNet

BOTTLENECK_STD = 0.01


class _BestResponse(nn.Module):
    def _init(self, fan_in: int, weight_shape, out: int, n_hparams: int, zero_bottleneck: bool,
              generator: torch.Generator):
        bound = 1.0 / math.sqrt(fan_in)
        uniform = (lambda shape: (torch.rand(shape, generator=generator) * 2 - 1) * bound)
        self.weight = nn.Parameter(uniform(weight_shape))
        self.bias = nn.Parameter(uniform((out,)))
        self.hyper_weight = nn.Parameter(uniform(weight_shape))
        self.hyper_bias = nn.Parameter(uniform((out,)))
        start = torch.zeros(2 * out, n_hparams) if zero_bottleneck else \
            torch.randn((2 * out, n_hparams), generator=generator) * BOTTLENECK_STD
        self.bottleneck = nn.Parameter(start)  # rows: V (out) then C (out)

    def general(self) -> list[nn.Parameter]:
        return [self.weight, self.bias]

    def response(self) -> list[nn.Parameter]:
        return [self.hyper_weight, self.hyper_bias, self.bottleneck]

    def scales(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = h @ self.bottleneck.T  # (B, 2 out)
        return e.chunk(2, dim=-1)


class StnLinear(_BestResponse):
    def __init__(self, in_features: int, out_features: int, n_hparams: int, *, zero_bottleneck: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self._init(in_features, (out_features, in_features), out_features, n_hparams, zero_bottleneck,
                   generator or torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        e_w, e_b = self.scales(h)
        return F.linear(x, self.weight, self.bias) + e_w * F.linear(x, self.hyper_weight) + e_b * self.hyper_bias


class StnConv2d(_BestResponse):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_hparams: int, *, stride: int = 1,
                 padding: int = 0, zero_bottleneck: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.stride, self.padding = stride, padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self._init(in_channels * kernel_size ** 2, shape, out_channels, n_hparams, zero_bottleneck,
                   generator or torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        e_w, e_b = self.scales(h)
        conv = (lambda w, b=None: F.conv2d(x, w, b, stride=self.stride, padding=self.padding))
        return conv(self.weight, self.bias) + e_w[..., None, None] * conv(self.hyper_weight) \
            + (e_b * self.hyper_bias)[..., None, None]


def per_example_dropout(x: torch.Tensor, p: torch.Tensor | None, training: bool,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with one rate per example: p (B,)."""
    if not training or p is None:
        return x
    p = p.reshape(-1, *(1,) * (x.dim() - 1))
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)


class StnNet(nn.Module):
    """Base: `layers` of best-response layers; `general()` / `response()` parameter lists."""
    layers: nn.ModuleList
    n_sites: int

    def general(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.general()]

    def response(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.response()]

    def _drop(self, x, dropout, site, training, generator):
        return per_example_dropout(x, None if dropout is None else dropout[:, site], training, generator)


class StnMLP(StnNet):
    def __init__(self, target: MLP, n_hparams: int, zero_bottleneck: bool, generator: torch.Generator):
        super().__init__()
        dims = target.dims
        self.layers = nn.ModuleList(StnLinear(a, b, n_hparams, zero_bottleneck=zero_bottleneck, generator=generator)
                                    for a, b in zip(dims[:-1], dims[1:]))
        self.n_sites = target.n_dropout_sites

    def forward(self, x, h, dropout=None, training=False, generator=None):
        z = self._drop(x.reshape(x.shape[0], -1), dropout, 0, training, generator)
        for i, layer in enumerate(self.layers):
            z = layer(z, h)
            if i < len(self.layers) - 1:
                z = self._drop(torch.relu(z), dropout, i + 1, training, generator)
        return z


class StnSmallCNN(StnNet):
    def __init__(self, target: SmallCNN, n_hparams: int, zero_bottleneck: bool, generator: torch.Generator):
        super().__init__()
        C = target.input_shape[0]
        (c1, c2), k = target.channels, target.kernel_size
        kw = dict(zero_bottleneck=zero_bottleneck, generator=generator)
        self.layers = nn.ModuleList([StnConv2d(C, c1, k, n_hparams, padding=k // 2, **kw),
                                     StnConv2d(c1, c2, k, n_hparams, padding=k // 2, **kw),
                                     StnLinear(target.flat_features, target.fc_hidden, n_hparams, **kw),
                                     StnLinear(target.fc_hidden, target.n_outputs, n_hparams, **kw)])
        self.n_sites = target.n_dropout_sites

    def forward(self, x, h, dropout=None, training=False, generator=None):
        z = self._drop(x, dropout, 0, training, generator)
        z = self._drop(F.max_pool2d(torch.relu(self.layers[0](z, h)), 2), dropout, 1, training, generator)
        z = self._drop(F.max_pool2d(torch.relu(self.layers[1](z, h)), 2), dropout, 2, training, generator)
        z = self._drop(torch.relu(self.layers[2](z.flatten(1), h)), dropout, 3, training, generator)
        return self.layers[3](z, h)


class StnAlexNet(StnNet):
    def __init__(self, target: AlexNet, n_hparams: int, zero_bottleneck: bool, generator: torch.Generator):
        super().__init__()
        kw = dict(zero_bottleneck=zero_bottleneck, generator=generator)
        C = target.input_shape[0]
        layers = []
        for out, k, stride, pad in target.CONV:
            layers.append(StnConv2d(C, out, k, n_hparams, stride=stride, padding=pad, **kw))
            C = out
        dims = (target.flat_features, target.fc_hidden, target.fc_hidden, target.n_outputs)
        layers += [StnLinear(a, b, n_hparams, **kw) for a, b in zip(dims[:-1], dims[1:])]
        self.layers = nn.ModuleList(layers)
        self.pool_after, self.n_convs = target.POOL_AFTER, len(target.CONV)
        self.n_sites = target.n_dropout_sites

    def forward(self, x, h, dropout=None, training=False, generator=None):
        z = self._drop(x, dropout, 0, training, generator)
        for i in range(self.n_convs):
            z = torch.relu(self.layers[i](z, h))
            if i in self.pool_after and min(z.shape[-2:]) >= 2:
                z = F.max_pool2d(z, 2)
            z = self._drop(z, dropout, i + 1, training, generator)
        z = z.flatten(1)
        fcs = self.layers[self.n_convs:]
        for j, layer in enumerate(fcs):
            z = layer(z, h)
            if j < len(fcs) - 1:
                z = self._drop(torch.relu(z), dropout, self.n_convs + 1 + j, training, generator)
        return z


def build_stn_net(target: TargetNet, n_hparams: int, *, zero_bottleneck: bool, generator: torch.Generator) -> StnNet:
    for kind, cls in ((MLP, StnMLP), (SmallCNN, StnSmallCNN), (AlexNet, StnAlexNet)):
        if isinstance(target, kind):
            return cls(target, n_hparams, zero_bottleneck, generator)
    raise ValueError(f"no STN version of a {type(target).__name__} target; valid: mlp, cnn, alexnet")

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

    def forward_rank1(self, base: torch.Tensor, rows: dict[str, torch.Tensor], cols: dict[str, torch.Tensor],
                      x: torch.Tensor, **kw) -> torch.Tensor:
        """Evaluate the S weight vectors `rank1_weights(spec, base, rows, cols)`; targets with a
        faster path (no per-sample weights built) override this."""
        return self.forward(rank1_weights(self.spec, base, rows, cols), x, **kw)

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


def rank1_shapes(spec: ParamSpec) -> dict[str, tuple[int, int]]:
    """Per parameter tensor, the lengths of its row scale (output axis) and column scale (input
    axis; 0 for vectors)."""
    return {n: (s[0], s[1] if len(s) > 1 else 0) for n, s in zip(spec.names, spec.shapes)}


def rank1_weights(spec: ParamSpec, base: torch.Tensor, rows: dict[str, torch.Tensor],
                  cols: dict[str, torch.Tensor]) -> torch.Tensor:
    """(S, P) weights: each tensor of `base` (P,) scaled by rows[name] (S, out) along its output
    axis and cols[name] (S, in) along its input axis (vectors: rows only)."""
    parts = []
    for name, w in spec.unflatten(base.reshape(1, -1)).items():
        r = rows[name]
        w = w * r.reshape(*r.shape, *(1,) * (w.dim() - 2))
        if w.dim() > 2:
            c = cols[name]
            w = w * c.reshape(c.shape[0], 1, c.shape[1], *(1,) * (w.dim() - 3))
        parts.append(w.reshape(w.shape[0], -1))
    return torch.cat(parts, 1)


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


    def forward_rank1(self, base, rows, cols, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        """Rank-1 modulated weights without building them: one GEMM per layer for all samples."""
        S = next(iter(rows.values())).shape[0]
        p = self.spec.unflatten(base.reshape(1, -1))
        per_sample = x.dim() == len(self.input_shape) + 2
        h = x.reshape(S, x.shape[1], -1) if per_sample else x.reshape(x.shape[0], -1)
        h = self._input(h, S, input_noise, dropout, training, generator, per_sample_ndim=2)
        if h.dim() == 2:
            h = h.unsqueeze(0).expand(S, *h.shape)
        n_layers = len(self.dims) - 1
        for i in range(n_layers):
            w, b = f"layers.{i}.weight", f"layers.{i}.bias"
            h = rank1_linear(h, p[w][0], p[b][0], rows[w], cols[w], rows[b])
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

    def forward_rank1(self, base, rows, cols, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        """Rank-1 modulated weights without building them: each conv runs once over all S*B
        examples with the base filters, input channels scaled before, output channels after."""
        S = next(iter(rows.values())).shape[0]
        p = self.spec.unflatten(base.reshape(1, -1))
        x = self._input(x, S, input_noise, dropout, training, generator, per_sample_ndim=4)
        if x.dim() == 4:
            x = x.unsqueeze(0).expand(S, *x.shape)
        B, pad = x.shape[1], self.kernel_size // 2

        def conv(h, name):  # h (S, B, C, H, W)
            c, r, rb = cols[f"{name}.weight"], rows[f"{name}.weight"], rows[f"{name}.bias"]
            h = (h * c[:, None, :, None, None]).flatten(0, 1)
            h = F.conv2d(h, p[f"{name}.weight"][0], padding=pad).reshape(S, B, -1, *h.shape[2:])
            return h * r[:, None, :, None, None] + (p[f"{name}.bias"][0] * rb)[:, None, :, None, None]

        h = torch.relu(conv(x, "conv1"))
        h = F.max_pool2d(h.flatten(0, 1), 2)
        h = self._regularise(h.reshape(S, B, *h.shape[1:]), 1, dropout, training, generator)
        h = F.max_pool2d(torch.relu(conv(h, "conv2")).flatten(0, 1), 2)
        h = self._regularise(h.reshape(S, B, -1), 2, dropout, training, generator)
        w, b = "fc1.weight", "fc1.bias"
        h = torch.relu(rank1_linear(h, p[w][0], p[b][0], rows[w], cols[w], rows[b]))
        h = self._regularise(h, 3, dropout, training, generator)
        w, b = "fc2.weight", "fc2.bias"
        return rank1_linear(h, p[w][0], p[b][0], rows[w], cols[w], rows[b])

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


class WideResNet(TargetNet):
    """A pre-activation wide residual network for images (Zagoruyko & Komodakis 2016):
    conv3x3(16) -> 3 stages of n blocks, widths 16k, 32k, 64k, strides 1, 2, 2 -> norm, ReLU,
    global average pool -> linear. depth = 6n + 4: WRN-16-4 is (16, 4); (22, 1) is close to
    the CIFAR ResNet-20. Each block: norm-ReLU-conv3x3-norm-ReLU-dropout-conv3x3, plus the identity or a
    1x1 projection of the pre-activated input when the shape changes. Convolutions have no bias.

    Normalisation is GroupNorm, not BatchNorm: batch norm's running statistics belong to one
    weight vector, and a distribution of weights would need one set per sample; group norm
    normalises each example on its own, so it is the same function for any number of weight
    samples, in training and at test time. Dropout sites: 0 the input, 1 inside every block."""

    def __init__(self, input_shape: Sequence[int], n_outputs: int, depth: int = 16, width: int = 4,
                 norm_groups: int = 8):
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        self.input_shape, self.n_outputs = tuple(input_shape), n_outputs
        self.depth, self.width, self.norm_groups = depth, width, norm_groups
        widths = (16, 16 * width, 32 * width, 64 * width)
        if any(w % norm_groups for w in widths):
            raise ValueError(f"resnet norm_groups {norm_groups} must divide every width {widths}")
        names, shapes = ["conv0.weight"], [(16, self.input_shape[0], 3, 3)]
        self.blocks: list[tuple[int, int, int]] = []  # (in, out, stride)
        c_in = 16
        for stage, (c_out, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for j in range((depth - 4) // 6):
                self.blocks.append((c_in, c_out, stride if j == 0 else 1))
                c_in = c_out
        for i, (a, b, stride) in enumerate(self.blocks):
            names += [f"blocks.{i}.norm1.weight", f"blocks.{i}.norm1.bias", f"blocks.{i}.conv1.weight",
                      f"blocks.{i}.norm2.weight", f"blocks.{i}.norm2.bias", f"blocks.{i}.conv2.weight"]
            shapes += [(a,), (a,), (b, a, 3, 3), (b,), (b,), (b, b, 3, 3)]
            if a != b or stride != 1:
                names.append(f"blocks.{i}.shortcut.weight")
                shapes.append((b, a, 1, 1))
        names += ["norm.weight", "norm.bias", "fc.weight", "fc.bias"]
        shapes += [(c_in,), (c_in,), (n_outputs, c_in), (n_outputs,)]
        self.spec = ParamSpec(tuple(names), tuple(shapes))
        self.n_dropout_sites = 2

    @staticmethod
    def is_norm(name: str) -> bool:
        return ".norm" in name or name.startswith("norm.")

    def init_bounds(self) -> torch.Tensor:
        """Convolutions and the linear layer as in the base class; norm parameters 0 (they
        start at exactly 1 and 0, see init_weights)."""
        bounds = super().init_bounds()
        for name, chunk in zip(self.spec.names, torch.split(bounds, self.spec.sizes)):
            if self.is_norm(name):
                chunk.zero_()
        return bounds

    def init_weights(self, generator: torch.Generator) -> torch.Tensor:
        w = super().init_weights(generator)
        for name, chunk in zip(self.spec.names, torch.split(w, self.spec.sizes)):
            if self.is_norm(name):
                chunk.fill_(1.0 if name.endswith(".weight") else 0.0)
        return w

    def module(self) -> nn.Module:
        return _WideResNetModule(self)

    def forward(self, weights, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        S = weights.shape[0]
        x = self._input(x, S, input_noise, dropout, training, generator, per_sample_ndim=4)
        return self._body(_GroupedOps(self.spec.unflatten(weights), S, self.norm_groups), x, dropout, training, generator)

    def forward_rank1(self, base, rows, cols, x, **kw):
        """The rank-1 modulated weights `base * rows[name] (x) cols[name]` without building them:
        every convolution runs once over all S*B examples with the base weights, the input
        channels scaled by `cols` before and the output channels by `rows` after (exact, since a
        convolution is linear in each input channel). The cost is one ordinary forward pass."""
        S = next(iter(rows.values())).shape[0]
        x = self._input(x, S, kw.get("input_noise", 0.0), kw.get("dropout"), kw.get("training", False),
                        kw.get("generator"), per_sample_ndim=4)
        if x.dim() == 4:
            x = x.unsqueeze(0).expand(S, *x.shape)
        ops = _Rank1Ops(self.spec.unflatten(base.reshape(1, -1)), rows, cols, S, self.norm_groups)
        return self._body(ops, x.reshape(-1, *x.shape[2:]), kw.get("dropout"), kw.get("training", False),
                          kw.get("generator"))

    def _body(self, ops, h, dropout, training, generator):
        h = ops.conv(h, "conv0.weight", 1, 1, shared_input=True)
        for i, (a, b, stride) in enumerate(self.blocks):
            o = torch.relu(ops.norm(h, f"blocks.{i}.norm1"))
            shortcut = ops.conv(o, f"blocks.{i}.shortcut.weight", stride, 0) if a != b or stride != 1 else h
            o = torch.relu(ops.norm(ops.conv(o, f"blocks.{i}.conv1.weight", stride, 1), f"blocks.{i}.norm2"))
            if dropout is not None:
                o = sample_dropout(o, dropout[1], training, generator)
            h = ops.conv(o, f"blocks.{i}.conv2.weight", 1, 1) + shortcut
        h = torch.relu(ops.norm(h, "norm"))
        return ops.linear(ops.pool(h), "fc")


class _GroupedOps:
    """Per-sample weights (S, ...): activations (B, S*C, H, W), one conv group per sample."""

    def __init__(self, p, S, norm_groups):
        self.p, self.S, self.G = p, S, norm_groups

    def conv(self, h, name, stride, padding, shared_input=False):
        w = self.p[name]  # (S, out, in, k, k)
        if shared_input and h.dim() == 4:  # (B, C, H, W) shared by every sample: stacked filter banks
            return F.conv2d(h, w.flatten(0, 1), stride=stride, padding=padding)
        if h.dim() == 5:  # (S, B, C, H, W)
            h = h.transpose(0, 1).reshape(h.shape[1], -1, *h.shape[3:])
        return F.conv2d(h, w.flatten(0, 1), stride=stride, padding=padding, groups=self.S)

    def norm(self, h, name):
        return F.group_norm(h, self.S * self.G, self.p[f"{name}.weight"].flatten(), self.p[f"{name}.bias"].flatten())

    def pool(self, h):
        B = h.shape[0]
        return h.mean((2, 3)).reshape(B, self.S, -1).transpose(0, 1)  # (S, B, C)

    def linear(self, h, name):
        return _linear(h, self.p[f"{name}.weight"], self.p[f"{name}.bias"])


class _Rank1Ops:
    """Base weights with per-sample row/column scales: activations (S*B, C, H, W)."""

    def __init__(self, base, rows, cols, S, norm_groups):
        self.base, self.rows, self.cols, self.S, self.G = base, rows, cols, S, norm_groups

    def _scale(self, h, s):  # h (S*B, C, ...) times s (S, C) per sample
        shape = (self.S, -1, s.shape[1]) + (1,) * (h.dim() - 2)
        return (h.reshape(self.S, -1, *h.shape[1:]) * s.reshape(shape)).reshape(h.shape)

    def conv(self, h, name, stride, padding, shared_input=False):
        h = F.conv2d(self._scale(h, self.cols[name]), self.base[name][0], stride=stride, padding=padding)
        return self._scale(h, self.rows[name])

    def norm(self, h, name):
        w, b = (self.base[f"{name}.{k}"][0] * self.rows[f"{name}.{k}"] for k in ("weight", "bias"))  # (S, C)
        h = F.group_norm(h, self.G).reshape(self.S, -1, *h.shape[1:])
        return (h * w[:, None, :, None, None] + b[:, None, :, None, None]).flatten(0, 1)

    def pool(self, h):
        return h.mean((2, 3)).reshape(self.S, -1, h.shape[1])  # (S, B, C)

    def linear(self, h, name):
        return rank1_linear(h, self.base[f"{name}.weight"][0], self.base[f"{name}.bias"][0],
                            self.rows[f"{name}.weight"], self.cols[f"{name}.weight"], self.rows[f"{name}.bias"])


def rank1_linear(h, w, b, row, col, bias_row):
    """h (S, B, in) through the weights w * row (x) col (per sample) and bias b * bias_row:
    ((h * col) @ w.T) * row + b * bias_row, one GEMM for all samples."""
    return (h * col.unsqueeze(1)) @ w.T * row.unsqueeze(1) + (b * bias_row).unsqueeze(1)


class _WideResNetModule(nn.Module):
    def __init__(self, net: WideResNet):
        super().__init__()
        G = net.norm_groups
        self.net = [net]  # a list: not a submodule
        self.conv0 = nn.Conv2d(net.input_shape[0], 16, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        for a, b, stride in net.blocks:
            block = nn.Module()
            block.norm1, block.conv1 = nn.GroupNorm(G, a), nn.Conv2d(a, b, 3, stride, 1, bias=False)
            block.norm2, block.conv2 = nn.GroupNorm(G, b), nn.Conv2d(b, b, 3, 1, 1, bias=False)
            if a != b or stride != 1:
                block.shortcut = nn.Conv2d(a, b, 1, stride, bias=False)
            self.blocks.append(block)
        self.norm = nn.GroupNorm(G, net.blocks[-1][1])
        self.fc = nn.Linear(net.blocks[-1][1], net.n_outputs)
        self.reg = Regularisation(net.n_dropout_sites)

    def forward(self, x):
        h = self.conv0(self.reg.drop(self.reg.noise(x), 0))
        for block in self.blocks:
            o = torch.relu(block.norm1(h))
            shortcut = block.shortcut(o) if hasattr(block, "shortcut") else h
            o = self.reg.drop(torch.relu(block.norm2(block.conv1(o))), 1)
            h = block.conv2(o) + shortcut
        return self.fc(torch.relu(self.norm(h)).mean((2, 3)))


class AlexNet(TargetNet):
    """The AlexNet-style CIFAR net of the STN experiments (MacKay et al. 2019): conv 5x5/2 (64) -
    pool - conv 5x5 (192) - pool - conv 3x3 (384, 256, 256) - pool - fc 4096 - fc 4096 - out,
    ReLU; 32x32 inputs give 1024 features before the first fc (23M weights: a GPU target).
    Dropout sites: 0 the input, 1-5 after each conv block, 6-7 after each hidden fc.

    The functional face evaluates S weight vectors with torch.func.functional_call + vmap over
    the module (no dropout or input noise there; the generative methods use the MLP, the small
    CNN or the resnet)."""

    CONV = ((64, 5, 2, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))  # out, k, stride, pad
    POOL_AFTER = (0, 1, 4)

    def __init__(self, input_shape: Sequence[int], n_outputs: int, fc_hidden: int = 4096):
        self.input_shape, self.n_outputs, self.fc_hidden = tuple(input_shape), n_outputs, fc_hidden
        C, H, W = self.input_shape
        names, shapes = [], []
        for i, (out, k, stride, pad) in enumerate(self.CONV):
            names += [f"convs.{i}.weight", f"convs.{i}.bias"]
            shapes += [(out, C, k, k), (out,)]
            C = out
            H, W = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
            if i in self.POOL_AFTER:
                H, W = max(H // 2, 1), max(W // 2, 1)
        self.flat_features = C * H * W
        dims = (self.flat_features, fc_hidden, fc_hidden, n_outputs)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            names += [f"fcs.{i}.weight", f"fcs.{i}.bias"]
            shapes += [(b, a), (b,)]
        self.spec = ParamSpec(tuple(names), tuple(shapes))
        self.n_dropout_sites = 8
        self._functional_module = None

    def module(self) -> nn.Module:
        return _AlexNetModule(self)

    def forward(self, weights, x, *, dropout=None, input_noise=0.0, training=False, generator=None):
        if training and (input_noise > 0 or (dropout is not None and any(dropout))):
            raise NotImplementedError("the alexnet target's functional face has no dropout or input noise")
        from torch.func import functional_call, vmap
        if self._functional_module is None:
            self._functional_module = self.module().eval()
        module = self._functional_module
        params = self.spec.unflatten(weights)
        per_sample = x.dim() == len(self.input_shape) + 2
        return vmap(lambda p, xb: functional_call(module, p, (xb,)), in_dims=(0, 0 if per_sample else None))(params, x)


class _AlexNetModule(nn.Module):
    def __init__(self, net: AlexNet):
        super().__init__()
        C = net.input_shape[0]
        self.convs = nn.ModuleList()
        for out, k, stride, pad in net.CONV:
            self.convs.append(nn.Conv2d(C, out, k, stride, pad))
            C = out
        dims = (net.flat_features, net.fc_hidden, net.fc_hidden, net.n_outputs)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.pool_after = net.POOL_AFTER
        self.reg = Regularisation(net.n_dropout_sites)

    def forward(self, x):
        h = self.reg.drop(self.reg.noise(x), 0)
        for i, conv in enumerate(self.convs):
            h = torch.relu(conv(h))
            if i in self.pool_after:
                h = F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h
            h = self.reg.drop(h, i + 1)
        h = h.flatten(1)
        for i, fc in enumerate(self.fcs):
            h = fc(h)
            if i < len(self.fcs) - 1:
                h = self.reg.drop(torch.relu(h), 6 + i)
        return h


TARGETS = {"mlp": MLP, "cnn": SmallCNN, "resnet": WideResNet, "alexnet": AlexNet}


def n_dropout_sites(kind: str, hidden: Sequence[int] = ()) -> int:
    """Dropout sites of a target before it is built (input + one per hidden layer; the resnet:
    input + inside the blocks)."""
    return {"mlp": 1 + len(hidden), "cnn": 4, "resnet": 2, "alexnet": 8}[kind]


def build_target(kind: str, input_shape: Sequence[int], n_outputs: int, **options) -> TargetNet:
    """`kind` from TARGETS; options: `hidden` for the MLP, `channels`/`fc_hidden`/`kernel_size`
    for the CNN, `depth`/`width`/`norm_groups` for the resnet, `fc_hidden` for the alexnet."""
    if kind not in TARGETS:
        raise ValueError(f"unknown model {kind!r}; valid: {', '.join(sorted(TARGETS))}")
    if kind == "mlp":
        return MLP(input_shape, options.get("hidden", (400, 400)), n_outputs)
    if len(input_shape) != 3:
        raise ValueError(f"model {kind!r} needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    allowed = {"cnn": ("channels", "fc_hidden", "kernel_size"), "resnet": ("depth", "width", "norm_groups"),
               "alexnet": ("fc_hidden",)}[kind]
    return TARGETS[kind](input_shape, n_outputs, **{k: v for k, v in options.items() if k in allowed})

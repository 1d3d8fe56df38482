"""`hyper-diverse`: a generator of high-performing, diverse weights (Deutsch et al. 2019).

z ~ U[-1, 1]^latent (or N(0, I)) -> extractor MLP -> one code per neuron of every hidden layer
and one code for the last layer -> per layer, one weight-generator MLP shared by all neurons of
that layer maps each neuron's code to that neuron's incoming weights and bias (the last layer's
generator emits the whole layer at once). Leaky-ReLU (0.05), no biases in the hypernet,
optional batch norm after the activations with statistics pooled over the noise batch and the
neuron axis (reference `hypernetwork.py`).

Loss = lambda * task loss - H, H the Kozachenko-Leonenko entropy of the *gauge-fixed* weights
with L1 distances and the latent dimension as d (reference details in shared notes, section 3).
A step draws `noise_batch` weight samples, each applied to its own `image_batch` distinct
examples (32 x 32 in the paper).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hypersweep.methods.diversity import gauge_fix, kozachenko_leonenko
from hypersweep.methods.generative import GenerativeMethod
from hypersweep.methods.hparams import HParam
from hypersweep.methods.losses import task_loss
from hypersweep.methods.targets import TargetNet

LEAK = 0.05


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 3e-4, 1e-8, 1.0, doc="Adam learning rate"),
        HParam("lr_decay", 0.99998, 0.5, 1.0, doc="multiplied into lr after every step"),
        HParam("lambda_", 1e3, 0.0, 1e9, doc="weight of the task loss against the entropy"),
        HParam("noise_batch", 32, 2, 4096, kind=int, doc="weight samples per step (>= 2 for the entropy)"),
        HParam("image_batch", 32, 1, 1 << 16, kind=int, doc="distinct examples per weight sample"),
        HParam("latent_dim", 300, 1, 1 << 14, kind=int),
        HParam("latent", "uniform", kind=str, doc="uniform (U[-1,1]) or normal", choices=("uniform", "normal")),
        HParam("code_dim", 15, 1, 1 << 12, kind=int),
        HParam("extractor_hidden", [300], 1, 1 << 16, kind=list),
        HParam("generator_hidden", [100, 100], 1, 1 << 16, kind=list),
        HParam("batch_norm", 0, 0, 1, kind=int, doc="1: batch norm after hidden activations"),
        HParam("init_scale", 0.01, 1e-8, 10.0, doc="variance scaling of hypernet weights (reference 0.1^2)"),
        HParam("eval_samples", 32, 1, 4096, kind=int),
    ]
    return {hp.name: hp for hp in hps}


class _MLP(nn.Module):
    """Bias-free leaky-ReLU MLP on the last axis; the output layer is linear."""

    def __init__(self, dims: list[int], batch_norm: bool, init_scale: float, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, momentum=0.02, eps=1e-7, affine=False)
                                   for d in dims[1:-1]) if batch_norm else None
        with torch.no_grad():  # variance scaling (fan-in), from the explicit generator
            for layer in self.layers:
                std = math.sqrt(init_scale / layer.in_features)
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h, LEAK)
                if self.norms is not None:  # statistics pooled over every leading axis
                    h = self.norms[i](h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return h


class DiverseGenerator(nn.Module):
    """z (S, latent) -> flat target weights (S, P)."""

    def __init__(self, target: TargetNet, hp: Mapping[str, Any], generator: torch.Generator):
        super().__init__()
        names, shapes = target.spec.names, target.spec.shapes
        self.layers = [(names[i], names[i + 1], shapes[i]) for i in range(0, len(names), 2)]
        self.code_dim = hp["code_dim"]
        self.neurons = [shape[0] for _, _, shape in self.layers[:-1]] + [1]  # codes per layer
        bn, scale = bool(hp["batch_norm"]), hp["init_scale"]
        self.extractor = _MLP([hp["latent_dim"], *hp["extractor_hidden"], sum(self.neurons) * self.code_dim],
                              bn, scale, generator)
        self.generators = nn.ModuleList()
        for i, (_, _, shape) in enumerate(self.layers):
            fan_in = math.prod(shape[1:])
            last = i == len(self.layers) - 1  # the last layer is generated whole, from one code
            out = shape[0] * (fan_in + 1) if last else fan_in + 1
            self.generators.append(_MLP([self.code_dim, *hp["generator_hidden"], out], bn, scale, generator))
        self.spec = target.spec

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        S = z.shape[0]
        codes = self.extractor(z).reshape(S, sum(self.neurons), self.code_dim)
        params, start = {}, 0
        for (w_name, b_name, shape), n, gen in zip(self.layers, self.neurons, self.generators):
            out = gen(codes[:, start:start + n])  # (S, n, per-neuron output) shared across the layer's neurons
            start += n
            out = out.reshape(S, shape[0], -1)  # (S, neurons, fan_in + 1)
            params[w_name] = out[..., :-1].reshape(S, *shape)
            params[b_name] = out[..., -1]
        return self.spec.flatten(params)


class HyperDiverse(GenerativeMethod):
    hyperparameters = staticmethod(hyperparameters)

    def build(self, target: TargetNet, generator: torch.Generator) -> list[torch.Tensor]:
        if self.hp["latent"] not in ("uniform", "normal"):
            raise ValueError(f"hyperparameter 'latent': expected uniform or normal, got {self.hp['latent']!r}")
        self.hp["batch_size"] = self.hp["noise_batch"] * self.hp["image_batch"]  # distinct images per step
        self.generator = DiverseGenerator(target, self.hp, generator).to(self.device)
        self.last_entropy = float("nan")
        return list(self.generator.parameters())

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.hp["lr"])

    def scheduler_step(self) -> None:
        for group in self.optim.param_groups:
            group["lr"] *= self.hp["lr_decay"]

    def latent(self, k: int, generator: torch.Generator) -> torch.Tensor:
        shape = (k, self.hp["latent_dim"])
        if self.hp["latent"] == "uniform":
            return torch.rand(shape, generator=generator, device=self.device) * 2 - 1
        return torch.randn(shape, generator=generator, device=self.device)

    def sample_weights(self, k: int, generator: torch.Generator, training: bool = False) -> torch.Tensor:
        self.generator.train(training)
        return self.generator(self.latent(k, generator))

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = len(x)
        S = math.gcd(self.hp["noise_batch"], B)  # a short last batch keeps distinct examples per sample
        w = self.sample_weights(S, self.noise_gen, training=True)  # (S, P)
        out = self.target.forward(w, x.reshape(S, B // S, *x.shape[1:]))  # (S, B/S, out)
        loss = self.hp["lambda_"] * task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std)
        if S >= 2:
            fixed = gauge_fix(self.target, w, centre_logits=self.splits.task == "classification")
            entropy = kozachenko_leonenko(fixed, p=1, dim=self.hp["latent_dim"], constants=False)
            self.last_entropy = float(entropy.detach())
            loss = loss - entropy
        return loss

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        return {**super().diagnostics(), "entropy": self.last_entropy}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "entropy": torch.tensor(self.last_entropy)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.last_entropy = float(state["entropy"])


METHOD = HyperDiverse

"""`hyper-ml`: stochastic maximum likelihood through a hypernetwork (Sheikh et al. 2017).

eps ~ N(0, I) -> scaled by a learned softplus unit (init 1.0) -> MLP hypernet (ReLU, dropout
0.5 on its hidden units while training) -> flat target weights w = g(eps). The training loss is
the likelihood of each example under its own weight sample (the paper's Eq. 3: one sample per
example), done as S samples x B/S examples each, S = B by default. Gaussian noise with a learned
softplus scale (init 0.5) is added to the inputs while training. Prediction is the mean over S
test samples (probabilities for classification, means for regression; Eq. 4).

The hypernet's output layer is `w = base + bound * (A h)`: `base` starts at a PyTorch-default
draw of the target's weights and `bound` is each target layer's 1/sqrt(fan_in). `bound` scales
the noise per layer; it is not the spread. At the defaults the samples start as a narrow cloud
around that one draw: each weight's std across samples is about 0.07 x its layer's bound (0.061-
0.069 measured on the digits and 784-400-400-10 MLPs), an eighth of an independent default
init's std (0.58 x bound). The likelihood then concentrates the cloud (the paper's Figure 2,
logged as `weight_std`; `dead_units` tells a collapse by dead hypernet units apart).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hypersweep.methods.generative import GenerativeMethod
from hypersweep.methods.hparams import HParam
from hypersweep.methods.losses import task_loss
from hypersweep.methods.targets import MLP, TargetNet, sample_dropout
from hypersweep.methods.tuned import inv_softplus


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 1e-3, 1e-8, 1.0, doc="Adam learning rate of the hypernet"),
        HParam("weight_decay", 0.0, 0.0, 1.0),
        HParam("batch_size", 256, 1, 1 << 20, kind=int),
        HParam("samples_per_step", 0, 0, 1 << 20, kind=int, doc="S weight samples per step; 0: one per example"),
        HParam("noise_dim", 10, 1, 4096, kind=int),
        HParam("hyper_hidden", [100, 50], 1, 1 << 16, kind=list, doc="hidden sizes of the hypernet"),
        HParam("hyper_dropout", 0.5, 0.0, 0.95),
        HParam("noise_scale_init", 1.0, 1e-4, 100.0, doc="softplus scale of eps, learned"),
        HParam("input_noise_init", 0.5, 1e-4, 10.0, doc="softplus scale of input noise, learned"),
        HParam("eval_samples", 16, 1, 4096, kind=int),
        HParam("factorised", 1, 0, 1, kind=int, doc="MLP targets, S = B: train without building the (S, P) weights"),
    ]
    return {hp.name: hp for hp in hps}


class HyperNet(nn.Module):
    """eps (S, noise_dim) -> flat target weights (S, P)."""

    def __init__(self, target: TargetNet, noise_dim: int, hidden: list[int], dropout: float,
                 noise_scale_init: float, generator: torch.Generator):
        super().__init__()
        dims = [noise_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], target.spec.flat_size, bias=False)
        self.base = nn.Parameter(target.init_weights(generator))
        self.register_buffer("bound", target.init_bounds())
        self.noise_scale = nn.Parameter(torch.tensor(inv_softplus(noise_scale_init)))
        self.dropout, self.noise_dim = dropout, noise_dim
        with torch.no_grad():  # explicit-generator init, as for the target
            for layer in [*self.hidden, self.out]:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                if layer.bias is not None:
                    layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def code(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The last hidden layer h (S, K); the weights are base + bound * (A h)."""
        h = F.softplus(self.noise_scale) * eps
        for layer in self.hidden:
            h = sample_dropout(torch.relu(layer(h)), self.dropout, self.training, generator)
        return h

    def forward(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.base + self.bound * self.out(self.code(eps, generator))

    def forward_mlp(self, target: MLP, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The MLP target with the weights of codes h (S, K) on x (S, n, ...), without building
        the (S, P) weights. Per layer W_s = B + bound * reshape(A h_s), so
        W_s x = B x + bound * A_W (x (x) h_s), with A_W viewed as (out, in * K): one GEMM on the
        outer products of inputs and codes (B x in x K numbers) replaces S x P generated weights
        and S matrix-vector products (shared notes: performance-notes.md)."""
        S, K = h.shape
        sizes = target.spec.sizes
        # One split (its backward is one concatenation; slicing would zero-fill a P x K
        # gradient per slice).
        A, base, bounds = (torch.split(t, sizes) for t in (self.out.weight, self.base, self.bound))
        z = x.reshape(S, x.shape[1], -1)
        n_layers = len(target.dims) - 1
        for i, (d_in, d_out) in enumerate(zip(target.dims[:-1], target.dims[1:])):
            A_w, w0, A_b, b0 = A[2 * i], base[2 * i], A[2 * i + 1], base[2 * i + 1]
            bound = bounds[2 * i][0]  # one init bound per layer (weights and bias)
            outer = (z.unsqueeze(-1) * h[:, None, None, :]).reshape(S, z.shape[1], d_in * K)
            y = z @ w0.reshape(d_out, d_in).T + bound * (outer @ A_w.reshape(d_out, d_in * K).T)
            z = y + (b0 + bound * (h @ A_b.T)).unsqueeze(1)
            if i < n_layers - 1:
                z = torch.relu(z)
        return z


class HyperML(GenerativeMethod):
    hyperparameters = staticmethod(hyperparameters)

    def build(self, target: TargetNet, generator: torch.Generator) -> list[torch.Tensor]:
        self.hypernet = HyperNet(target, self.hp["noise_dim"], list(self.hp["hyper_hidden"]), self.hp["hyper_dropout"],
                                 self.hp["noise_scale_init"], generator).to(self.device)
        self.input_noise = torch.tensor(inv_softplus(self.hp["input_noise_init"]), device=self.device,
                                        requires_grad=True)
        return [*self.hypernet.parameters(), self.input_noise]

    def optimizer(self, params):
        return self.adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])

    def sample_weights(self, k: int, generator: torch.Generator, training: bool = False) -> torch.Tensor:
        """(k, P) weight vectors; without dropout unless `training`."""
        self.hypernet.train(training)
        eps = torch.randn(k, self.hp["noise_dim"], generator=generator, device=self.device)
        return self.hypernet(eps, generator)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = len(x)
        S = math.gcd(self.hp["samples_per_step"] or B, B)  # S samples x B/S examples; exact for a short last batch
        x = x + F.softplus(self.input_noise) * torch.randn(x.shape, generator=self.noise_gen, device=self.device)
        x = x.reshape(S, B // S, *x.shape[1:])
        # The factorised path costs B x in x out x K per layer whatever S is; building the weights
        # costs S x in x out x K (+ B x in x out to apply them): it pays only at one sample per example.
        if isinstance(self.target, MLP) and self.hp["factorised"] and S == B:
            self.hypernet.train(True)
            eps = torch.randn(S, self.hp["noise_dim"], generator=self.noise_gen, device=self.device)
            out = self.hypernet.forward_mlp(self.target, self.hypernet.code(eps, self.noise_gen), x)
        else:
            out = self.target.forward(self.sample_weights(S, self.noise_gen, training=True), x)  # (S, B/S, out)
        return task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std)

    @torch.no_grad()
    def dead_units(self, samples: int = 256) -> float:
        """Share of the hypernet's hidden ReLU units that no one of `samples` noise draws
        activates (eval mode: no dropout). Dead units carry no noise to the weights, so a
        population that collapsed because its units died is told apart from one the likelihood
        concentrated."""
        self.hypernet.eval()
        h = F.softplus(self.hypernet.noise_scale) * torch.randn(samples, self.hp["noise_dim"],
                                                                generator=self.eval_generator(), device=self.device)
        dead = total = 0
        for layer in self.hypernet.hidden:
            h = torch.relu(layer(h))
            dead += int((h.amax(0) <= 0).sum())
            total += h.shape[1]
        return dead / total

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        return {**super().diagnostics(), "input_noise": float(F.softplus(self.input_noise)),
                "noise_scale": float(F.softplus(self.hypernet.noise_scale)), "dead_units": self.dead_units()}

    def extra_state(self) -> dict[str, Any]:
        return {"hypernet": self.hypernet.state_dict(), "input_noise": self.input_noise.detach().clone()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.hypernet.load_state_dict(state["hypernet"])
        with torch.no_grad():
            self.input_noise.copy_(state["input_noise"])

METHOD = HyperML

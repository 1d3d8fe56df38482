"""`hyper-hpo`: hyperparameter optimisation through a best-response hypernetwork
(Lorraine & Duvenaud 2018, "Stochastic Hyperparameter Optimization through Hypernetworks").

A hypernet maps hyperparameters lambda to the target's weights, w = g(lambda). Each training
step samples S values lambda~ = u + sample_scale * eps around the current u (unconstrained
space, methods/tuned.py), generates their weights in one batch and fits the hypernet to the
regularised training loss of each (S samples x B/S examples). Every `hyper_every` steps a
hyperparameter step moves u by Adam on the validation loss of w = g(u): the hypergradient
flows through the hypernet. Tuned: the L2 weight decay (as log10, in [-8, 0]) and Gaussian
input noise ([0, inf)).

`variant: global` (the paper's global hypernet: an MLP, lambda sampled widely) or `local`
(a linear hypernet around the current lambda, sampled narrowly), for MLP targets. The
penalty is the usual squared L2 norm; the reference code's unsquared norm is the
`penalty: l2-unsquared` option (a detail reimplementations tend to "fix" by accident).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from hypersweep.methods.alternating import AlternatingTuner
from hypersweep.methods.data import Splits
from hypersweep.methods.hparams import HParam, resolve
from hypersweep.methods.losses import metrics, task_loss
from hypersweep.methods.seeding import Stream, stream_generator
from hypersweep.methods.targets import MLP, TargetNet
from hypersweep.methods.tuned import Space, Tuned

TUNABLE = ("weight_decay", "input_noise")


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 1e-3, 1e-8, 1.0, doc="Adam learning rate of the hypernet"),
        HParam("hyper_lr", 0.01, 1e-8, 10.0, doc="Adam learning rate of the hyperparameters"),
        HParam("batch_size", 64, 1, 1 << 20, kind=int),
        HParam("samples_per_step", 8, 1, 1 << 12, kind=int, doc="lambda samples per training step"),
        HParam("sample_scale", 1.0, 0.0, 100.0, doc="std of the lambda samples around u (unconstrained)"),
        HParam("hyper_every", 1, 1, 1 << 12, kind=int, doc="training steps per hyperparameter step"),
        HParam("warmup_epochs", 2, 0, 1 << 20, kind=int),
        HParam("variant", "global", kind=str, choices=("global", "local")),
        HParam("hidden", [50], 1, 1 << 14, kind=list, doc="hypernet hidden sizes (global variant)"),
        HParam("tune", "weight_decay", kind=str, choices=TUNABLE, multi=True),
        HParam("penalty", "l2", kind=str, choices=("l2", "l2-unsquared")),
        HParam("init_log10_weight_decay", -4.0, -7.99, -0.01),
        HParam("init_input_noise", 0.05, 1e-4, 100.0),
    ]
    return {hp.name: hp for hp in hps}


class ResponseNet(nn.Module):
    """lambda (S, H) -> weights (S, P) = base + bound * A h(lambda); h the identity (local) or
    a ReLU MLP (global)."""

    def __init__(self, target: TargetNet, n_hparams: int, hidden: list[int], generator: torch.Generator):
        super().__init__()
        dims = [n_hparams, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], target.spec.flat_size, bias=False)
        self.base = nn.Parameter(target.init_weights(generator))
        self.register_buffer("bound", target.init_bounds())
        with torch.no_grad():
            for layer in [*self.hidden, self.out]:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                if layer.bias is not None:
                    layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        h = lam
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.base + self.bound * self.out(h)


class HyperHPO(AlternatingTuner):
    def __init__(self, target: TargetNet, splits: Splits, hp: Mapping[str, Any], *, seed: int,
                 device: str | torch.device = "cpu"):
        if not isinstance(target, MLP):
            raise ValueError("hyper-hpo generates the weights of MLP targets (model kind mlp)")
        self.target, self.splits, self.device = target, splits, torch.device(device)
        self.hp = resolve(hyperparameters(target.n_dropout_sites), hp)
        groups = [g.strip() for g in self.hp["tune"].split(",")]
        tuned = []
        if "weight_decay" in groups:
            tuned.append(Tuned("log10_weight_decay", -8.0, 0.0, self.hp["init_log10_weight_decay"]))
        if "input_noise" in groups:
            tuned.append(Tuned("input_noise", 0.0, math.inf, self.hp["init_input_noise"]))
        self.space = Space(tuned)
        self.data_gen = stream_generator(seed, Stream.ORDER)  # data order, validation batches, on the CPU
        self.noise_gen = stream_generator(seed, Stream.NOISE, self.device)  # lambda samples, input noise
        hidden = list(self.hp["hidden"]) if self.hp["variant"] == "global" else []
        self.hypernet = ResponseNet(target, len(self.space), hidden, stream_generator(seed, Stream.INIT)).to(self.device)
        self.u = self.space.initial().to(self.device).requires_grad_()
        self.log_noise_std = torch.zeros((), device=self.device, requires_grad=True)  # regression only
        params = list(self.hypernet.parameters()) + ([self.log_noise_std] if splits.task == "regression" else [])
        self.optimizers = {"hypernet": torch.optim.Adam(params, lr=self.hp["lr"]),
                           "hyper": torch.optim.Adam([self.u], lr=self.hp["hyper_lr"])}
        self.data = {name: tuple(t.to(self.device) for t in splits.split(name)) for name in ("train", "val", "test")}
        self._init_loop(self.hp["hyper_every"], 1)

    def _value(self, values: torch.Tensor, name: str) -> torch.Tensor | None:
        return self.space.column(values, name)

    def penalty(self, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Weight decay of each sample's weights (S,): wd * ||w||^2 (or ||w|| unsquared)."""
        log_wd = self._value(values, "log10_weight_decay")
        if log_wd is None:
            return torch.zeros(w.shape[0], device=w.device)
        sq = (w ** 2).sum(1)
        norm = sq if self.hp["penalty"] == "l2" else sq.sqrt()
        return 10.0 ** log_wd * norm

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        B = len(x)
        S = math.gcd(self.hp["samples_per_step"], B)
        eps = torch.randn(S, len(self.space), generator=self.noise_gen, device=self.device)
        lam = self.u.detach() + self.hp["sample_scale"] * eps  # lambda is not trained here
        values = self.space.project(lam)
        w = self.hypernet(lam)  # (S, P): all samples in one batch
        xs = x.reshape(S, B // S, *x.shape[1:])
        noise = self._value(values, "input_noise")
        if noise is not None:
            xs = xs + noise.reshape(S, *(1,) * (xs.dim() - 1)) * torch.randn(xs.shape, generator=self.noise_gen,
                                                                            device=self.device)
        out = self.target.forward(w, xs)
        loss = task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std) \
            + self.penalty(w, values).mean() / len(self.data["train"][0])
        self._step(("hypernet",), loss)
        return float(loss.detach())

    def val_step(self) -> float:
        xv, yv = self.val_batch()
        out = self.target.forward(self.hypernet(self.u[None]), xv)
        loss = task_loss(out, yv[None], self.splits.task, self.log_noise_std)
        self._step(("hyper",), loss)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.data[split]
        out = self.target.forward(self.hypernet(self.u[None]), x)[0]
        return metrics(out, y, self.splits, self.log_noise_std)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        values = self.space.project(self.u)
        out = {f"hp/{n}": float(v) for n, v in zip(self.space.names, values)}
        if "log10_weight_decay" in self.space.index:
            out["hp/weight_decay"] = 10.0 ** out["hp/log10_weight_decay"]
        return out

    def model_state(self) -> dict[str, Any]:
        return {"hypernet": self.hypernet.state_dict()}

    def load_model_state(self, state: Mapping[str, Any]) -> None:
        self.hypernet.load_state_dict(state["hypernet"])


METHOD = HyperHPO

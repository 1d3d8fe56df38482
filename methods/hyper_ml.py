"""`hyper-ml`: stochastic maximum likelihood through a hypernetwork (Sheikh et al. 2017).

eps ~ N(0, I) -> scaled by a learned softplus unit (init 1.0) -> MLP hypernet (ReLU, dropout
0.5 on its hidden units while training) -> flat target weights w = g(eps). The training loss is
the likelihood of each example under its own weight sample (the paper's Eq. 3: one sample per
example), done as S samples x B/S examples each, S = B by default. Gaussian noise with a learned
softplus scale (init 0.5) is added to the inputs while training. Prediction is the mean over S
test samples (probabilities for classification, means for regression; Eq. 4).

The hypernet's output layer is `w = base + bound * (A h)`: `base` starts at a PyTorch-default
draw of the target's weights and `bound` is each target layer's 1/sqrt(fan_in), so at the start
the generated population is a spread of sensible initialisations around one of them, which the
likelihood then concentrates (the paper's Figure 2, logged here as `weight_std`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from methods.data import Splits
from methods.hparams import HParam, resolve
from methods.losses import metrics, task_loss
from methods.targets import TargetNet, sample_dropout


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
    ]
    return {hp.name: hp for hp in hps}


def inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def layer_bounds(target: TargetNet) -> torch.Tensor:
    """(P,) the default init bound 1/sqrt(fan_in) of the layer each weight belongs to."""
    parts, fan_in = [], 1
    for name, shape in zip(target.spec.names, target.spec.shapes):
        if not name.endswith(".bias"):
            fan_in = math.prod(shape[1:])
        parts.append(torch.full((math.prod(shape),), 1.0 / math.sqrt(fan_in)))
    return torch.cat(parts)


class HyperNet(nn.Module):
    """eps (S, noise_dim) -> flat target weights (S, P)."""

    def __init__(self, target: TargetNet, noise_dim: int, hidden: list[int], dropout: float,
                 noise_scale_init: float, generator: torch.Generator):
        super().__init__()
        dims = [noise_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], target.spec.flat_size, bias=False)
        self.base = nn.Parameter(target.init_weights(generator))
        self.register_buffer("bound", layer_bounds(target))
        self.noise_scale = nn.Parameter(torch.tensor(inv_softplus(noise_scale_init)))
        self.dropout, self.noise_dim = dropout, noise_dim
        with torch.no_grad():  # explicit-generator init, as for the target
            for layer in [*self.hidden, self.out]:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                if layer.bias is not None:
                    layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = F.softplus(self.noise_scale) * eps
        for layer in self.hidden:
            h = sample_dropout(torch.relu(layer(h)), self.dropout, self.training, generator)
        return self.base + self.bound * self.out(h)


class HyperML:
    def __init__(self, target: TargetNet, splits: Splits, hp: Mapping[str, Any], *, seed: int,
                 device: str | torch.device = "cpu"):
        self.target, self.splits, self.device = target, splits, torch.device(device)
        self.hp = resolve(hyperparameters(target.n_dropout_sites), hp)
        self.seed = seed
        self.data_gen = torch.Generator().manual_seed(seed)  # init and data order
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1)  # eps, dropout, input noise
        self.hypernet = HyperNet(target, self.hp["noise_dim"], list(self.hp["hyper_hidden"]), self.hp["hyper_dropout"],
                                 self.hp["noise_scale_init"], self.data_gen).to(self.device)
        self.input_noise = torch.tensor(inv_softplus(self.hp["input_noise_init"]), device=self.device,
                                        requires_grad=True)
        self.log_noise_std = torch.zeros((), device=self.device, requires_grad=True)  # regression only
        params = [*self.hypernet.parameters(), self.input_noise]
        if splits.task == "regression":
            params.append(self.log_noise_std)
        self.optimizer = torch.optim.Adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
        self.data = {name: tuple(t.to(self.device) for t in splits.split(name)) for name in ("train", "val", "test")}
        self.epoch = 0

    def sample_weights(self, k: int, generator: torch.Generator, training: bool = False) -> torch.Tensor:
        """(k, P) weight vectors; without dropout unless `training`."""
        self.hypernet.train(training)
        eps = torch.randn(k, self.hp["noise_dim"], generator=generator, device=self.device)
        return self.hypernet(eps, generator)

    def train_epoch(self) -> float:
        x, y = self.data["train"]
        perm = torch.randperm(len(x), generator=self.data_gen).to(self.device)
        total = torch.zeros((), device=self.device)
        for idx in perm.split(self.hp["batch_size"]):
            B = len(idx)
            S = self.hp["samples_per_step"] or B
            S = math.gcd(S, B)  # S samples x B/S examples each; a short last batch keeps it exact
            xb = x[idx] + F.softplus(self.input_noise) * torch.randn(x[idx].shape, generator=self.noise_gen,
                                                                     device=self.device)
            w = self.sample_weights(S, self.noise_gen, training=True)  # (S, P)
            out = self.target.forward(w, xb.reshape(S, B // S, *xb.shape[1:]))  # (S, B/S, out)
            loss = task_loss(out, y[idx].reshape(S, B // S), self.splits.task, self.log_noise_std)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * B
        self.epoch += 1
        return float(total) / len(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, weights: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Mean prediction over the weight samples: probabilities or regression means (B, out)."""
        outs = []
        for xc in x.split(chunk):
            out = self.target.forward(weights, xc)  # (S, b, out)
            outs.append(out.softmax(-1).mean(0) if self.splits.task == "classification" else out.mean(0))
        return torch.cat(outs)

    def eval_generator(self) -> torch.Generator:
        # A fixed set of test samples: evaluation does not disturb training's random stream.
        return torch.Generator(device=self.device).manual_seed(self.seed + 2)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.data[split]
        w = self.sample_weights(self.hp["eval_samples"], self.eval_generator())
        return metrics(self.predict(x, w), y, self.splits, self.log_noise_std,
                       probabilities=self.splits.task == "classification")

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        w = self.sample_weights(10, self.eval_generator())
        return {"weight_std": float(w.std(0).mean()), "input_noise": float(F.softplus(self.input_noise)),
                "noise_scale": float(F.softplus(self.hypernet.noise_scale))}

    def state_dict(self) -> dict[str, Any]:
        return {"hypernet": self.hypernet.state_dict(), "optimizer": self.optimizer.state_dict(),
                "input_noise": self.input_noise.detach().clone(), "log_noise_std": self.log_noise_std.detach().clone(),
                "epoch": self.epoch, "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hypernet.load_state_dict(state["hypernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.input_noise.copy_(state["input_noise"])
            self.log_noise_std.copy_(state["log_noise_std"])
        self.epoch = int(state["epoch"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])


METHOD = HyperML

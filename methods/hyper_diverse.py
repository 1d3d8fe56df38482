"""`hyper-diverse`: a generator of high-performing, diverse weights (Deutsch et al. 2019).

z ~ U[-1, 1]^latent (or N(0, I)) -> extractor MLP -> one code per neuron of every hidden layer
and one code for the last layer -> per layer, one weight-generator MLP shared by all neurons of
that layer maps each neuron's code to that neuron's incoming weights and bias (the last layer's
generator emits the whole layer at once). Leaky-ReLU (0.05), no biases in the hypernet, batch
norm after every hidden activation (not after output layers) with a trainable scale and offset
and statistics pooled over the noise batch and the neuron axis (reference `hypernetwork.py`,
paper App. G). Sizes default to the reference's: extractor [300, 300]; generators [40, 40] for
the first layer, [100, 100] for the middle ones, [60, 60] for the last.

Why batch norm is the default: without it, variance scaling at the reference's 0.1^2 shrinks
the signal by ~0.1 per hypernet layer (five layers from z to a weight): on mnist-5k's MLP
256-256 the generated weights start at mean |w| 1.1e-7, and the task loss sits at chance,
whatever lambda (annealing lambda up from 1e5 did not move it: the entropy term was never the
cause). Batch norm restores unit scale after every hidden layer, so only the output layer's
0.1^2 sets the weights' initial size: mean |w| 0.097 there. (Measured by constructing the method
with and without `batch_norm`; tests/test_hyper_diverse.py checks the same on a small net.)

Loss = lambda * task loss - H, H the Kozachenko-Leonenko entropy of the *gauge-fixed* weights
with L1 distances and the latent dimension as d (reference details in shared notes, section 3).
A step draws `noise_batch` weight samples, each applied to its own `image_batch` distinct
examples (32 x 32 in the paper).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hypersweep.methods.diversity import gauge_fix, kozachenko_leonenko, mean_log_distance
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
        HParam("lambda_rate", 1.0, 0.5, 2.0, doc="multiplied into lambda after every step (reference; 1 = fixed)"),
        HParam("lambda_max", 1e9, 0.0, 1e12, doc="where an annealed lambda stops"),
        HParam("noise_batch", 32, 2, 4096, kind=int, doc="weight samples per step (>= 2 for the entropy)"),
        HParam("image_batch", 32, 1, 1 << 16, kind=int, doc="distinct examples per weight sample"),
        HParam("latent_dim", 300, 1, 1 << 14, kind=int),
        HParam("latent", "uniform", kind=str, doc="uniform (U[-1,1]) or normal", choices=("uniform", "normal")),
        HParam("code_dim", 15, 1, 1 << 12, kind=int),
        HParam("extractor_hidden", [300, 300], 1, 1 << 16, kind=list),
        HParam("first_generator_hidden", [40, 40], 1, 1 << 16, kind=list, doc="the first layer's generator"),
        HParam("generator_hidden", [100, 100], 1, 1 << 16, kind=list, doc="the middle layers' generators"),
        HParam("last_generator_hidden", [60, 60], 1, 1 << 16, kind=list, doc="the last layer's generator"),
        HParam("batch_norm", 1, 0, 1, kind=int, doc="1: batch norm after hidden activations (reference)"),
        HParam("init_scale", 0.01, 1e-8, 10.0, doc="variance scaling of hypernet weights (reference 0.1^2)"),
        HParam("eval_samples", 32, 1, 4096, kind=int),
        HParam("compile_entropy", 0, 0, 1, kind=int,
               doc="1: gauge fixing and the distances through torch.compile (a C++ compiler on CPU, Triton on CUDA)"),
    ]
    return {hp.name: hp for hp in hps}


class PooledNorm(nn.Module):
    """Batch norm over the last axis with statistics pooled over every leading axis (noise batch
    and neurons), a trainable scale and offset, decay 0.98 and eps 1e-7 as in the reference.

    The running statistics start at zero and are divided by 1 - decay^steps when read (Adam's
    bias correction): after one step they are that step's statistics, not a blend with an
    arbitrary start that a 0.98 decay would keep for ~50 steps. Evaluation always uses the
    running statistics, so each sample's weights depend on its latent alone (batched equals
    looped); with none yet it uses (0, 1), as PyTorch does. DiverseGenerator seeds them with one
    batch at construction, so an untrained generator evaluates at the scale it trains at."""

    def __init__(self, d: int, decay: float = 0.98, eps: float = 1e-7):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.zeros(d))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            flat = h.reshape(-1, h.shape[-1])
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
            with torch.no_grad():
                self.steps += 1
                self.running_mean.lerp_(mean.detach(), 1 - self.decay)
                self.running_var.lerp_(var.detach(), 1 - self.decay)
        elif int(self.steps) == 0:
            mean, var = torch.zeros_like(self.running_mean), torch.ones_like(self.running_var)
        else:
            correction = 1 - self.decay ** int(self.steps)
            mean, var = self.running_mean / correction, self.running_var / correction
        return (h - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class _MLP(nn.Module):
    """Bias-free leaky-ReLU MLP on the last axis; the output layer is linear."""

    def __init__(self, dims: list[int], batch_norm: bool, init_scale: float, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(PooledNorm(d) for d in dims[1:-1]) if batch_norm else None
        with torch.no_grad():  # variance scaling (fan-in), from the explicit generator
            for layer in self.layers:
                std = math.sqrt(init_scale / layer.in_features)
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h, LEAK)
                if self.norms is not None:
                    h = self.norms[i](h)
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
            hidden = hp["last_generator_hidden"] if last else hp["first_generator_hidden"] if i == 0 \
                else hp["generator_hidden"]
            self.generators.append(_MLP([self.code_dim, *hidden, out], bn, scale, generator))
        self.spec = target.spec
        if bn:  # the statistics of one batch of latents, drawn from the initialisation stream
            with torch.no_grad():
                self(torch.rand((hp["noise_batch"], hp["latent_dim"]), generator=generator) * 2 - 1)

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
        self.lambda_ = float(self.hp["lambda_"])  # annealed by lambda_rate after every step
        self.gauge = partial(gauge_fix, target, centre_logits=self.splits.task == "classification", flat=False)
        self.log_distance = mean_log_distance
        if self.hp["compile_entropy"]:  # fused elementwise passes: same values within float32 rounding
            # Dynamo's cache is per function and process: its guards on an earlier target (a reused
            # Ray actor's previous trial) would count towards its recompile limit, past which it
            # falls back to eager without a word. A sample count other than the first (a short
            # last batch) compiles once more, then for any count.
            torch._dynamo.reset()
            self.gauge, self.log_distance = torch.compile(self.gauge), torch.compile(mean_log_distance)
        return list(self.generator.parameters())

    def optimizer(self, params):
        return self.adam(params, lr=self.hp["lr"])

    def scheduler_step(self) -> None:
        for group in self.optim.param_groups:
            group["lr"] *= self.hp["lr_decay"]
        self.lambda_ = min(self.lambda_ * self.hp["lambda_rate"], self.hp["lambda_max"])

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
        loss = self.lambda_ * task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std)
        if S >= 2:
            entropy = self.entropy(w)
            self.last_entropy = float(entropy.detach())
            loss = loss - entropy
        return loss

    def entropy(self, w: torch.Tensor) -> torch.Tensor:
        """The training loss's entropy term of weight samples w (S, P): Kozachenko-Leonenko on the
        gauge-fixed samples, L1 distances, the latent dimension as d, without the constants."""
        return kozachenko_leonenko(self.gauge(w), p=1, dim=self.hp["latent_dim"], constants=False,
                                   log_distance=self.log_distance)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        return {**super().diagnostics(), "entropy": self.last_entropy, "lambda": self.lambda_}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "entropy": torch.tensor(self.last_entropy),
                "lambda": torch.tensor(self.lambda_, dtype=torch.float64)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.last_entropy = float(state["entropy"])
        self.lambda_ = float(state["lambda"]) if "lambda" in state else float(self.hp["lambda_"])


METHOD = HyperDiverse

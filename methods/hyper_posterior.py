"""`hyper-posterior`: the implicit posterior of a CNN's weights through a hypernetwork, trained
by maximising the likelihood directly, with no KL term (Ukai, Matsubara & Uehara 2018).

z ~ p(z) -> generator -> target weights w = g(z); prediction averages the outputs of 1 or 16
samples (`error_single` and `error` in the reports). Priors: `uniform` U(0,1), `normal` N(0,1),
`uniform-sym` U(-1,1), `half-normal` |N(0,1)|. Sharing: `all-in-one` (one z for every layer,
so all weights are correlated) or `block-wise` (one z per block: a residual block, or one layer
of the MLP / small CNN).

Why this generator. Ukai et al. generate the weights of wide residual networks (WRN-28-10 has
36.5M weights); a hypernet whose last layer maps a hidden code to every weight would be
hidden x P, far larger than the target. Here each parameter tensor W (out, in, ...) is a
learned base tensor scaled by a rank-1 factor that depends on z:

    W(z) = B * r(z) (x) c(z),   r = 1 + R h(z) (one per output channel),
                                c = 1 + C h(z) (one per input channel),   h(z) = relu(T z)

with h a small trunk per z (hidden size `hidden`). The generator adds H x (out + in) numbers per
tensor on top of the base weights, against out x in x k x k in the tensor itself, so it grows
linearly in the width while the target grows quadratically: WRN-16-4 (2.75M weights) gets
0.52M generator weights besides its base (19%), WRN-28-10 (36.5M) 2.4M (7%), with the default
hidden 64 and latent 32 (`python -m hypersweep.methods.hyper_posterior` prints these).
Samples are correlated across all weights of a tensor and, through the shared trunk, across
layers. Because convolutions are linear in every input channel, such weights need not be
built: conv(x * c, B) * r equals conv(x, B * r (x) c), so a training step with one weight
sample per example costs one ordinary forward pass of the target (`forward_rank1`).
`sample_weights` still returns full (k, P) weight vectors for ensembles and distillation.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from hypersweep.methods.augment import crop_flip
from hypersweep.methods.clock import Deadline
from hypersweep.methods.generative import GenerativeMethod
from hypersweep.methods.hparams import HParam
from hypersweep.methods.losses import task_loss
from hypersweep.methods.targets import ParamSpec, TargetNet, rank1_shapes, rank1_weights

PRIORS = ("uniform", "normal", "uniform-sym", "half-normal")
SHARING = ("all-in-one", "block-wise")
OPTIMIZERS = ("adam", "sgd")


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 1e-3, 1e-8, 10.0),
        HParam("optimizer", "adam", kind=str, doc="adam, or sgd (momentum, Nesterov)", choices=OPTIMIZERS),
        HParam("momentum", 0.9, 0.0, 0.999, doc="sgd only"),
        HParam("weight_decay", 0.0, 0.0, 1.0, doc="0: maximum likelihood, as in the paper"),
        HParam("lr_step_every", 0, 0, 1 << 20, kind=int, doc="epochs between lr x lr_gamma steps; 0: constant"),
        HParam("lr_gamma", 0.2, 1e-6, 1.0),
        HParam("batch_size", 128, 1, 1 << 20, kind=int),
        HParam("samples_per_step", 0, 0, 1 << 20, kind=int, doc="S weight samples per step; 0: one per example"),
        HParam("prior", "uniform", kind=str, doc="uniform U(0,1), normal, uniform-sym U(-1,1), half-normal",
               choices=PRIORS),
        HParam("sharing", "all-in-one", kind=str, doc="all-in-one: one z; block-wise: one z per block",
               choices=SHARING),
        HParam("latent_dim", 32, 1, 4096, kind=int),
        HParam("hidden", 64, 1, 1 << 14, kind=int, doc="trunk width h(z)"),
        HParam("modulation_init", 0.1, 1e-6, 10.0, doc="initial std of the scales r, c around 1"),
        HParam("augment", 0, 0, 1, kind=int, doc="1: random crop (pad 4) and horizontal flip, images only"),
        HParam("eval_samples", 16, 1, 4096, kind=int),
    ]
    return {hp.name: hp for hp in hps}


def block_of(name: str) -> str:
    """The block a parameter belongs to: `blocks.3` for a residual block, else its layer
    (`layers.0`, `conv1`, `fc`)."""
    parts = name.split(".")[:-1]
    return ".".join(parts[:2]) if parts[0] == "blocks" else ".".join(parts)


class PosteriorGenerator(nn.Module):
    """z (S, n_blocks, latent) -> rows, cols: per parameter tensor, scales (S, out) and (S, in)."""

    def __init__(self, target: TargetNet, latent_dim: int, hidden: int, sharing: str, generator: torch.Generator):
        super().__init__()
        self.spec: ParamSpec = target.spec
        self.shapes = rank1_shapes(target.spec)
        blocks = list(dict.fromkeys(block_of(n) for n in target.spec.names))
        self.block_index = {n: (blocks.index(block_of(n)) if sharing == "block-wise" else 0) for n in target.spec.names}
        self.n_blocks = len(blocks) if sharing == "block-wise" else 1
        self.base = nn.Parameter(target.init_weights(generator))
        self.trunks = nn.ModuleList(nn.Linear(latent_dim, hidden) for _ in range(self.n_blocks))
        self.heads = nn.ModuleList(nn.Linear(hidden, r + c) for r, c in self.shapes.values())
        with torch.no_grad():
            for layer in [*self.trunks, *self.heads]:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.zero_()

    def forward(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        h = [torch.relu(trunk(z[:, j])) for j, trunk in enumerate(self.trunks)]
        rows, cols = {}, {}
        for (name, (r, c)), head in zip(self.shapes.items(), self.heads):
            m = head(h[self.block_index[name]])
            rows[name], cols[name] = 1 + m[:, :r], 1 + m[:, r:]
        return rows, cols


class HyperPosterior(GenerativeMethod):
    hyperparameters = staticmethod(hyperparameters)

    def build(self, target: TargetNet, generator: torch.Generator) -> list[torch.Tensor]:
        for key, valid in (("prior", PRIORS), ("sharing", SHARING), ("optimizer", OPTIMIZERS)):
            if self.hp[key] not in valid:
                raise ValueError(f"hyperparameter {key!r}: expected one of {', '.join(valid)}, got {self.hp[key]!r}")
        if self.hp["augment"] and len(self.splits.input_shape) != 3:
            raise ValueError("hyperparameter 'augment': crop and flip need image inputs")
        self.generator = PosteriorGenerator(target, self.hp["latent_dim"], self.hp["hidden"], self.hp["sharing"],
                                            generator).to(self.device)
        self._calibrate(generator)
        return list(self.generator.parameters())

    @torch.no_grad()
    def _calibrate(self, generator: torch.Generator) -> None:
        """Scale the heads once, on a reference latent z ~ N(0, 1): under it the initial scales
        r, c spread with std `modulation_init` around 1, and other priors by what their own
        distribution gives through the same heads (the digits MLP, modulation_init 0.2: N(0,1)
        0.20, U(0,1) and U(-1,1) 0.12, tests/test_hyper_posterior.py). Calibrating on the prior
        itself would erase the difference between priors that the paper's prior comparison
        measures (averaging x16 gains with zero-mean N(0,1) priors, almost not with U(0,1))."""
        shape = (256, self.generator.n_blocks, self.hp["latent_dim"])
        rows, cols = self.generator(torch.randn(shape, generator=generator, device=self.device))
        spread = torch.cat([t.reshape(-1) - 1 for t in [*rows.values(), *cols.values()]]).std()
        for head in self.generator.heads:
            head.weight.mul_(self.hp["modulation_init"] / spread)

    def optimizer(self, params):
        if self.hp["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=self.hp["lr"], momentum=self.hp["momentum"], nesterov=True,
                                   weight_decay=self.hp["weight_decay"])
        return self.adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])

    def train_epoch(self, deadline: Deadline | None = None) -> float:
        every = self.hp["lr_step_every"]
        if every:  # a function of the epoch: the same after a restore or a pass split by a deadline
            for group in self.optim.param_groups:
                group["lr"] = self.hp["lr"] * self.hp["lr_gamma"] ** (self.epoch // every)
        return super().train_epoch(deadline)

    def latent(self, k: int, generator: torch.Generator) -> torch.Tensor:
        shape = (k, self.generator.n_blocks, self.hp["latent_dim"])
        prior = self.hp["prior"]
        if prior in ("uniform", "uniform-sym"):
            u = torch.rand(shape, generator=generator, device=self.device)
            return u if prior == "uniform" else 2 * u - 1
        z = torch.randn(shape, generator=generator, device=self.device)
        return z.abs() if prior == "half-normal" else z

    def draw(self, k: int, generator: torch.Generator):
        return self.generator(self.latent(k, generator))

    def forward_samples(self, samples, x: torch.Tensor) -> torch.Tensor:
        rows, cols = samples
        return self.target.forward_rank1(self.generator.base, rows, cols, x)

    def sample_weights(self, k: int, generator: torch.Generator, training: bool = False) -> torch.Tensor:
        rows, cols = self.draw(k, generator)
        return rank1_weights(self.target.spec, self.generator.base, rows, cols)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = len(x)
        S = math.gcd(self.hp["samples_per_step"] or B, B)  # S samples x B/S examples each
        if self.hp["augment"]:
            x = crop_flip(x, self.noise_gen)
        rows, cols = self.draw(S, self.noise_gen)
        out = self.target.forward_rank1(self.generator.base, rows, cols, x.reshape(S, B // S, *x.shape[1:]))
        return task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std)

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])


METHOD = HyperPosterior


if __name__ == "__main__":
    from hypersweep.methods.targets import build_target
    for depth, width in ((16, 4), (28, 10)):
        net = build_target("resnet", (3, 32, 32), 10, depth=depth, width=width)
        gen = PosteriorGenerator(net, 32, 64, "all-in-one", torch.Generator().manual_seed(0))
        extra = sum(p.numel() for name, p in gen.named_parameters() if name != "base")
        print(f"WRN-{depth}-{width}: {net.spec.flat_size:,} target weights, {extra:,} generator weights "
              f"besides the base ({extra / net.spec.flat_size:.0%})")

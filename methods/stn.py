"""`stn`: Self-Tuning Networks (MacKay et al. 2019), and Delta-STN (Bae & Grosse 2020) as the
`variant: delta-stn` option.

The net's layers are best-response layers (methods/stn_layers.py) whose hyper path sees the
hyperparameters lambda. Tuned (the `tune` groups):
    dropout      input dropout and dropout at every site of the target, [0, 0.95]
    input_noise  std of Gaussian noise on the standardised inputs, [0, inf) (softplus)
    jitter       brightness, contrast, saturation [0, 1] and hue [0, 0.5] (the last two RGB only)
    cutout       cutout length [0, min(H, W) + 1) and holes [0, 5), discrete
Each is stored unconstrained (`u`) and perturbed per example, lambda~ = u + softplus(s) * eps.
Every training example gets its own lambda~, hence its own dropout mask rates, noise,
jitter factors and cutout (vectorised over the batch); the rates are detached, so the
hypergradient is the response gradient through the hyper path, as in the reference code.

Training (`train_epoch`, one pass over the training data):
- warm-up (`warmup_epochs`): training steps only, lambda not updated;
- then alternate `train_steps` training steps (elementary and hyper-path weights, SGD with
  momentum, perturbed lambda, regularised) and `val_steps` validation steps (Adam on u and,
  with `tune_scales`, on s; no dropout or augmentation; loss = val loss - tau * entropy of the
  perturbation, entropy = sum log(softplus(s) sqrt(2 pi e))).
Delta-STN: the hypernet input is centred, lambda~ - stopgrad(u); the bottleneck starts at
zero; a training step updates the general (elementary) weights on the unperturbed lambda and
then the response (hyper-path) weights on the perturbed one.

Reports `hp/<name>` (the current value of u in range) and `perturb_scale/<name>` every step.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from hypersweep.methods.alternating import AlternatingTuner
from hypersweep.methods.augment import color_jitter, cutout
from hypersweep.methods.data import Splits
from hypersweep.methods.hparams import HParam, resolve
from hypersweep.methods.losses import metrics, task_loss
from hypersweep.methods.seeding import Stream, stream_generator
from hypersweep.methods.stn_layers import build_stn_net
from hypersweep.methods.targets import TargetNet
from hypersweep.methods.tuned import Space, Tuned, inv_softplus

GROUPS = ("dropout", "input_noise", "jitter", "cutout")
VARIANTS = ("stn", "delta-stn")
DROPOUT_MAX = 0.95


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 0.01, 1e-8, 10.0, doc="SGD learning rate of the elementary and hyper-path weights"),
        HParam("momentum", 0.9, 0.0, 0.999),
        HParam("weight_decay", 0.0, 0.0, 1.0),
        HParam("hyper_lr", 3e-3, 1e-8, 10.0, doc="Adam learning rate of the hyperparameters"),
        HParam("scale_lr", 3e-3, 1e-8, 10.0, doc="Adam learning rate of the perturbation scales"),
        HParam("batch_size", 128, 1, 1 << 20, kind=int),
        HParam("warmup_epochs", 5, 0, 1 << 20, kind=int),
        HParam("train_steps", 2, 1, 1 << 10, kind=int, doc="T_train"),
        HParam("val_steps", 1, 1, 1 << 10, kind=int, doc="T_val"),
        HParam("entropy_weight", 1e-3, 0.0, 1e3, doc="tau"),
        HParam("perturb_scale", 0.5, 1e-4, 100.0, doc="initial softplus(s)"),
        HParam("tune_scales", 1, 0, 1, kind=int),
        HParam("variant", "stn", kind=str, doc="stn or delta-stn", choices=VARIANTS),
        HParam("tune", "dropout,input_noise", kind=str, doc="comma-separated groups", choices=GROUPS, multi=True),
        HParam("init_dropout", 0.05, 1e-4, DROPOUT_MAX - 1e-4),
        HParam("init_input_noise", 0.05, 1e-4, 100.0),
        HParam("init_jitter", 0.05, 1e-4, 0.49),
        HParam("init_cutout_length", 4.0, 0.5, 1e4),
        HParam("init_cutout_holes", 1.0, 0.5, 4.5),
    ]
    return {hp.name: hp for hp in hps}


def dropout_names(n_sites: int) -> list[str]:
    return ["dropout_in"] + [f"dropout_{k}" for k in range(1, n_sites)]


# the start value of each tuned hyperparameter: its group's init_<...> (dropout_<site>: init_dropout)
START = {"input_noise": "init_input_noise", "brightness": "init_jitter", "contrast": "init_jitter",
         "saturation": "init_jitter", "hue": "init_jitter", "cutout_length": "init_cutout_length",
         "cutout_holes": "init_cutout_holes"}


def start_value(hp: Mapping[str, Any], name: str) -> float:
    """Where the STN starts the tuned hyperparameter `name` (resolved `hp`)."""
    return float(hp["init_dropout"] if name.startswith("dropout") else hp[START[name]])


def build_space(hp: Mapping[str, Any], n_sites: int, input_shape: tuple[int, ...]) -> Space:
    groups = [g.strip() for g in hp["tune"].split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"hyperparameter 'tune': unknown group {unknown[0] if unknown else ''!r}; "
                         f"valid: {', '.join(GROUPS)}")
    image = len(input_shape) == 3
    for g in ("jitter", "cutout"):
        if g in groups and not image:
            raise ValueError(f"hyperparameter 'tune': {g} needs image inputs")
    ranges = []  # (name, low, high, discrete)
    if "dropout" in groups:
        ranges += [(n, 0.0, DROPOUT_MAX, False) for n in dropout_names(n_sites)]
    if "input_noise" in groups:
        ranges.append(("input_noise", 0.0, math.inf, False))
    if "jitter" in groups:
        ranges += [("brightness", 0.0, 1.0, False), ("contrast", 0.0, 1.0, False)]
        if input_shape[0] == 3:
            ranges += [("saturation", 0.0, 1.0, False), ("hue", 0.0, 0.5, False)]
    if "cutout" in groups:
        side = min(input_shape[1:])
        ranges += [("cutout_length", 0.0, side + 1.0, True), ("cutout_holes", 0.0, 5.0, True)]
    return Space([Tuned(n, low, high, start_value(hp, n), discrete=d) for n, low, high, d in ranges])


class STN(AlternatingTuner):
    def __init__(self, target: TargetNet, splits: Splits, hp: Mapping[str, Any], *, seed: int,
                 device: str | torch.device = "cpu"):
        self.target, self.splits, self.device = target, splits, torch.device(device)
        self.hp = resolve(hyperparameters(target.n_dropout_sites), hp)
        if self.hp["variant"] not in VARIANTS:
            raise ValueError(f"hyperparameter 'variant': expected one of {', '.join(VARIANTS)}, got {self.hp['variant']!r}")
        self.delta = self.hp["variant"] == "delta-stn"
        self.space = build_space(self.hp, target.n_dropout_sites, splits.input_shape)
        self.data_gen = stream_generator(seed, Stream.ORDER)  # data order, validation batches, on the CPU
        self.noise_gen = stream_generator(seed, Stream.NOISE, self.device)  # perturbations, masks, augmentation
        H = len(self.space)
        self.net = build_stn_net(target, H, zero_bottleneck=self.delta,
                                 generator=stream_generator(seed, Stream.INIT)).to(self.device)
        self.u = self.space.initial().to(self.device).requires_grad_()
        self.s = torch.full((H,), inv_softplus(self.hp["perturb_scale"]), device=self.device, requires_grad=True)
        self.log_noise_std = torch.zeros((), device=self.device, requires_grad=True)  # regression only
        general = self.net.general() + ([self.log_noise_std] if splits.task == "regression" else [])
        sgd = dict(lr=self.hp["lr"], momentum=self.hp["momentum"], weight_decay=self.hp["weight_decay"])
        if self.delta:
            self.optimizers = {"general": torch.optim.SGD(general, **sgd),
                               "response": torch.optim.SGD(self.net.response(), **sgd)}
        else:
            self.optimizers = {"train": torch.optim.SGD(general + self.net.response(), **sgd)}
        self.optimizers["hyper"] = torch.optim.Adam([self.u], lr=self.hp["hyper_lr"])
        self.optimizers["scale"] = torch.optim.Adam([self.s], lr=self.hp["scale_lr"])
        self.data = {name: tuple(t.to(self.device) for t in splits.split(name)) for name in ("train", "val", "test")}
        self.drop_cols = [self.space.index[n] for n in dropout_names(target.n_dropout_sites) if n in self.space.index]
        self._init_loop(self.hp["train_steps"], self.hp["val_steps"])

    # --- hyperparameters -----------------------------------------------------------------
    def values(self) -> torch.Tensor:
        return self.space.project(self.u.detach())

    def perturbed(self, B: int) -> torch.Tensor:
        eps = torch.randn(B, len(self.space), generator=self.noise_gen, device=self.device)
        return self.u + F.softplus(self.s) * eps

    def net_input(self, lam: torch.Tensor) -> torch.Tensor:
        """What the hyper path sees: lambda~ (STN) or lambda~ - stopgrad(u) (Delta-STN)."""
        return lam - self.u.detach() if self.delta else lam

    def entropy(self) -> torch.Tensor:
        return torch.log(F.softplus(self.s) * math.sqrt(2 * math.pi * math.e)).sum()

    # --- one step --------------------------------------------------------------------------
    def regularise(self, x: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example augmentation and input noise of x (standardised), and the dropout rates
        (B, n_sites) or None; `values` (B, H) detached, in range."""
        v = self.space.pipeline(values)
        col = (lambda name: self.space.column(v, name))
        if col("brightness") is not None:
            jittered = color_jitter(self.splits.to_unit(x), col("brightness"), col("contrast"), col("saturation"),
                                    col("hue"), self.noise_gen)
            x = self.splits.from_unit(jittered)
        if col("cutout_length") is not None:
            x = cutout(x, col("cutout_length"), col("cutout_holes"), self.noise_gen)
        noise = col("input_noise")
        if noise is not None:
            x = x + noise.reshape(-1, *(1,) * (x.dim() - 1)) * torch.randn(x.shape, generator=self.noise_gen,
                                                                          device=self.device)
        if not self.drop_cols:
            return x, None
        rates = torch.zeros(x.shape[0], self.net.n_sites, device=self.device)
        names = dropout_names(self.net.n_sites)
        for site, name in enumerate(names):
            if name in self.space.index:
                rates[:, site] = v[:, self.space.index[name]]
        return x, rates

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(out, y, self.splits.task, self.log_noise_std)

    def _train_forward(self, x, y, lam) -> torch.Tensor:
        xr, rates = self.regularise(x, self.space.project(lam.detach()))
        self.net.train()
        return self._loss(self.net(xr, self.net_input(lam), rates, True, self.noise_gen), y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        B = len(x)
        if self.delta:
            clean = self.u.expand(B, -1)  # zero hypernet input, carrying gradient
            self._step(("general",), self._train_forward(x, y, clean))
            loss = self._train_forward(x, y, self.perturbed(B))
            self._step(("response",), loss)
        else:
            loss = self._train_forward(x, y, self.perturbed(B))
            self._step(("train",), loss)
        return float(loss.detach())

    def val_step(self) -> float:
        xv, yv = self.val_batch()
        B = len(xv)
        lam = self.perturbed(B) if self.hp["tune_scales"] else self.u.expand(B, -1)
        self.net.eval()  # no dropout, no augmentation: the response gradient only
        loss = self._loss(self.net(xv, self.net_input(lam)), yv) - self.hp["entropy_weight"] * self.entropy()
        self._step(("hyper", "scale") if self.hp["tune_scales"] else ("hyper",), loss)
        return float(loss.detach())

    # --- evaluation and records ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, chunk: int = 4096) -> dict[str, float]:
        """With the current lambda (unperturbed) and no regularisation."""
        x, y = self.data[split]
        self.net.eval()
        outs = []
        for xc in x.split(chunk):
            h = self.net_input(self.u.expand(len(xc), -1))
            outs.append(self.net(xc, h))
        return metrics(torch.cat(outs), y, self.splits, self.log_noise_std)

    @torch.no_grad()
    def plain_weights(self) -> torch.Tensor:
        """The net at the current hyperparameters as the target's flat weights (P,), what an STN
        arm's model serves: at one lambda a best-response layer is a plain one, weight
        W + e_w * W_hyper and bias b + e_b * b_hyper (e = the bottleneck's scales of lambda), so
        the target evaluates these weights as `evaluate` evaluates the STN."""
        h = self.net_input(self.u.expand(1, -1))
        flat = []
        for layer in self.net.layers:
            e_w, e_b = (e[0] for e in layer.scales(h))
            per_row = (-1,) + (1,) * (layer.weight.dim() - 1)
            flat += [layer.weight + e_w.reshape(per_row) * layer.hyper_weight, layer.bias + e_b * layer.hyper_bias]
        shapes = [tuple(t.shape) for t in flat]
        if shapes != [tuple(s) for s in self.target.spec.shapes]:
            raise ValueError(f"the STN's layers {shapes} do not match the target's {list(self.target.spec.shapes)}")
        return torch.cat([t.reshape(-1) for t in flat])

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        values, scales = self.values(), F.softplus(self.s)
        out = {f"hp/{n}": float(v) for n, v in zip(self.space.names, values)}
        out.update({f"perturb_scale/{n}": float(v) for n, v in zip(self.space.names, scales)})
        return out

    def model_state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "s": self.s.detach().clone()}

    def load_model_state(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            self.s.copy_(state["s"])


METHOD = STN

"""`sgd`: plain maximum-likelihood training of a target net, the trial that grid, random and
Bayesian searches tune.

Hyperparameters: lr, momentum, weight decay, input dropout and per-layer dropout, Gaussian
input noise (on standardised inputs), batch size; on images crop-and-flip and the STN's data
hyperparameters (colour jitter strengths, cutout length and holes), fixed or replayed.
Classification minimises cross-entropy; regression minimises the Gaussian negative
log-likelihood with a learned homoscedastic noise scale, and reports RMSE and NLL in the data's
units.

All randomness comes from generators seeded with named children of `seed` (methods/seeding.py):
initialisation, then data order and noise (dropout masks, input noise, augmentation) from two
generators saved in `state_dict`, so a restored run takes the identical next step.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from hypersweep.methods.augment import color_jitter, crop_flip, cutout
from hypersweep.methods.clock import Deadline
from hypersweep.methods.data import Splits
from hypersweep.methods.hparams import HParam, resolve
from hypersweep.methods.losses import metrics, task_loss
from hypersweep.methods.passes import minibatch_pass
from hypersweep.methods.seeding import Stream, stream_generator
from hypersweep.methods.targets import TargetNet
from hypersweep.methods.tuned import FLOOR_TOLERANCE, inv_softplus

AUGMENTATIONS = ("brightness", "contrast", "saturation", "hue", "cutout_length", "cutout_holes")


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 0.05, 1e-8, 10.0, doc="SGD learning rate"),
        HParam("momentum", 0.9, 0.0, 0.999),
        HParam("weight_decay", 0.0, 0.0, 1.0),
        HParam("batch_size", 64, 1, 1 << 20, kind=int),
        HParam("input_noise", 0.0, 0.0, 10.0, doc="std of Gaussian noise added to standardised inputs"),
        HParam("learn_input_noise", 0, 0, 1, kind=int,
               doc="1: the input noise std is learned, softplus(rho) from input_noise, as hyper-ml's is "
                   "(Sheikh et al. give their SGD baseline the same)"),
        HParam("dropout_in", 0.0, 0.0, 0.95, doc="input dropout"),
        HParam("dropout", 0.0, 0.0, 0.95, doc="dropout after every hidden layer (dropout_<k> overrides layer k)"),
        HParam("augment", 0, 0, 1, kind=int, doc="1: random crop (pad 4) and horizontal flip, images only"),
        # the STN's data hyperparameters (methods/stn.py), so searches and replays tune the same ones
        HParam("brightness", 0.0, 0.0, 1.0, doc="colour jitter strength (0: off), images only"),
        HParam("contrast", 0.0, 0.0, 1.0, doc="colour jitter strength (0: off), images only"),
        HParam("saturation", 0.0, 0.0, 1.0, doc="colour jitter strength (0: off), RGB images only"),
        HParam("hue", 0.0, 0.0, 0.5, doc="colour jitter strength (0: off), RGB images only"),
        HParam("cutout_length", 0.0, 0.0, 1e4, doc="cutout square side in pixels, floored (0: off), images only"),
        HParam("cutout_holes", 1.0, 0.0, 5.0, doc="cutout squares per image, floored"),
    ]
    hps += [HParam(f"dropout_{k}", None, 0.0, 0.95) for k in range(1, n_dropout_sites)]
    return {hp.name: hp for hp in hps}


def dropout_rates(hp: Mapping[str, Any], n_dropout_sites: int) -> list[float]:
    """Per-site rates: [input, hidden 1, ..., hidden L]."""
    rates = [hp["dropout_in"]]
    for k in range(1, n_dropout_sites):
        layer = hp.get(f"dropout_{k}")
        rates.append(hp["dropout"] if layer is None else layer)
    return [float(r) for r in rates]


class SGD:
    family = "plain"
    generative = False

    def __init__(self, target: TargetNet, splits: Splits, hp: Mapping[str, Any], *, seed: int,
                 device: str | torch.device = "cpu", schedule: Sequence[Sequence[Any]] | None = None):
        """`schedule`: [[epoch, {dropout_in | dropout_<k> | input_noise: value}], ...], e.g. one
        an STN learned; from each listed epoch on, those values replace the fixed ones."""
        self.target, self.splits, self.device = target, splits, torch.device(device)
        self.hp = resolve(hyperparameters(target.n_dropout_sites), hp)
        if self.hp["augment"] and len(splits.input_shape) != 3:
            raise ValueError("hyperparameter 'augment': crop and flip need image inputs")
        for name in AUGMENTATIONS:
            if self.hp[name] and name != "cutout_holes" and len(splits.input_shape) != 3:
                raise ValueError(f"hyperparameter {name!r}: needs image inputs")
        self.augmentation = {name: float(self.hp[name]) for name in AUGMENTATIONS}  # a schedule may change them
        self.data_gen = stream_generator(seed, Stream.ORDER)  # on the CPU, like the permutations it draws
        self.noise_gen = stream_generator(seed, Stream.NOISE, self.device)  # dropout, input noise, augmentation
        self.module = target.module().to(self.device)
        target.load_flat(self.module, target.init_weights(stream_generator(seed, Stream.INIT)))
        learned = bool(self.hp["learn_input_noise"])
        self.module.reg.configure(dropout=dropout_rates(self.hp, target.n_dropout_sites),
                                  input_noise=0.0 if learned else self.hp["input_noise"], generator=self.noise_gen)
        self.log_noise_std = torch.zeros((), device=self.device, requires_grad=True)  # regression only
        # learned input noise: its std softplus(rho) is trained with the net (None: fixed or none)
        self.input_noise_rho = torch.tensor(inv_softplus(self.hp["input_noise"] or 0.5), device=self.device,
                                            requires_grad=True) if learned else None
        params = list(self.module.parameters())
        if learned:
            params.append(self.input_noise_rho)
        if splits.task == "regression":
            params.append(self.log_noise_std)
        self.optimizer = torch.optim.SGD(params, lr=self.hp["lr"], momentum=self.hp["momentum"],
                                         weight_decay=self.hp["weight_decay"])
        self.data = {name: tuple(t.to(self.device) for t in splits.split(name)) for name in ("train", "val", "test")}
        self.epoch = 0
        self.schedule = sorted(([int(e), dict(v)] for e, v in schedule), key=lambda item: item[0]) if schedule else []
        if learned and any("input_noise" in dict(v) for _, v in self.schedule):
            raise ValueError("schedule: input_noise cannot be scheduled when it is learned (learn_input_noise: 1)")
        names = {"dropout_in", "input_noise", *(f"dropout_{k}" for k in range(1, target.n_dropout_sites))}
        if len(splits.input_shape) == 3:
            names |= set(AUGMENTATIONS)
        for _, values in self.schedule:
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"schedule: {unknown[0]!r} is not a dropout, input-noise or augmentation setting "
                                 f"of this model")

    def _apply_schedule(self) -> None:
        """The latest schedule entry at or before this epoch sets dropout and input noise."""
        current = [values for epoch, values in self.schedule if epoch <= self.epoch]
        if not current:
            return
        values = current[-1]
        reg = self.module.reg
        rates = list(reg.dropout)
        for name, value in values.items():
            if name == "input_noise":
                reg.input_noise = float(value)
            elif name in AUGMENTATIONS:
                self.augmentation[name] = float(value)
            else:
                rates[0 if name == "dropout_in" else int(name.split("_")[1])] = float(value)
        reg.dropout = rates

    def diagnostics(self) -> dict[str, float]:
        """With a schedule: the values in use (`hp/<name>`), comparable with the STN's reports;
        with learned input noise: its std now (`input_noise`, as hyper-ml reports its own)."""
        out = {"input_noise": float(F.softplus(self.input_noise_rho.detach()))} if self.input_noise_rho is not None else {}
        if not self.schedule:
            return out
        reg = self.module.reg
        if any("input_noise" in v for _, v in self.schedule):
            out["hp/input_noise"] = reg.input_noise
        out.update({"hp/dropout_in" if k == 0 else f"hp/dropout_{k}": r for k, r in enumerate(reg.dropout)})
        scheduled = {name for _, v in self.schedule for name in v}
        out.update({f"hp/{name}": value for name, value in self.augmentation.items() if name in scheduled})
        return out

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Colour jitter, then cutout, as the STN applies them (methods/stn.py), at fixed strengths."""
        a, B = self.augmentation, x.shape[0]
        strength = (lambda name: torch.full((B,), a[name], device=x.device) if a[name] > 0 else None)
        if any(a[n] > 0 for n in ("brightness", "contrast", "saturation", "hue")):
            jittered = color_jitter(self.splits.to_unit(x), strength("brightness"), strength("contrast"),
                                    strength("saturation"), strength("hue"), self.noise_gen)
            x = self.splits.from_unit(jittered)
        length, holes = (math.floor(a[n] + FLOOR_TOLERANCE) for n in ("cutout_length", "cutout_holes"))
        if length > 0 and holes > 0:
            x = cutout(x, torch.full((B,), float(length), device=x.device),
                       torch.full((B,), float(holes), device=x.device), self.noise_gen)
        return x

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(out, y, self.splits.task, self.log_noise_std)

    def train_epoch(self, deadline: Deadline | None = None) -> float:
        """One pass over the training split; returns the mean training loss. With a `deadline`,
        the pass stops after the minibatch that reaches it and does not count as an epoch."""
        x, y = self.data["train"]
        self._apply_schedule()
        self.module.train()

        def step(idx):
            xb = crop_flip(x[idx], self.noise_gen) if self.hp["augment"] else x[idx]
            if xb.dim() == 4:
                xb = self._augment(xb)
            if self.input_noise_rho is not None:
                xb = xb + F.softplus(self.input_noise_rho) * torch.randn(xb.shape, generator=self.noise_gen,
                                                                         device=self.device)
            loss = self.loss(self.module(xb), y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss

        mean, complete = minibatch_pass(len(x), self.hp["batch_size"], self.data_gen, self.device, step, deadline)
        self.epoch += complete
        return mean

    @torch.no_grad()
    def evaluate(self, split: str, chunk: int = 4096) -> dict[str, float]:
        """`loss` and `error` (classification) or `loss` and `rmse` (regression), in data units."""
        x, y = self.data[split]
        self.module.eval()
        out = torch.cat([self.module(xc) for xc in x.split(chunk)])
        return metrics(out, y, self.splits, self.log_noise_std)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "log_noise_std": self.log_noise_std.detach().clone(), "epoch": self.epoch,
                "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state(),
                **({"input_noise_rho": self.input_noise_rho.detach().clone()} if self.input_noise_rho is not None else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.log_noise_std.copy_(state["log_noise_std"])
            if self.input_noise_rho is not None:
                self.input_noise_rho.copy_(state["input_noise_rho"])
        self.epoch = int(state["epoch"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])



METHOD = SGD

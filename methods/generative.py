"""What every generative method shares: a network that generates target weights, trained by
minibatches; predictions averaged over a fixed set of weight samples; exact state for
checkpoints. Subclasses (one file per method) implement:

    hyperparameters(n_dropout_sites) -> {name: HParam}  (a staticmethod: the module's function)
    build(target, generator) -> trainable tensors       the generator network and its extras
    optimizer(params) -> torch.optim.Optimizer
    sample_weights(k, generator, training=False) -> (k, P)
    train_batch(x, y) -> loss                            one minibatch, loss to minimise
    extra_state() / load_extra_state(state)              the subclass's own tensors
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from hypersweep.methods.clock import Deadline
from hypersweep.methods.data import Splits
from hypersweep.methods.hparams import resolve
from hypersweep.methods.losses import metrics
from hypersweep.methods.passes import minibatch_pass
from hypersweep.methods.seeding import Stream, stream_generator
from hypersweep.methods.targets import TargetNet


class GenerativeMethod:
    family = "generative"
    generative = True

    def __init__(self, target: TargetNet, splits: Splits, hp: Mapping[str, Any], *, seed: int,
                 device: str | torch.device = "cpu"):
        self.target, self.splits, self.device = target, splits, torch.device(device)
        self.hp = resolve(self.hyperparameters(target.n_dropout_sites), hp)
        self.seed = seed
        self.data_gen = stream_generator(seed, Stream.ORDER)  # data order, on the CPU
        self.noise_gen = stream_generator(seed, Stream.NOISE, self.device)  # training samples, noise, dropout
        params = self.build(target, stream_generator(seed, Stream.INIT))
        self.log_noise_std = torch.zeros((), device=self.device, requires_grad=True)  # regression only
        if splits.task == "regression":
            params.append(self.log_noise_std)
        self.optim = self.optimizer(params)
        self.data = {name: tuple(t.to(self.device) for t in splits.split(name)) for name in ("train", "val", "test")}
        self.epoch = 0

    @staticmethod
    def adam(params, **options) -> torch.optim.Adam:
        """Adam with PyTorch's fused kernel: one pass over each parameter instead of ~10, which
        is what bounds a step when the hypernet's output layer holds tens of millions of
        parameters (hyper-ml's 24M: 293 -> 33 ms per step on one CPU thread, bench README).
        Same update as the default loop within float32 rounding (tests/test_hyper_ml.py)."""
        params = list(params)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, fused=fused or None, **options)

    def scheduler_step(self) -> None:
        """Called after every optimiser step (e.g. a per-step learning-rate decay)."""

    def train_epoch(self, deadline: Deadline | None = None) -> float:
        """One pass (see SGD.train_epoch for the `deadline`)."""
        x, y = self.data["train"]

        def step(idx):
            loss = self.train_batch(x[idx], y[idx])
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
            self.scheduler_step()
            return loss

        mean, complete = minibatch_pass(len(x), self.hp["batch_size"], self.data_gen, self.device, step, deadline)
        self.epoch += complete
        return mean

    def eval_generator(self) -> torch.Generator:
        # A fixed set of test samples: evaluation does not disturb training's random stream.
        return stream_generator(self.seed, Stream.EVAL, self.device)

    def draw(self, k: int, generator: torch.Generator):
        """k weight samples in the form `forward_samples` takes: by default the (k, P) weights;
        a method with a cheaper representation (hyper-posterior's modulations) overrides both."""
        return self.sample_weights(k, generator)

    def forward_samples(self, samples, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) through every sample: (k, B, out)."""
        return self.target.forward(samples, x)

    @torch.no_grad()
    def sample_outputs(self, x: torch.Tensor, samples, chunk: int = 2048) -> torch.Tensor:
        """(k, B, out) outputs of every sample (logits or standardised means), evaluated in
        chunks of examples, never in a loop over samples."""
        return torch.cat([self.forward_samples(samples, xc) for xc in x.split(chunk)], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, samples, chunk: int = 2048) -> torch.Tensor:
        """Mean prediction over weight samples: probabilities or regression means (B, out)."""
        out = self.sample_outputs(x, samples, chunk)
        return out.softmax(-1).mean(0) if self.splits.task == "classification" else out.mean(0)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the mean prediction over `eval_samples` samples, and `error_single`
        (`rmse_single`): the mean over those samples of each one's own error."""
        x, y = self.data[split]
        out = self.sample_outputs(x, self.draw(self.hp["eval_samples"], self.eval_generator()))
        if self.splits.task == "classification":
            result = metrics(out.softmax(-1).mean(0), y, self.splits, probabilities=True)
            result["error_single"] = float((out.argmax(-1) != y).float().mean())
        else:
            result = metrics(out.mean(0), y, self.splits, self.log_noise_std)
            rmse = ((out.squeeze(-1) - y) ** 2).mean(1).sqrt() * self.splits.y_std
            result["rmse_single"] = float(rmse.mean())
        return result

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """`weight_std`: std across 10 weight samples, averaged over weight dimensions."""
        return {"weight_std": float(self.sample_weights(10, self.eval_generator()).std(0).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {**self.extra_state(), "optimizer": self.optim.state_dict(),
                "log_noise_std": self.log_noise_std.detach().clone(), "epoch": self.epoch,
                "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_extra_state(state)
        self.optim.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.log_noise_std.copy_(state["log_noise_std"])
        self.epoch = int(state["epoch"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])

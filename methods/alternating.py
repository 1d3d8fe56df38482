"""The loop shared by the methods that tune hyperparameters by gradient within one run (`stn`,
`hyper-hpo`): training steps on the training data alternate with hyperparameter steps on the
validation data after a warm-up, each step zeroing every optimiser and stepping only its own.

A subclass sets `self.optimizers` (a dict), `self.u` (the unconstrained hyperparameters),
`self.log_noise_std`, the generators and `self.data`, then calls `_init_loop(train_steps,
val_steps)`; it implements `train_step(x, y)`, `val_step()`, `model_state()` and
`load_model_state(state)`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from hypersweep.methods.clock import Deadline
from hypersweep.methods.passes import minibatch_pass


class AlternatingTuner:
    family = "tuner"  # tunes hyperparameters within one run
    generative = False

    def _init_loop(self, train_steps: int, val_steps: int) -> None:
        self.train_steps_per_round, self.val_steps_per_round = train_steps, val_steps
        self.epoch, self.steps, self.val_cursor = 0, 0, 0
        self.val_perm = torch.randperm(len(self.data["val"][0]), generator=self.data_gen)

    def val_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next validation minibatch, cycling through reshuffled validation data."""
        xv, yv = self.data["val"]
        B = min(self.hp["batch_size"], len(xv))
        if self.val_cursor + B > len(xv):
            self.val_perm = torch.randperm(len(xv), generator=self.data_gen)
            self.val_cursor = 0
        idx = self.val_perm[self.val_cursor:self.val_cursor + B].to(self.device)
        self.val_cursor += B
        return xv[idx], yv[idx]

    def _step(self, names: tuple[str, ...], loss: torch.Tensor) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            self.optimizers[name].step()

    def train_epoch(self, deadline: Deadline | None = None) -> float:
        """One pass over the training data; after the warm-up, `val_steps` hyperparameter steps
        follow every `train_steps` training steps (see SGD.train_epoch for the `deadline`)."""
        x, y = self.data["train"]
        warm = self.epoch < self.hp["warmup_epochs"]

        def step(idx):
            loss = self.train_step(x[idx], y[idx])
            self.steps += 1
            if not warm and self.steps % self.train_steps_per_round == 0:
                for _ in range(self.val_steps_per_round):
                    self.val_step()
            return loss

        mean, complete = minibatch_pass(len(x), self.hp["batch_size"], self.data_gen, self.device, step, deadline)
        self.epoch += complete
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {**self.model_state(), "u": self.u.detach().clone(), "log_noise_std": self.log_noise_std.detach().clone(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "epoch": self.epoch, "steps": self.steps, "val_cursor": self.val_cursor, "val_perm": self.val_perm,
                "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_model_state(state)
        with torch.no_grad():
            self.u.copy_(state["u"])
            self.log_noise_std.copy_(state["log_noise_std"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.epoch, self.steps, self.val_cursor = int(state["epoch"]), int(state["steps"]), int(state["val_cursor"])
        self.val_perm = state["val_perm"].clone()
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])

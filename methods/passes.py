"""One shuffled pass over the training data in minibatches, stopping early at a deadline: the
loop every method's `train_epoch` runs."""
from __future__ import annotations

from typing import Callable

import torch

from hypersweep.methods.clock import Deadline, past


def minibatch_pass(n: int, batch_size: int, generator: torch.Generator, device: torch.device,
                   step: Callable[[torch.Tensor], torch.Tensor | float],
                   deadline: Deadline | None = None) -> tuple[float, bool]:
    """Run `step(idx)` (one optimisation step on those rows; returns their mean loss) over a
    permutation of range(n) drawn from `generator`. Past the `deadline` the pass stops after
    the current minibatch. Returns the mean loss over the rows seen and whether the pass was
    complete (a partial pass is not an epoch)."""
    perm = torch.randperm(n, generator=generator).to(device)
    total, seen = 0.0, 0
    for idx in perm.split(batch_size):
        loss = step(idx)
        total = total + (loss.detach() if torch.is_tensor(loss) else loss) * len(idx)
        seen += len(idx)
        if past(deadline) and seen < n:
            return float(total) / seen, False
    return float(total) / n, True

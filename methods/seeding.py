"""Seeds: one master seed per study, child seeds derived with numpy's SeedSequence.spawn."""
from __future__ import annotations

import numpy as np


def repetition_seeds(master: int, n: int) -> list[int]:
    """One integer seed per repetition (arm x seed pairs share it, so arms are paired)."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(master).spawn(n)]


def derived_seed(seed: int, *keys: int) -> int:
    """A child seed of `seed` for the integer keys (e.g. a replica index), independent of it."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


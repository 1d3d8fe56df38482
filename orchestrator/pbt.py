"""Population based training whose random choices come from the arm's search seed.

Ray 2.60's PopulationBasedTraining (ray/tune/schedulers/pbt.py) takes no generator: it calls
the `random` module's functions (`random.choice` of the top trial a bottom one clones in
`_checkpoint_or_exploit`; `random.random` and `random.choice` to resample or perturb in
`_explore`; `random.choice` in `_fill_config`) and resamples a Tune domain with numpy's global
generator (`Domain.sample(None)`). Seeding those would reseed every user of the driver's
global state. Instead, while this scheduler's methods that draw run, the name `random` in
pbt.py points at the scheduler's own `random.Random`, and searched ranges are resampled by
callables that draw from its own numpy generator.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Mapping

import numpy as np
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers import pbt as ray_pbt

from hypersweep.orchestrator.searches import LISTED, tune_domain


class Resample:
    """A new value for one searched hyperparameter, drawn from its range (a Tune domain) with
    the scheduler's generator; PBT calls it to resample and multiplies the value it perturbs."""

    def __init__(self, domain, rng: np.random.Generator):
        self.domain = domain
        self.rng = rng

    def __call__(self):
        return self.domain.sample(random_state=self.rng)


class SeededPopulationBasedTraining(PopulationBasedTraining):
    """PBT over the arm's `hp` space: listed values (grid, choice) mutate within their list,
    ranges (uniform, loguniform, int) are resampled or perturbed by x0.8 / x1.2."""

    def __init__(self, *, seed: int, space: Mapping[str, dict[str, list[Any]]], **kwargs):
        exploit_seq, resample_seq = np.random.SeedSequence(seed).spawn(2)
        self.rng = random.Random(int(exploit_seq.generate_state(1)[0]))
        resample_rng = np.random.default_rng(resample_seq)
        mutations = {}
        for name, domain in space.items():
            (form, values), = domain.items()
            mutations[name] = list(values) if form in LISTED else Resample(tune_domain(domain), resample_rng)
        super().__init__(hyperparam_mutations={"hp": mutations}, **kwargs)

    @contextlib.contextmanager
    def _own_random(self):
        # Tune calls a scheduler from its controller's one thread; nested calls restore in turn.
        before = ray_pbt.random
        ray_pbt.random = self.rng
        try:
            yield
        finally:
            ray_pbt.random = before

    def on_trial_add(self, tune_controller, trial):
        with self._own_random():
            return super().on_trial_add(tune_controller, trial)

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        with self._own_random():
            return super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _get_new_config(self, trial, trial_to_clone):
        with self._own_random():
            return super()._get_new_config(trial, trial_to_clone)

"""Searches and trial schedulers: one registry entry each.

A search chooses the hyperparameters of an arm's trials (a Tune search algorithm); a scheduler
stops or mutates those trials on top of it (a Tune trial scheduler). Each entry holds:

- `build(seed=..., ...)`: its Tune object, seeded with the arm's search seed. Ray and Optuna
  are imported inside, on first use (as Ray's `tune/search/__init__.py` does), so `validate`
  loads neither;
- the rules the study loader (study.py) enforces: the space forms a search accepts (none: it
  takes no space), a scheduler's options with their ranges and the searches it works with;
- the flags planning.py and report.py read (`crosses`, `replicas`, `black_box`, ...).

A new search (say Optuna's CMA-ES sampler) is one entry in `SEARCHES`: tests/test_searches.py
parametrises over the registry, so the contract covers it without more code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# The YAML space forms and their Tune domains; bounds are inclusive in YAML.
FORMS: Mapping[str, Callable[[Any, list], Any]] = {  # (ray.tune, values) -> domain
    "uniform": lambda tune, v: tune.uniform(*v),
    "loguniform": lambda tune, v: tune.loguniform(*v),
    "int": lambda tune, v: tune.randint(v[0], v[1] + 1),  # Tune's upper bound is exclusive
    "choice": lambda tune, v: tune.choice(v),
    "grid": lambda tune, v: tune.grid_search(v),
}
SAMPLED = ("uniform", "loguniform", "int", "choice")  # what a sampling search draws from
LISTED = ("grid", "choice")  # what a crossing search enumerates


def tune_domain(domain: dict[str, list[Any]], grid: bool = False):
    """The Tune domain of a YAML space entry; with `grid`, listed values (grid or choice) are
    all crossed."""
    from ray import tune
    (form, values), = domain.items()
    return tune.grid_search(values) if grid else FORMS[form](tune, values)


@dataclass(frozen=True, kw_only=True)
class Search:
    """How an arm's trials get their hyperparameters. `build(seed=...)` returns a Tune
    SearchAlgorithm or Searcher; Tune's num_samples (planning.num_samples) and the `hp` part of
    the param_space (planning.trial_config) follow from the flags."""
    build: Callable[..., Any]
    forms: tuple[str, ...] = ()  # the space forms it accepts; () takes no space, else needs one
    crosses: bool = False  # runs every combination of listed values (tune.grid_search)
    replicas: bool = False  # num_samples are replicas of one config (own init and noise seeds)
    one_trial: bool = False  # num_samples must be 1
    learns: bool = False  # proposes from the results so far (a Tune Searcher); PBT takes none
    black_box: bool = False  # its best result is a baseline in report.py's time-to-baseline
    check: Callable[..., None] | None = None  # (study, arm index, fail(key, msg) raises): more arm rules


@dataclass(frozen=True, kw_only=True)
class Option:
    """A scheduler option: a finite number in [low, high] (`open_low`: above low)."""
    default: float
    low: float
    high: float = math.inf
    open_low: bool = False
    whole: bool = False  # a count of reports: a whole number

    def check(self, value: float) -> str | None:
        """None when `value` is valid, else what is wrong."""
        inside = math.isfinite(value) and (value > self.low if self.open_low else value >= self.low) \
            and value <= self.high and (not self.whole or value == int(value))
        return None if inside else f"expected {self.describe()}, got {value!r}"

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low = f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high == math.inf:
            return f"{kind} {low}"
        return f"{kind} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True, kw_only=True)
class Scheduler:
    """A Tune trial scheduler on top of a search. `build(seed=, options=, space=, max_steps=)`
    returns the TrialScheduler (None: Tune's FIFO); times are counted in reports."""
    build: Callable[..., Any]
    works_with: Callable[[Search], bool]
    does: str = ""  # what it does with trials, for the message when the search does not fit
    options: Mapping[str, Option] = field(default_factory=dict)

    def resolve(self, given: Mapping[str, float]) -> dict[str, float]:
        """Defaults overlaid with `given` (validated by the study loader)."""
        return {name: given.get(name, option.default) for name, option in self.options.items()}


def _variant_generator(*, seed: int):
    """Tune's default search: grid crossing and independent random draws."""
    import numpy as np
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=np.random.default_rng(seed))


def _optuna(sampler: str) -> Callable[..., Any]:
    """An Optuna sampler (a name in optuna.samplers) through Tune's OptunaSearch."""
    def build(*, seed: int):
        import optuna
        from ray.tune.search.optuna import OptunaSearch
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # The seed goes to the sampler: OptunaSearch's own `seed` only seeds its default sampler.
        return OptunaSearch(sampler=getattr(optuna.samplers, sampler)(seed=seed % 2 ** 32))
    return build


def _check_replay(study, i: int, fail: Callable[[str, str], None]) -> None:
    """A replay arm trains sgd with the schedule of data hyperparameters (dropout, input noise,
    jitter, cutout) an earlier STN arm learned, a final arm with its last values held fixed
    from the start (MacKay et al. 2019, Table 1's baselines); so it runs after that arm, one
    trial per seed."""
    arm = study.arms[i]
    earlier = {a.name: a for a in study.arms[:i]}
    source = earlier.get(arm.replay or "")
    if study.budget.schedule == "concurrent":
        fail("budget.schedule", "a replay arm needs its STN arm's schedule first; use schedule: sequential")
    if source is None or source.method != "stn":
        stn_arms = ", ".join(n for n, a in earlier.items() if a.method == "stn")
        fail(f"arms[{i}].search.replay", f"{arm.replay!r} is not an stn arm listed before this one"
             f"{'; stn arms before it: ' + stn_arms if stn_arms else ''}")
    if arm.method != "sgd":
        fail(f"arms[{i}].method", f"a replayed schedule trains 'sgd', got {arm.method!r}")
    # (sgd takes every group an STN tunes: dropout, input noise, jitter, cutout)


SEARCHES: dict[str, Search] = {
    "fixed": Search(build=_variant_generator, replicas=True),
    "grid": Search(build=_variant_generator, forms=LISTED, crosses=True, black_box=True),
    "random": Search(build=_variant_generator, forms=SAMPLED, black_box=True),
    "tpe": Search(build=_optuna("TPESampler"), forms=SAMPLED, learns=True, black_box=True),
    "gp": Search(build=_optuna("GPSampler"), forms=SAMPLED, learns=True, black_box=True),  # needs torch, scipy
    "replay": Search(build=_variant_generator, one_trial=True, check=_check_replay),
    "final": Search(build=_variant_generator, one_trial=True, check=_check_replay),  # the STN's last values, fixed
}
STN_SOURCED = ("replay", "final")  # searches whose values come from an earlier STN arm (arm.replay)


def _fifo(**_) -> None:
    return None


def _asha(*, seed: int, options: Mapping[str, float], space: Mapping[str, Any], max_steps: int):
    from ray.tune.schedulers import ASHAScheduler
    # `seed` is not used: ASHA's one draw picks a trial's bracket, and there is one bracket.
    return ASHAScheduler(time_attr="training_iteration", max_t=max(max_steps, 1),
                         grace_period=int(options["grace_period"]), reduction_factor=options["reduction_factor"])


def _pbt(*, seed: int, options: Mapping[str, float], space: Mapping[str, Any], max_steps: int):
    from hypersweep.orchestrator.pbt import SeededPopulationBasedTraining
    return SeededPopulationBasedTraining(seed=seed, space=space, time_attr="training_iteration",
                                         perturbation_interval=int(options["perturbation_interval"]),
                                         quantile_fraction=options["quantile_fraction"])


SCHEDULERS: dict[str, Scheduler] = {
    "none": Scheduler(build=_fifo, works_with=lambda search: True),
    "asha": Scheduler(build=_asha, works_with=lambda search: search.black_box, does="stops the worse of several trials",
                      options={"grace_period": Option(default=1, low=1, whole=True),
                               "reduction_factor": Option(default=3, low=1, open_low=True)}),
    # Tune's PBT refuses a Searcher; a learning search would also learn from mutated trials.
    "pbt": Scheduler(build=_pbt, works_with=lambda search: search.black_box and not search.learns,
                     does="mutates the trials of a non-learning search",
                     options={"perturbation_interval": Option(default=2, low=1, whole=True),
                              "quantile_fraction": Option(default=0.25, low=0, high=0.5, open_low=True)}),
}


def search_entry(name: str) -> Search:
    if name not in SEARCHES:
        raise ValueError(f"unknown search {name!r}; valid: {', '.join(SEARCHES)}")
    return SEARCHES[name]


def scheduler_entry(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


BLACK_BOX = tuple(name for name, search in SEARCHES.items() if search.black_box)  # report.py's baselines

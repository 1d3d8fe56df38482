"""Study files: YAML loaded into frozen, typed objects.

Every problem is one `StudyError` line naming the file and the key (`arms[1].space.lr: ...`);
the CLI turns it into exit code 2 before anything is created.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hypersweep.orchestrator.searches import FORMS, SCHEDULERS, SEARCHES


class StudyError(ValueError):
    """A study file (or an override) that cannot be run; the message is one line."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetConfig(_Frozen):
    name: str
    root: str | None = None  # data root for file-based sets (mnist, cifar10, uci:<name>)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # ignored where the set has its own test split


class ModelConfig(_Frozen):
    kind: Literal["mlp", "cnn", "resnet", "alexnet"] = "mlp"
    hidden: list[int] = [400, 400]  # mlp
    channels: list[int] = [32, 16]  # cnn
    fc_hidden: int | None = Field(None, ge=1)  # cnn (default 8), alexnet (default 4096)
    depth: int = Field(16, ge=10)  # resnet: 6n + 4 (WRN-depth-width)
    width: int = Field(4, ge=1)  # resnet
    norm_groups: int = Field(8, ge=1)  # resnet: GroupNorm groups

    def target_options(self) -> dict[str, Any]:
        if self.kind == "mlp":
            return {"kind": "mlp", "hidden": list(self.hidden)}
        if self.kind == "resnet":
            return {"kind": "resnet", "depth": self.depth, "width": self.width, "norm_groups": self.norm_groups}
        if self.kind == "alexnet":
            return {"kind": "alexnet", "fc_hidden": self.fc_hidden or 4096}
        return {"kind": "cnn", "channels": list(self.channels), "fc_hidden": self.fc_hidden or 8}


class EnsembleConfig(_Frozen):
    members: int = Field(ge=2)  # samples of a generative method; best independent trials otherwise
    distill: Literal["polyak", "none"] = "polyak"
    # the generator of a generative method's member samples; default: the repetition's
    # ensemble seed (methods/seeding.py), so each repetition draws its own members
    sample_seed: int | None = None


class ArmConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: str
    search: str = "fixed"  # a name in searches.SEARCHES
    replay: str | None = None  # search 'replay': the STN arm whose learned schedule this arm trains with
    params: dict[str, Any] = {}  # fixed hyperparameter values
    space: dict[str, dict[str, list[Any]]] = {}  # searched ones: {lr: {loguniform: [1e-3, 0.3]}}
    # trials for random search; repeats of the grid; independent replicas of a fixed arm
    num_samples: int = Field(1, ge=1)
    scheduler: str = "none"  # a name in searches.SCHEDULERS: asha (early stopping), pbt (population based training)
    scheduler_options: dict[str, float] = {}  # the scheduler's options (searches.SCHEDULERS), e.g. asha's grace_period
    ensemble: EnsembleConfig | None = None  # at the end of each arm x seed: ensemble (and distil)
    max_epochs: int | None = Field(None, ge=1)  # per trial; default training.max_epochs

    @model_validator(mode="before")
    @classmethod
    def _replay_form(cls, data: Any) -> Any:
        """`search: {replay: ARM}` is stored as `search: replay` plus `replay: ARM`."""
        if isinstance(data, dict) and isinstance(data.get("search"), dict):
            search = data["search"]
            if set(search) != {"replay"} or not isinstance(search["replay"], str):
                raise ValueError(f"search as a mapping takes one key, replay: <arm name>; got {search!r}")
            data = {**data, "search": "replay", "replay": search["replay"]}
        return data


class BudgetConfig(_Frozen):
    seconds: float = Field(gt=0)  # wall clock per arm x seed, setup included
    workers: int = Field(1, ge=1)  # concurrent trial slots
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions share a GPU
    # sequential: arms one after another, each on all worker slots; concurrent: the arms of a
    # repetition at the same time, each on workers / arms slots
    schedule: Literal["sequential", "concurrent"] = "sequential"


class TrainingConfig(_Frozen):
    max_epochs: int = Field(100, ge=1)  # per trial
    epochs_per_step: int = Field(1, ge=1)  # epochs between two reports
    checkpoint_every: int = Field(10, ge=1)  # reports between two checkpoints
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker died, from its last checkpoint
    device: str = "auto"


class TrackingConfig(_Frozen):
    uri: str | None = None  # MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default: the study's name


class Study(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0  # master seed; repetitions get child seeds from it
    seeds: int = Field(1, ge=1)  # repetitions of every arm
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    arms: list[ArmConfig] = Field(min_length=1)
    budget: BudgetConfig
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.[\d_]*|\.\d+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _where(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_study(raw: Any, source: str = "<study>", overrides: dict[str, Any] | None = None) -> Study:
    """Validate a mapping (from YAML) into a Study; `overrides` are dotted keys (`budget.seconds`)."""
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: expected a mapping of study keys, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        study = Study.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"].endswith("_type"):
            msg = f"{msg}, got {err['input']!r}"
        raise StudyError(f"{source}: {_where(loc)}: {msg}") from None
    _check_semantics(study, source)
    return study


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StudyError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_study(raw, str(path), overrides)


def _check_semantics(study: Study, source: str) -> None:
    from hypersweep.methods import METHODS, is_generative, method_module
    from hypersweep.methods.data import check_name
    from hypersweep.methods.targets import n_dropout_sites

    def fail(where: str, msg: str):
        raise StudyError(f"{source}: {where}: {msg}")

    try:
        check_name(study.dataset.name)
    except ValueError as e:
        fail("dataset.name", str(e))
    if study.model.kind == "resnet" and (study.model.depth - 4) % 6:
        fail("model.depth", f"a resnet's depth is 6n + 4 (10, 16, 22, 28, ...), got {study.model.depth}")
    if study.budget.schedule == "concurrent":
        if study.budget.workers < len(study.arms):
            fail("budget.workers", f"schedule 'concurrent' splits the worker slots between the {len(study.arms)} arms; "
                 f"needs at least {len(study.arms)}, got {study.budget.workers}")
        if study.budget.workers % len(study.arms):
            fail("budget.workers", f"schedule 'concurrent' gives every arm the same share: {study.budget.workers} "
                 f"slots do not divide among {len(study.arms)} arms")
    names = [a.name for a in study.arms]
    for i, arm in enumerate(study.arms):
        at = f"arms[{i}]"
        if names.index(arm.name) != i:
            fail(f"{at}.name", f"arm name {arm.name!r} is used twice")
        if arm.method not in METHODS:
            fail(f"{at}.method", f"unknown method {arm.method!r}; valid: {', '.join(sorted(METHODS))}")
        if arm.search not in SEARCHES:
            fail(f"{at}.search", f"unknown search {arm.search!r}; valid: {', '.join(SEARCHES)}")
        search = SEARCHES[arm.search]
        declared = method_module(arm.method).hyperparameters(
            n_dropout_sites(study.model.kind, study.model.hidden))
        for key, value in arm.params.items():
            if key not in declared:
                fail(f"{at}.params.{key}", f"unknown hyperparameter of {arm.method!r}; valid: {', '.join(declared)}")
            problem = declared[key].check(value)
            if problem:
                fail(f"{at}.params.{key}", problem)
        if arm.scheduler not in SCHEDULERS:
            fail(f"{at}.scheduler", f"unknown scheduler {arm.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        scheduler = SCHEDULERS[arm.scheduler]
        for key, value in arm.scheduler_options.items():
            if key not in scheduler.options:
                fail(f"{at}.scheduler_options.{key}", f"not an option of scheduler {arm.scheduler!r}; valid: "
                     f"{', '.join(scheduler.options) or 'none'}")
            problem = scheduler.options[key].check(value)
            if problem:
                fail(f"{at}.scheduler_options.{key}", problem)
        if not scheduler.works_with(search):
            fits = [name for name, s in SEARCHES.items() if scheduler.works_with(s)]
            fail(f"{at}.scheduler", f"scheduler {arm.scheduler!r} {scheduler.does}; it works with search "
                 f"{', '.join(fits)}, not {arm.search!r}")
        if search.check:
            search.check(study, i, fail)
        elif arm.replay is not None:
            fail(f"{at}.replay", "only with search: replay")
        if search.one_trial and arm.num_samples != 1:
            fail(f"{at}.num_samples", f"search {arm.search!r} runs one trial per seed; num_samples must be 1")
        if not search.forms and arm.space:
            fail(f"{at}.space", f"search {arm.search!r} takes no space; searches with one: "
                 f"{', '.join(name for name, s in SEARCHES.items() if s.forms)}")
        if search.forms and not arm.space:
            fail(f"{at}.space", f"search {arm.search!r} needs a space of hyperparameters to search")
        if arm.ensemble and not is_generative(arm.method) and arm.ensemble.members > arm.num_samples:
            fail(f"{at}.ensemble.members", f"{arm.method!r} is not generative: an ensemble of {arm.ensemble.members} "
                 f"takes the best of its trials, and num_samples is {arm.num_samples}")
        for key, domain in arm.space.items():
            where = f"{at}.space.{key}"
            if key not in declared:
                fail(where, f"unknown hyperparameter of {arm.method!r}; valid: {', '.join(declared)}")
            if key in arm.params:
                fail(where, "also fixed in params; give it in one place")
            _check_domain(domain, declared[key], arm.search, lambda msg: fail(where, msg))


def _check_domain(domain: dict[str, list[Any]], hp, search_name: str, fail) -> None:
    search = SEARCHES[search_name]
    if len(domain) != 1 or next(iter(domain)) not in FORMS:
        fail(f"expected one of {', '.join(FORMS)} with a list, e.g. {{uniform: [0.0, 0.5]}}")
    (form, values), = domain.items()
    if form not in search.forms:
        how = "crosses listed values" if search.crosses else "samples its space"
        fail(f"search {search_name!r} {how} ({', '.join(search.forms)}), got {form!r}"
             f"{'; grid values belong to search: ' + ' or '.join(n for n, s in SEARCHES.items() if s.crosses) + ' (use choice)' if form == 'grid' else ''}")
    if form in ("uniform", "loguniform") and hp.kind is int:
        fail(f"{form} draws real numbers and {hp.name!r} is an integer; use int: [low, high]")
    if form in ("uniform", "loguniform", "int"):
        if len(values) != 2:
            fail(f"{form} takes [low, high], got {values!r}")
        low, high = values
        for v in values:
            if form == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                fail(f"int takes whole numbers, got {v!r}")
            problem = hp.check(v)
            if problem:
                fail(problem)
        if not low < high:
            fail(f"{form} needs low < high, got {values!r}")
        if form == "loguniform" and low <= 0:
            fail(f"loguniform needs low > 0, got {low!r}")
    else:
        if not values:
            fail(f"{form} needs at least one value")
        for v in values:
            problem = hp.check(v)
            if problem:
                fail(problem)

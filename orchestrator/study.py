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

SEARCHES = ("fixed", "grid", "random", "tpe", "gp", "replay")  # how an arm's hyperparameters are chosen
SCHEDULERS = ("none", "asha", "pbt")  # Tune trial schedulers on top of a search
SCHEDULER_OPTIONS = {"asha": ("grace_period", "reduction_factor"), "pbt": ("perturbation_interval", "quantile_fraction")}
DOMAINS = ("uniform", "loguniform", "int", "choice", "grid")  # search-space forms in YAML


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
    sample_seed: int = 0  # the generator of a generative method's member samples


class ArmConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: str
    search: str = "fixed"
    replay: str | None = None  # search 'replay': the STN arm whose learned schedule this arm trains with
    params: dict[str, Any] = {}  # fixed hyperparameter values
    space: dict[str, dict[str, list[Any]]] = {}  # searched ones: {lr: {loguniform: [1e-3, 0.3]}}
    # trials for random search; repeats of the grid; independent replicas of a fixed arm
    num_samples: int = Field(1, ge=1)
    scheduler: str = "none"  # asha (early stopping) or pbt (population based training)
    scheduler_options: dict[str, float] = {}  # asha: grace_period, reduction_factor; pbt: perturbation_interval, quantile_fraction
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
    from hypersweep.methods import METHODS, method_module
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
        if any(a.search == "replay" for a in study.arms):
            fail("budget.schedule", "a replay arm needs its STN arm's schedule first; use schedule: sequential")
    names = [a.name for a in study.arms]
    for i, arm in enumerate(study.arms):
        at = f"arms[{i}]"
        if names.index(arm.name) != i:
            fail(f"{at}.name", f"arm name {arm.name!r} is used twice")
        if arm.method not in METHODS:
            fail(f"{at}.method", f"unknown method {arm.method!r}; valid: {', '.join(sorted(METHODS))}")
        if arm.search not in SEARCHES:
            fail(f"{at}.search", f"unknown search {arm.search!r}; valid: {', '.join(SEARCHES)}")
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
        for key in arm.scheduler_options:
            if key not in SCHEDULER_OPTIONS.get(arm.scheduler, ()):
                fail(f"{at}.scheduler_options.{key}", f"not an option of scheduler {arm.scheduler!r}; valid: "
                     f"{', '.join(SCHEDULER_OPTIONS.get(arm.scheduler, ())) or 'none'}")
        if arm.scheduler != "none" and arm.search in ("fixed", "replay"):
            fail(f"{at}.scheduler", f"a scheduler needs several trials to compare; search is {arm.search!r}")
        if arm.scheduler == "pbt" and arm.search not in ("random", "grid"):
            fail(f"{at}.scheduler", f"pbt mutates random or grid trials; search is {arm.search!r}")
        if arm.search == "replay":
            earlier = {a.name: a for a in study.arms[:i]}
            source = earlier.get(arm.replay or "")
            if source is None or source.method != "stn":
                fail(f"{at}.search.replay", f"{arm.replay!r} is not an stn arm listed before this one"
                     f"{'; stn arms: ' + ', '.join(n for n, a in earlier.items() if a.method == 'stn') if earlier else ''}")
            if arm.method != "sgd":
                fail(f"{at}.method", f"a replayed schedule trains 'sgd', got {arm.method!r}")
            tuned = source.params.get("tune", "dropout,input_noise")
            if any(g.strip() not in ("dropout", "input_noise") for g in tuned.split(",")):
                fail(f"{at}.search.replay", f"sgd replays dropout and input noise schedules; {arm.replay!r} tunes {tuned!r}")
            if arm.space or arm.num_samples != 1:
                fail(f"{at}.search", "a replay arm runs one trial with the learned schedule; no space or num_samples")
        elif arm.replay is not None:
            fail(f"{at}.replay", "only with search: replay")
        if arm.search == "fixed":
            if arm.space:
                fail(f"{at}.space", "search 'fixed' takes no space; use search: random or grid")
        elif not arm.space and arm.search != "replay":
            fail(f"{at}.space", f"search {arm.search!r} needs a space of hyperparameters to search")
        if arm.ensemble and not _is_generative(arm.method) and arm.ensemble.members > arm.num_samples:
            fail(f"{at}.ensemble.members", f"{arm.method!r} is not generative: an ensemble of {arm.ensemble.members} "
                 f"takes the best of its trials, and num_samples is {arm.num_samples}")
        for key, domain in arm.space.items():
            where = f"{at}.space.{key}"
            if key not in declared:
                fail(where, f"unknown hyperparameter of {arm.method!r}; valid: {', '.join(declared)}")
            if key in arm.params:
                fail(where, "also fixed in params; give it in one place")
            _check_domain(domain, declared[key], arm.search, lambda msg: fail(where, msg))


def _is_generative(method: str) -> bool:
    from hypersweep.methods import method_module
    return hasattr(method_module(method).METHOD, "sample_weights")


def _check_domain(domain: dict[str, list[Any]], hp, search: str, fail) -> None:
    if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
        fail(f"expected one of {', '.join(DOMAINS)} with a list, e.g. {{uniform: [0.0, 0.5]}}")
    (form, values), = domain.items()
    if search == "grid" and form not in ("grid", "choice"):
        fail(f"search 'grid' needs listed values ({{grid: [...]}}), got {form!r}")
    if search in ("tpe", "gp", "random") and form == "grid":
        fail(f"search {search!r} samples its space; grid values belong to search: grid (use choice)")
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

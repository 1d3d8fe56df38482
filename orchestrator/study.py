"""Study files: YAML loaded into frozen, typed objects.

Every problem is one `StudyError` line naming the file and the key (`arms[1].space.lr: ...`);
the CLI turns it into exit code 2 before anything is created.

A study file is read within bounds before anything is expanded from it: at most
`MAX_FILE_BYTES` of UTF-8, YAML nested at most `MAX_DEPTH` deep with at most `MAX_ALIASES`
aliases and `MAX_VALUES` values once they are expanded, no key given twice; every count and
size in it has an upper bound (the largest real study is far below each), and an error quotes
at most `MAX_QUOTE` characters of what it names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hypersweep.orchestrator.searches import FORMS, SCHEDULERS, SEARCHES, STN_SOURCED


MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 100
MAX_VALUES = 100_000
MAX_QUOTE = 80
MAX_RUNS = 10_000  # arms x seeds
MAX_SEED = 2 ** 63 - 1
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"  # a directory and an MLflow name: at most 100 characters


class StudyError(ValueError):
    """A study file (or an override) that cannot be run; the message is one line."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever was quoted
        super().__init__(message if len(message) <= 1000 else message[:997] + "...")


def quote(value: Any) -> str:
    """`repr(value)`, cut to MAX_QUOTE characters (a repr of a huge input must not fill a terminal)."""
    if isinstance(value, (dict, list)) and _count(value, MAX_QUOTE) > MAX_QUOTE:
        return f"<a {type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE - 3] + "..."


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Width = Annotated[int, Field(ge=1, le=65536)]
Channels = Annotated[int, Field(ge=1, le=4096)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class DatasetConfig(_Frozen):
    name: str = Field(max_length=100)
    root: str | None = Field(None, max_length=4096)  # data root for file-based sets (mnist, cifar10, uci:<name>)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # ignored where the set has its own test split


class ModelConfig(_Frozen):
    kind: Literal["mlp", "cnn", "resnet", "alexnet"] = "mlp"
    hidden: list[Width] = Field([400, 400], max_length=64)  # mlp
    channels: list[Channels] = Field([32, 16], min_length=1, max_length=32)  # cnn
    fc_hidden: int | None = Field(None, ge=1, le=65536)  # cnn (default 8), alexnet (default 4096)
    depth: int = Field(16, ge=10, le=1000)  # resnet: 6n + 4 (WRN-depth-width)
    width: int = Field(4, ge=1, le=64)  # resnet
    norm_groups: int = Field(8, ge=1, le=1024)  # resnet: GroupNorm groups

    def target_options(self) -> dict[str, Any]:
        if self.kind == "mlp":
            return {"kind": "mlp", "hidden": list(self.hidden)}
        if self.kind == "resnet":
            return {"kind": "resnet", "depth": self.depth, "width": self.width, "norm_groups": self.norm_groups}
        if self.kind == "alexnet":
            return {"kind": "alexnet", "fc_hidden": self.fc_hidden or 4096}
        return {"kind": "cnn", "channels": list(self.channels), "fc_hidden": self.fc_hidden or 8}


class EnsembleConfig(_Frozen):
    members: int = Field(ge=2, le=10_000)  # samples of a generative method; best independent trials otherwise
    distill: Literal["polyak", "none"] = "polyak"
    # the generator of a generative method's member samples; default: the repetition's
    # ensemble seed (methods/seeding.py), so each repetition draws its own members
    sample_seed: Seed | None = None


class ArmConfig(_Frozen):
    name: str = Field(pattern=NAME)
    method: str = Field(max_length=100)
    search: str = Field("fixed", max_length=100)  # a name in searches.SEARCHES
    replay: str | None = Field(None, max_length=100)  # search 'replay': the STN arm whose learned schedule this arm trains with
    params: dict[str, Any] = Field({}, max_length=64)  # fixed hyperparameter values
    # searched ones: {lr: {loguniform: [1e-3, 0.3]}}
    space: dict[str, dict[str, Annotated[list[Any], Field(max_length=10_000)]]] = Field({}, max_length=64)
    # trials for random search; repeats of the grid; independent replicas of a fixed arm
    num_samples: int = Field(1, ge=1, le=100_000)
    scheduler: str = Field("none", max_length=100)  # a name in searches.SCHEDULERS: asha (early stopping), pbt
    scheduler_options: dict[str, float] = {}  # the scheduler's options (searches.SCHEDULERS), e.g. asha's grace_period
    ensemble: EnsembleConfig | None = None  # at the end of each arm x seed: ensemble (and distil)
    max_epochs: int | None = Field(None, ge=1, le=1_000_000)  # per trial; default training.max_epochs

    @model_validator(mode="before")
    @classmethod
    def _replay_form(cls, data: Any) -> Any:
        """`search: {replay: ARM}` is stored as `search: replay` plus `replay: ARM`; `search:
        {final: ARM}` (the STN's last values, fixed) as `search: final` plus `replay: ARM`."""
        if isinstance(data, dict) and isinstance(data.get("search"), dict):
            search = data["search"]
            (kind, source), = search.items() if len(search) == 1 else [(None, None)]
            if kind not in STN_SOURCED or not isinstance(source, str):
                raise ValueError(f"search as a mapping takes one key, replay or final: <stn arm name>; got {search!r}")
            data = {**data, "search": kind, "replay": source}
        return data


class BudgetConfig(_Frozen):
    seconds: float = Field(gt=0, le=366 * 86400)  # wall clock per arm x seed, setup included
    workers: int = Field(1, ge=1, le=4096)  # concurrent trial slots
    cpus_per_worker: float = Field(1.0, ge=0.01, le=1024)  # (Ray's resources have 1e-4 granularity)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)  # fractions share a GPU
    # sequential: arms one after another, each on all worker slots; concurrent: the arms of a
    # repetition at the same time, each on workers / arms slots
    schedule: Literal["sequential", "concurrent"] = "sequential"


class TrainingConfig(_Frozen):
    max_epochs: int = Field(100, ge=1, le=1_000_000)  # per trial
    epochs_per_step: int = Field(1, ge=1, le=1_000_000)  # epochs between two reports
    checkpoint_every: int = Field(10, ge=1, le=1_000_000)  # reports between two checkpoints
    max_failures: int = Field(2, ge=0, le=100)  # retries of a trial whose worker died, from its last checkpoint
    # auto: a GPU when Ray assigned one (budget.gpus_per_worker), else the CPU
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")


class TrackingConfig(_Frozen):
    # MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    uri: str | None = Field(None, max_length=2048)
    experiment: str | None = Field(None, min_length=1, max_length=250)  # default: the study's name


class Study(_Frozen):
    name: str = Field(pattern=NAME)
    seed: Seed = 0  # master seed; repetitions get child seeds from it
    seeds: int = Field(1, ge=1, le=1000)  # repetitions of every arm
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    arms: list[ArmConfig] = Field(min_length=1, max_length=100)
    budget: BudgetConfig
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False)

    def pinned(self) -> "Study":
        """This study with every arm's unsearched hyperparameters written out: the values given,
        then each declared default, as the installed methods define them now. A study directory
        records this form (study.yaml, and so Tune's trial configs and MLflow's params), so a
        study resumed after an upgrade that changed a default trains what it started with, and
        its checkpoints still fit. Defaults of None ("follow another value", e.g. sgd's
        dropout_<k>) stay unwritten: their meaning does not change."""
        from hypersweep.methods import method_module
        from hypersweep.methods.targets import n_dropout_sites
        sites = n_dropout_sites(self.model.kind, self.model.hidden)
        arms = []
        for arm in self.arms:
            declared = method_module(arm.method).hyperparameters(sites)
            defaults = {name: list(hp.default) if isinstance(hp.default, list) else hp.default
                        for name, hp in declared.items()
                        if hp.default is not None and name not in arm.params and name not in arm.space}
            arms.append(arm.model_copy(update={"params": {**arm.params, **defaults}}))
        return self.model_copy(update={"arms": arms})


class _TooBig(yaml.YAMLError):
    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _Loader(yaml.SafeLoader):
    """Safe YAML within bounds (see the module): nesting and aliases are counted as the
    document is composed, a key given twice in one mapping is an error (YAML says keys are
    unique; PyYAML lets the last one win). YAML 1.1 reads `1e-3` as a string: read it as the
    float everyone means."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _TooBig(f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise _TooBig(f"key {quote(key)} given twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


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


def _count(value: Any, limit: int) -> int:
    """How many values `value` holds once its aliases are expanded, counting up to `limit` + 1."""
    n, stack = 0, [value]
    while stack and n <= limit:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def parse_study(raw: Any, source: str = "<study>", overrides: dict[str, Any] | None = None) -> Study:
    """Validate a mapping (from YAML) into a Study; `overrides` are dotted keys (`budget.seconds`)."""
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: expected a mapping of study keys, got {type(raw).__name__}")
    if _count(raw, MAX_VALUES) > MAX_VALUES:
        raise StudyError(f"{source}: more than {MAX_VALUES} values (aliases expanded); a study file is far smaller")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise StudyError(f"{source}: {'.'.join(parents[:depth + 1])}: is {quote(node)}, not a mapping; "
                                 f"cannot set {dotted}")
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
            msg = f"{msg}, got {quote(err['input'])}"
        elif err["type"] == "string_pattern_mismatch" and loc and loc[-1] == "name":
            msg = (f"expected 1-100 letters, digits, '_', '.', '-' (not starting with one of the last three), "
                   f"got {quote(err.get('input'))}")
        elif err["type"] in ("finite_number", "greater_than", "less_than_equal", "greater_than_equal", "less_than",
                             "too_long", "too_short", "string_pattern_mismatch") and "input" in err:
            msg = f"{msg}, got {quote(err['input'])}"
        raise StudyError(f"{source}: {_where(loc)}: {msg}") from None
    _check_semantics(study, source)
    return study


def read_study_text(path: str | Path) -> str:
    """The text of a study file: at most MAX_FILE_BYTES of UTF-8 (StudyError otherwise)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror})") from None
    return decode_study(data, str(path))


def decode_study(data: bytes, source: str) -> str:
    """A study file's bytes as text: at most MAX_FILE_BYTES of UTF-8 (StudyError otherwise)."""
    if len(data) > MAX_FILE_BYTES:
        raise StudyError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB; a study file is a page of YAML")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StudyError(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def load_yaml(text: str, source: str) -> Any:
    """YAML within the bounds of the module docstring; StudyError naming the line otherwise."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StudyError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:  # (the composer counts depth; this is the constructor's last line of defence)
        raise StudyError(f"{source}: not valid YAML: nested too deep") from None


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    return parse_study(load_yaml(read_study_text(path), str(path)), str(path), overrides)


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
    runs = len(study.arms) * study.seeds
    if runs > MAX_RUNS:
        fail("seeds", f"{len(study.arms)} arms x {study.seeds} seeds = {runs} runs; at most {MAX_RUNS}")
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
            fail(f"{at}.replay", "only with search: replay or final")
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

"""Running a study: every arm x seed through Ray Tune, under one wall-clock budget each, with
the coordinator (this process) as the only writer of records; and resuming one.

Per arm x seed (orchestrator/arms.py):
1. the budget starts (Tuner set-up and trial start-up count against the arm);
2. Tune runs the arm's trials with `workers` concurrent slots until the budget is spent
   (orchestrator/tune_run.py);
3. the recorder (orchestrator/recorder.py) turns every report into a journal line, a results
   row, MLflow metrics of the trial's nested run, and the arm's anytime curve;
4. at the end, the arm's run gets the best trial's history and hyperparameters, and its part of
   the results store is written.

`StudyRecords` keeps runs.json (every MLflow run id: study, arms, trials) and arms.json (status
and wall time per arm x seed, with a heartbeat while an arm runs) current at every moment, so
that `resume_study` can carry on after the coordinator died anywhere: finished arms are kept,
the running arm's Tune experiment is restored and charged the time it had used, and the same
MLflow runs continue.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from hypersweep.methods.data import task_of
from hypersweep.orchestrator.arms import run_arm, run_concurrent
from hypersweep.orchestrator.budget import Clock
from hypersweep.orchestrator.lease import Holder, Lease, LeaseLost
from hypersweep.orchestrator.planning import ArmSeed, plan
from hypersweep.orchestrator.progress import ArmStatus, ProgressView, quality_columns, summary_markdown, summary_table
from hypersweep.orchestrator.recorder import ArmContext, arm_tags, best_row
from hypersweep.orchestrator.study import MAX_FILE_BYTES, Study, StudyError, decode_study, load_yaml, parse_study
from hypersweep.orchestrator.studydir import StudyDir, Unwritable
from hypersweep.orchestrator.tracking import Tracker, TrackingUnavailable, choose_store, swap_id, without_placeholders
from hypersweep.orchestrator.trust import check_study, has_signed_state, study_key
from hypersweep.orchestrator.tune_run import INTERRUPTED, request_stop

HEARTBEAT_S = 1.0  # how often a running arm's wall time reaches arms.json
OUTBOX_EVERY_S = 10.0  # how often, while MLflow is away, its queue is copied to the study directory

log = logging.getLogger("hypersweep")


class StudyInterrupted(Exception):
    """The study was stopped by SIGINT or SIGTERM; its records are consistent and `resume`
    continues it."""


_started_ray = False  # whether this process started the Ray it uses (then it also stops it)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to Ray (a cluster at `address`, else a new local one), unless this process is
    connected already (tests share one Ray across studies)."""
    global _started_ray
    import ray
    if ray.is_initialized():
        return
    _started_ray = True
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TB loggers per trial
    # hypersweep handles SIGINT itself (see _stop_on_signals); Tune's handler would end the arm
    # "gracefully" and let the study go on to the next arm.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # How often Tune saves the experiment state a restore starts from (which checkpoints exist,
    # which trials ran): by default every 10 s or more, so a coordinator killed in that window
    # restarts trials from older checkpoints, or from zero. Keep it at 2 s unless set.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        check_address(address)
        ray.init(address=address, **kwargs)
    else:  # a new Ray of our own, never one found through RAY_ADDRESS or a stale /tmp/ray file
        loopback_only()
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """StudyError, in one line naming the address, when no Ray cluster answers there within
    `timeout_s` (Ray itself would wait on "Failed to connect to GCS" for as long as it runs).
    `auto` is the cluster Ray would pick: RAY_ADDRESS, else the one in
    /tmp/ray/ray_current_cluster, which a head that died uncleanly leaves behind."""
    import socket

    from ray._private import services
    if "://" in address:
        raise StudyError(f"--address {address}: give the cluster's GCS address HOST:PORT (default port 6379) "
                         "and run on a node of the cluster; Ray Client (ray://) is not supported")
    try:
        target = services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise StudyError(f"--address {address}: {e}") from None
    if target is None:  # "local": a new Ray
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
        raise StudyError(f"--address {address}: no Ray cluster answers at {target} ({reason})") from None


def loopback_only() -> None:
    """Make a local Ray listen on 127.0.0.1 only. Ray binds its servers (GCS, raylet, object
    manager, workers' gRPC) to every interface unless its node address is the loopback one,
    and `node_ip_address` is not enough for that in this Ray (the head still takes the
    machine's address); the switch Ray has for one-machine use on macOS and Windows is: the
    node address becomes 127.0.0.1 and every server binds there."""
    from ray._private import ray_constants
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # (for Ray processes that read it)
    ray_constants.ENABLE_RAY_CLUSTER = False  # (read when the node starts, after `import ray`)


def shutdown_ray() -> None:
    """Stop the Ray this process started, rather than leave it to atexit: its agents can
    outlive the driver by minutes."""
    global _started_ray
    import ray
    if _started_ray and ray.is_initialized():
        ray.shutdown()
    _started_ray = False


def check_resources(study: Study) -> str | None:
    """What is wrong when not even one trial fits on the cluster, else None."""
    import ray
    have = ray.cluster_resources()
    b = study.budget
    if have.get("CPU", 0) < b.cpus_per_worker:
        return f"budget.cpus_per_worker: {b.cpus_per_worker} CPUs per worker, the cluster has {have.get('CPU', 0)}"
    if have.get("GPU", 0) < b.gpus_per_worker:
        return f"budget.gpus_per_worker: {b.gpus_per_worker} GPUs per worker, the cluster has {have.get('GPU', 0)}"
    return None


def default_study_dir(study: Study) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("studies") / f"{study.name}-{stamp}"


def keep_run_ids(study_dir: StudyDir, runs: dict[str, Any]) -> Callable[[str, str], None]:
    """A Tracker.on_run_created callback: a run MLflow made late gets its id in runs.json in
    place of the placeholder it was given."""
    def made(placeholder: str, run_id: str) -> None:
        if swap_id(runs, placeholder, run_id):
            study_dir.write_runs(runs)
    return made


class StudyRecords:
    """runs.json and arms.json, written whenever they change (arms.json also every
    `HEARTBEAT_S` while an arm runs, with its wall time so far)."""

    def __init__(self, study: Study, study_dir: StudyDir, tracker: Tracker, runs: dict[str, Any],
                 statuses: list[ArmStatus], signing_key: bytes | None = None, resumed: bool = False,
                 trust_study_dir: bool = False):
        self.study, self.study_dir, self.tracker, self.runs, self.statuses = study, study_dir, tracker, runs, statuses
        self.signing_key = signing_key  # signs the arms' Tune state (trust.py), in whichever process runs Tune
        self.resumed = resumed  # an earlier execution may have made runs that runs.json does not name
        self.trust_study_dir = trust_study_dir  # restore Tune's state as the study directory holds it
        self.runs.setdefault("arms", {})
        self.runs.setdefault("trials", {})
        self._beat = 0.0
        self._runs_dirty = False  # trial runs not yet in runs.json
        # runs started while MLflow was away hold placeholders until MLflow makes them
        tracker.on_run_created(keep_run_ids(study_dir, self.runs))
        tracker.replay_hint = (f"; they are kept in {study_dir}/{StudyDir.OUTBOX}, and `hypersweep resume "
                               f"{study_dir}` sends them once MLflow is back")
        # While MLflow is away its queue is copied into the study directory (every
        # OUTBOX_EVERY_S, at each arm's end, and when the tracker gives up at the study's end),
        # so that a coordinator that dies meanwhile loses none of it: `resume` sends the copy.
        self._outbox = "kept" if study_dir.outbox() else "none"  # none | snapshot | kept
        self._outbox_at = 0.0
        tracker.on_abandon(self._abandoned)

    def _abandoned(self, records: list[dict[str, Any]]) -> None:
        self.study_dir.write_outbox(records)
        self._outbox = "kept"

    def sync_outbox(self, force: bool = False) -> None:
        """Copy MLflow's queue into the study directory (at most every OUTBOX_EVERY_S unless
        `force`), or remove the copy once the queue is empty."""
        if self.tracker.pending:
            if force or time.monotonic() - self._outbox_at >= OUTBOX_EVERY_S:
                self.study_dir.write_outbox(self.tracker.unsent())
                self._outbox, self._outbox_at = "snapshot", time.monotonic()
        elif self._outbox == "snapshot":
            self.study_dir.write_outbox([])
            self._outbox = "none"

    @property
    def parent_run_id(self) -> str:
        return self.runs["parent_run_id"]

    def arm_run(self, unit: ArmSeed, run_id: str) -> None:
        self.runs["arms"][unit.key] = run_id
        self.study_dir.write_runs(self.runs)

    def trial_run(self, unit: ArmSeed, trial_id: str, run_id: str) -> None:
        """A new trial run reaches runs.json with the next heartbeat (within HEARTBEAT_S), not at
        once: rewriting the whole file per trial grows with the trials (O(n^2) over a study). A
        run runs.json misses is found again by its tags (Recorder._resume)."""
        self.runs["trials"].setdefault(unit.key, {})[trial_id] = run_id
        self._runs_dirty = True

    def trial_runs(self, unit: ArmSeed) -> dict[str, str]:
        return dict(self.runs["trials"].get(unit.key, {}))

    def heartbeat(self) -> None:
        if time.monotonic() - self._beat >= HEARTBEAT_S:
            self.write_arms()

    def write_arms(self) -> None:
        self._beat = time.monotonic()
        if self._runs_dirty:
            self._runs_dirty = False
            self.study_dir.write_runs(self.runs)
        self.study_dir.write_arms({f"{s.arm}/seed{s.seed_index}": {
            "arm": s.arm, "seed_index": s.seed_index, "status": s.status, "budget_s": s.budget_s,
            "wall_time_used_s": s.elapsed_s if s.status == "running" else s.wall_time_used_s,
            "within_budget": s.within_budget, "cpu_s": round(s.cpu_s, 3), "gpu_s": round(s.gpu_s, 3),
            "trials": s.trials_started, "reports": s.reports,
            "interruptions": s.interruptions, "trial_errors": s.trial_errors, "extensions": s.extensions,
            "schedule": self.study.budget.schedule, **({"reason": s.reason} if s.reason else {}),
            **({"trial_resources": s.trial_resources} if s.trial_resources else {}),
            **({"timeline": s.timeline} if s.timeline else {})}
            for s in self.statuses if s.status != "pending"})
        self.sync_outbox()


def arm_medians(statuses: list[ArmStatus], task: str) -> dict[str, float]:
    """The parent run's ranking figures: per arm, the median over seeds of its best validation
    loss and of the test metric at that report (`arm/<arm>/median_...`)."""
    import statistics
    out: dict[str, float] = {}
    test_col = quality_columns(task)[1]
    for arm in dict.fromkeys(s.arm for s in statuses):
        mine = [s for s in statuses if s.arm == arm and s.best_row]
        for name, values in (("best_val_loss", [s.best_val_loss for s in mine]),
                             (test_col, [s.best_row.get(test_col) for s in mine])):
            finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            if finite:
                out[f"arm/{arm}/median_{name}"] = statistics.median(finite)
    return out


def study_description(study: Study, study_dir: StudyDir) -> str:
    """The parent run's description (MLflow shows it as the run's note, markdown)."""
    b = study.budget
    arms = "\n".join(f"- **{a.name}**: {a.method}, search {a.search}" + (f" ({a.num_samples} trials)" if
                                                                            a.num_samples > 1 else "")
                     for a in study.arms)
    return (f"Study **{study.name}**: which arm gives the best model on **{study.dataset.name}** "
            f"({study.model.kind}) for the same wall-clock budget.\n\n{arms}\n\n"
            f"Budget: {b.seconds:g} s per arm x seed, {study.seeds} seed(s), {b.workers} worker slot(s) of "
            f"{b.cpus_per_worker:g} CPU" + (f" and {b.gpus_per_worker:g} GPU" if b.gpus_per_worker else "") +
            f" each; arms {b.schedule}.\n\nRecords: `{study_dir}` (results.parquet and summary.md are this run's "
            f"artifacts). `hypersweep compare {study_dir}` adds report.md and anytime.png here; the arm runs carry "
            "`anytime/best_val_loss` at step = arm milliseconds.")


def parent_name(study: Study) -> str:
    """The study's MLflow run: its name and start time (UTC), e.g. `quickstart · 2026-11-23 10:15 UTC`."""
    return f"{study.name} · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def code_tags(root: Path | None = None) -> dict[str, str]:
    """What code runs a study, as MLflow tags of its parent run: hypersweep's version and, when
    it runs from a git checkout of hypersweep (an editable install), the commit (MLflow's own
    `mlflow.source.git.commit`, shown in the UI) and whether the package folders had uncommitted
    changes. A wheel install has the version only. `root`: the source tree (default: this
    file's)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        tags = {"hypersweep.version": version("hypersweep")}
    except PackageNotFoundError:  # run from a source tree on sys.path
        tags = {"hypersweep.version": "unknown"}
    root = (root or Path(__file__).parent.parent).resolve()  # a checkout, when this file is its orchestrator/

    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}

    def git(*args: str) -> str | None:
        try:  # no index refresh (--no-optional-locks): never holds index.lock against the user's git
            out = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=10, env=env)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # not a checkout of hypersweep itself
        return tags
    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        changes = git("status", "--porcelain", "--", "orchestrator", "workers", "methods")
        if changes is not None:  # a failed status says nothing either way
            tags["hypersweep.git_dirty"] = "true" if changes else "false"
    return tags


def code_record(at: str, tags: dict[str, str]) -> dict[str, str]:
    """One execution's entry in runs.json's `code` list (what the study directory says of the
    code that ran it, MLflow or not): `at` start or resume, when (UTC), and `code_tags`."""
    return {"at": at, "utc": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
            "version": tags.get("hypersweep.version", ""), "commit": tags.get("mlflow.source.git.commit", ""),
            "dirty": tags.get("hypersweep.git_dirty", "")}


def _study_tags(study: Study, study_dir: StudyDir, code: dict[str, str]) -> dict[str, str]:
    return {"study_id": study_dir.study_id, "dataset": study.dataset.name, "kind": "study",
            "mlflow.note.content": study_description(study, study_dir), **code}


def _study_params(study: Study, tracking_uri: str) -> dict:
    """The parent run's params: the resolved study, its model by what applies to the model's
    kind, with the store it records to (a flag or MLFLOW_TRACKING_URI named it, not the study
    file)."""
    params = study.model_dump()
    params["model"] = study.model.target_options()  # only what applies to its kind (no cnn channels on an mlp)
    params["tracking"] = {**params.get("tracking", {}), "uri": tracking_uri}
    return params


def log_models(records: StudyRecords) -> dict[str, dict[str, Any]]:
    """Each arm x seed's best model as an MLflow model on its run (orchestrator/models.py), once
    MLflow has every run the study made; `compare` logs what is missing when it was away."""
    from hypersweep.orchestrator.models import log_arm_models
    tracker = records.tracker
    tracker.flush()
    if tracker.pending:
        log.warning("models not logged: MLflow at %s is away; `hypersweep compare %s` logs them once it is back",
                    tracker.uri, records.study_dir)
        return {}
    arm_runs = {key: tracker.resolve(run_id) for key, run_id in records.runs["arms"].items()}
    return log_arm_models(records.study_dir, tracker.uri, arm_runs)


def _console(console):
    from rich.console import Console
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # logs and CI: wide enough for the tables
    return console


def run_study(study: Study, study_dir: StudyDir, *, tracking_uri: str, address: str | None = None,
              data_root: str | None = None, clock: Clock = time.monotonic, console=None,
              live: bool = True) -> list[ArmStatus]:
    """Run every arm x seed of `study` into `study_dir` (which must not exist yet); returns
    their statuses (the summary). Raises StudyInterrupted after SIGINT/SIGTERM, LeaseHeld when
    another coordinator is creating the same directory, LeaseLost when one took it over."""
    key = study_key()  # UntrustedFile now, not in the first arm, when this user's key cannot sign (trust.py)
    existed = study_dir.exists()
    lease = Lease(study_dir, on_lost=INTERRUPTED.set)
    lease.acquire(new_study=True)  # of two `run`s into one new directory, exactly one gets here
    try:
        init_ray(address)
        problem = check_resources(study)
        if problem:
            raise StudyError(f"study {study.name!r}: {problem}")
        tracker = Tracker(tracking_uri, study.tracking.experiment or study.name)  # before anything is written
    except BaseException:
        lease.release()
        with contextlib.suppress(OSError):  # bad input leaves nothing behind
            study_dir.delete("" if not existed else StudyDir.LEASE)
        raise
    study_dir.guard = tracker.guard = lease.guard
    with lease:
        study = study.pinned()  # what the study trains, whatever later versions' defaults are (Study.pinned)
        study_dir.create(study.to_yaml())
        units = plan(study)
        statuses = [ArmStatus(u.arm.name, u.seed_index, study.budget.seconds) for u in units]
        code = code_tags()
        parent = tracker.start_run(parent_name(study), params=_study_params(study, tracking_uri),
                                   tags=_study_tags(study, study_dir, code))
        records = StudyRecords(study, study_dir, tracker, {"tracking_uri": tracking_uri,
                                                            "experiment_id": tracker.experiment_id,
                                                            "parent_run_id": parent,
                                                            "code": [code_record("start", code)]}, statuses, key)
        study_dir.write_runs(records.runs)
        with study_dir.reading(StudyDir.STUDY) as local:
            tracker.log_artifact(parent, local)
        return _execute(records, units, data_root, clock, _console(console), live)


def load_study_dir(study_dir: StudyDir, budget_s: float | None = None) -> Study:
    """The study of a study directory, validated again; StudyError when it is not one or no
    longer validates. `budget_s` may extend the recorded budget, never shorten it."""
    if not study_dir.is_study():
        raise StudyError(f"{study_dir}: not a study directory (no {StudyDir.STUDY})")
    source = f"{study_dir}/{StudyDir.STUDY}"
    raw = load_yaml(decode_study(study_dir.read_bytes(StudyDir.STUDY, MAX_FILE_BYTES), source), source)
    study = parse_study(raw, source)
    if budget_s is not None and budget_s != study.budget.seconds:
        if budget_s < study.budget.seconds:
            raise StudyError(f"--budget-s {budget_s:g}: smaller than the study's recorded budget of "
                             f"{study.budget.seconds:g} s; a resumed study keeps its arms' budgets equal")
        study = parse_study(raw, f"{study_dir}/{StudyDir.STUDY}", {"budget.seconds": budget_s})
    return study


def recorded_statuses(study_dir: StudyDir, study: Study, units: list[ArmSeed]) -> list[ArmStatus]:
    """Each arm x seed as arms.json left it: an arm the coordinator died under is interrupted
    (its interruption counted), and with a longer budget than recorded, the arms that ran out
    the old one are extending."""
    recorded = study_dir.arms()
    statuses = []
    for u in units:
        s = ArmStatus(u.arm.name, u.seed_index, study.budget.seconds)
        saved = recorded.get(u.key)  # (an arm that ended keeps the budget it ran under)
        if saved:
            s.status, s.wall_time_used_s = saved["status"], float(saved["wall_time_used_s"])
            s.trials_started, s.reports = int(saved.get("trials", 0)), int(saved.get("reports", 0))
            s.interruptions = int(saved.get("interruptions", 0))
            s.trial_errors = int(saved.get("trial_errors", 0))
            s.extensions = int(saved.get("extensions", 0))
            s.cpu_s, s.gpu_s = float(saved.get("cpu_s", 0.0)), float(saved.get("gpu_s", 0.0))
            s.reason = str(saved.get("reason", ""))
            s.timeline = saved.get("timeline") if isinstance(saved.get("timeline"), dict) else {}
            s.trial_resources = saved.get("trial_resources") if isinstance(saved.get("trial_resources"), dict) else {}
            if s.ended:
                s.budget_s = float(saved.get("budget_s", s.budget_s))
            if s.status in ("running", "ending"):  # the coordinator died under it (a signal counted already)
                s.interruptions += 1
                if s.status == "running":
                    s.status = "interrupted"
        statuses.append(s)
    for s in statuses:  # a longer sweep: the arms that ran out their budget go on to the new one
        if s.status == "done" and s.budget_s < study.budget.seconds and s.wall_time_used_s >= 0.98 * s.budget_s:
            s.status, s.budget_s = "extending", study.budget.seconds
            s.extensions += 1
    return statuses


def resume_study(study_dir: StudyDir, *, tracking_uri: str | None = None, address: str | None = None,
                 data_root: str | None = None, budget_s: float | None = None, clock: Clock = time.monotonic,
                 console=None, live: bool = True, take_over: Callable[[Holder, str], bool] | None = None,
                 trust_study_dir: bool = False) -> list[ArmStatus] | None:
    """Carry on a study whose coordinator died or was stopped. Returns None when there was
    nothing left to do (every arm x seed had ended); raises StudyError on a directory that is
    not a study or whose study no longer validates, UntrustedFile when its signed Tune state is
    not what this user's coordinator wrote (`trust_study_dir`: restored as it is; trust.py),
    LeaseHeld while another coordinator holds it (`take_over(holder, description)` True: take
    it over all the same), LeaseLost when another one took it over from this one."""
    study = load_study_dir(study_dir, budget_s)
    units = plan(study)
    lease = Lease(study_dir, on_lost=INTERRUPTED.set)
    if take_over is None:
        lease.check_free()  # (a live coordinator's signed state is mid-write: say who holds it)
    key = study_key()
    if not trust_study_dir:
        check_study(study_dir, key)  # before anything is written or loaded
    # A finished study stays finished: said so without taking the lease (nothing is written),
    # unless a coordinator holds it (an extension under way, say)
    if all(s.ended for s in recorded_statuses(study_dir, study, units)) and not study_dir.outbox():
        return None
    previous = lease.acquire(take_over=take_over)  # before anything is read for the resume
    with lease:
        study_dir.guard = lease.guard
        console = _console(console)
        if previous is not None and lease.held.took_over["why"] != "released":
            console.print(f"took over the lease of {study_dir} from {previous.host} pid {previous.pid} "
                          f"({lease.held.took_over['why']})", soft_wrap=True)
        return _resume(study, study_dir, units, lease, key, tracking_uri=tracking_uri, address=address,
                       data_root=data_root, clock=clock, console=console, live=live, trust_study_dir=trust_study_dir)


def _resume(study: Study, study_dir: StudyDir, units: list[ArmSeed], lease: Lease, key: bytes, *,
            tracking_uri: str | None,
            address: str | None, data_root: str | None, clock: Clock, console, live: bool,
            trust_study_dir: bool) -> list[ArmStatus] | None:
    """resume_study, once this coordinator holds the study."""
    recorded_budget = load_study_dir(study_dir).budget.seconds
    statuses = recorded_statuses(study_dir, study, units)
    finished = all(s.ended for s in statuses)
    outbox = study_dir.outbox()
    if finished and not outbox:  # (it ended between the look above and the lease)
        return None
    for s, u in zip(statuses, units):
        if s.ended:  # the summary shows them too
            part = study_dir.read_part(u.arm.name, u.seed_index)
            row = best_row(part.to_dict("records") if part is not None else [])
            if row:
                s.best_row, s.best_val_loss = row, row["val_loss"]

    runs = study_dir.runs()
    uri, why_not = choose_store(runs.get("tracking_uri") or study.tracking.uri, tracking_uri)
    if uri is None:
        raise StudyError(f"{study_dir}: {why_not}")
    tracker = Tracker(uri, study.tracking.experiment or study.name)
    tracker.guard = lease.guard
    if outbox:
        sent = send_outbox(study_dir, tracker, runs, outbox)
        console.print(f"sent {sent} MLflow records the study had left unsent to {uri}")
    if finished:
        return None
    runs = without_placeholders(runs)  # runs MLflow never made, or made but never said: found by tags
    init_ray(address)
    problem = check_resources(study)
    if problem:
        raise StudyError(f"study {study.name!r}: {problem}")
    parent = runs.get("parent_run_id") or tracker.find_run(kind="study", study_id=study_dir.study_id)
    code = code_tags()
    if parent is None:  # died before its parent run was recorded
        parent = tracker.start_run(parent_name(study), params=_study_params(study, uri),
                                   tags=_study_tags(study, study_dir, code))
    else:  # the code of this resume, beside the code that started the study
        # every key, "" where this code has none (no stale value of an earlier resume)
        resumed = {f"hypersweep.resumed_{key.rsplit('.', 1)[-1]}": code.get(key, "")
                   for key in ("hypersweep.version", "mlflow.source.git.commit", "hypersweep.git_dirty")}
        tracker.set_tags(parent, resumed)
    took_over = lease.held.took_over
    if took_over and took_over["why"] != "released":  # whose lease this resume took, and why
        tag = "hypersweep.lease_broken" if took_over["why"] in ("broken", "unreadable") else "hypersweep.lease_taken_over"
        tracker.set_tags(parent, {tag: f"generation {took_over['generation']}: {took_over.get('host', '?')} pid "
                                       f"{took_over.get('pid', '?')} ({took_over['why']}) at "
                                       f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"})
    if trust_study_dir:
        tracker.set_tags(parent, {"hypersweep.trusted_study_dir": f"--trust-study-dir at "
                                                                   f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"})
    else:
        unsigned = [f"{s.arm} seed {s.seed_index}" for s in statuses if s.status in ("interrupted", "extending")
                    and not has_signed_state(study_dir, study_dir.latest_tune_experiment(s.arm, s.seed_index))]
        if unsigned:
            console.print(f"no signed Tune state to restore for {', '.join(unsigned)} (a study from before hypersweep "
                          "signed it, or stopped in its first seconds): they run the rest of their budget in a fresh "
                          "Tune experiment; --trust-study-dir restores them unverified", soft_wrap=True)
    resumes = tracker.reopen(parent)
    if study.budget.seconds != recorded_budget:  # a longer sweep: the study file says so from now on
        study_dir.write_text(StudyDir.STUDY, study.to_yaml())
        tracker.set_tags(parent, {"budget_seconds_resumed": study.budget.seconds})  # params cannot change
    runs.update({"tracking_uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent,
                 "code": [*(runs.get("code") if isinstance(runs.get("code"), list) else []),
                          code_record("resume", code)]})
    records = StudyRecords(study, study_dir, tracker, runs, statuses, key, resumed=True,
                           trust_study_dir=trust_study_dir)
    study_dir.write_runs(records.runs)
    log.info("resuming %s (resume %d)", study_dir, resumes)
    return _execute(records, units, data_root, clock, console, live)


def send_outbox(study_dir: StudyDir, tracker: Tracker, runs: dict[str, Any], records: list[dict[str, Any]]) -> int:
    """Send the MLflow records an earlier execution kept in the study directory; runs.json
    learns the ids of the runs they make. Returns how many were sent; raises
    TrackingUnavailable, keeping the rest, when MLflow does not take them all."""
    tracker.on_run_created(keep_run_ids(study_dir, runs))
    with study_dir.outbox_files(records) as local:
        left = tracker.send_unsent(local)
        study_dir.write_outbox(left)
    if left:
        raise TrackingUnavailable(f"MLflow at {tracker.uri} did not take the records the study had left unsent: "
                                  f"{len(left)} of {len(records)} still wait in {study_dir}/{StudyDir.OUTBOX}; "
                                  "run resume again once it answers")
    return len(records)


def _arm_context(records: StudyRecords, unit: ArmSeed, status: ArmStatus) -> ArmContext:
    """The arm x seed's MLflow run: the one it had (a resumed arm), else a new one."""
    study, tracker = records.study, records.tracker
    run_id = records.runs["arms"].get(unit.key)
    if run_id is None and records.resumed:  # made by the dead coordinator just before it died?
        run_id = tracker.find_run(kind="arm", study_id=records.study_dir.study_id, arm=unit.arm.name,
                                  seed_index=str(unit.seed_index))
    if run_id:
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(f"{unit.arm.name} · seed {unit.seed_index}", parent_id=records.parent_run_id,
                                   tags=arm_tags(study, records.study_dir.study_id, unit, kind="arm"),
                                   params={"arm": unit.arm.model_dump(), "seed": unit.seed,
                                           "search_seed": unit.search_seed, "ensemble_seed": unit.ensemble_seed,
                                           "schedule": study.budget.schedule})
    records.arm_run(unit, run_id)
    return ArmContext(study, records.study_dir.study_id, unit, run_id, status, records)


def _execute(records: StudyRecords, units: list[ArmSeed], data_root: str | None, clock: Clock, console,
             live: bool) -> list[ArmStatus]:
    """The arms x seeds that have not ended, in order (or a repetition's arms side by side),
    then the study's end records."""
    study, study_dir, tracker, statuses = records.study, records.study_dir, records.tracker, records.statuses
    task = task_of(study.dataset.name)
    concurrent = study.budget.schedule == "concurrent"
    # one batch per arm x seed, or (concurrent) one batch per repetition
    batches = [[i] for i in range(len(units))] if not concurrent else \
        [[i for i, u in enumerate(units) if u.seed_index == k] for k in range(study.seeds)]
    try:
        with _stop_on_signals(), ProgressView(statuses, task, console, enabled=live):
            for batch in batches:
                if INTERRUPTED.is_set():
                    raise StudyInterrupted()
                todo = [i for i in batch if not statuses[i].ended]
                if not todo:
                    continue
                contexts = [_arm_context(records, units[i], statuses[i]) for i in todo]
                records.write_arms()
                if concurrent:
                    run_concurrent(contexts, tracker, study_dir, data_root)
                else:
                    run_arm(contexts[0], tracker, study_dir, clock, data_root)
                study_dir.consolidate()
                records.write_arms()
                records.sync_outbox(force=True)
                if INTERRUPTED.is_set():
                    raise StudyInterrupted()
        study_dir.consolidate()
        study_dir.write_text(StudyDir.SUMMARY, summary_markdown(statuses, task))
        for name in (StudyDir.RESULTS, StudyDir.SUMMARY):
            with study_dir.reading(name) as local:
                tracker.log_artifact(records.parent_run_id, local)
        tracker.log_metrics(records.parent_run_id, arm_medians(statuses, task), max(s.extensions for s in statuses))
        models = log_models(records)
        tracker.end_run(records.parent_run_id, "FAILED" if any(s.status == "failed" for s in statuses) else "FINISHED")
    except LeaseLost:
        raise  # the study is another coordinator's now: nothing more is written
    except (StudyInterrupted, KeyboardInterrupt, Unwritable) as stop:
        # SIGINT/SIGTERM, or a study directory that stopped taking writes (disk full, read-only):
        # the running arms are interrupted; what is on disk stays as it was written
        if study_dir.guard is not None:
            study_dir.guard()  # (LeaseLost: stopped because another coordinator took the study over)
        for s in statuses:
            if s.status == "running":
                s.status = "interrupted"
        try:
            records.write_arms()
        except Unwritable:  # arms.json keeps its last heartbeat: `resume` takes that arm as interrupted
            pass
        tracker.end_all("KILLED")
        if isinstance(stop, Unwritable):
            raise
        raise StudyInterrupted() from None
    except BaseException:
        tracker.end_all("FAILED")
        raise
    finally:
        INTERRUPTED.clear()
    console.print()
    console.print(summary_table(statuses, task))
    console.print(f"study directory: {study_dir}\nMLflow: {tracker.uri} (experiment "
                  f"{study.tracking.experiment or study.name}, parent run {records.parent_run_id})")
    if tracker.uri.startswith(("http://", "https://")):
        from hypersweep.orchestrator.ui import study_links
        for what, link in study_links(tracker.uri.rstrip("/"), records.runs):
            console.print(f"  {what}: {link}", soft_wrap=True)
    else:
        console.print(f"browse it: hypersweep ui {study_dir}", soft_wrap=True)
    if models:
        from hypersweep.orchestrator.models import MODELS_FILE
        first = next(iter(models.values()))["model_uri"]
        console.print(f"models: {len(models)} arm x seed models on the arm runs ({study_dir}/{MODELS_FILE}); load one "
                      f"with mlflow.pyfunc.load_model(\"{first}\")", soft_wrap=True)
    return statuses


class _stop_on_signals:
    """SIGINT and SIGTERM stop the study: no new trial starts, the running Tune experiment
    ends its loop and saves its state (Tune's own interrupt, reached through its SIGUSR1
    handler), and the study's records are left consistent for `resume`. Ray Tune's default
    SIGINT handling would instead end only the current arm and go on with the next one."""

    def __enter__(self):
        self.saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.saved:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        request_stop()

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False

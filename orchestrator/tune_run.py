"""Ray Tune adapters: one arm x seed's Tune experiment under its budget, started fresh or
restored after the coordinator died.

`tune_arm` builds the Tuner (searcher, scheduler, resources, checkpoints, storage in the study
directory) and runs it. Around Tune's objects:
- `BudgetedSearch` wraps the arm's search algorithm: it starts no trial once the budget is
  spent or the study was interrupted, and keeps at most `workers` trials running;
- `BudgetStopper` ends the trials once the arm's budget is spent, *after* their report is
  recorded (Tune's own `time_budget_s` discards the report in flight and restarts in full on a
  restore, see the shared notes);
- `TuneEvents` hands Tune's trial events to the recorder, directly or through a Ray queue
  (`QueueSink`) when the arm runs in a Ray task.
Tune pickles these three with the experiment (tuner.pkl). What they need at run time (the
budget, the sink) is not pickled: it is the `LiveArm` of this process, found by the arm's key,
so an experiment restored by a new coordinator uses the new coordinator's budget and records.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ray import tune
from ray.tune.search import SearchAlgorithm

from hypersweep.orchestrator.budget import Budget, Clock, tolerance
from hypersweep.orchestrator.lease import LeaseLost
from hypersweep.orchestrator.planning import ArmSeed, num_samples, scheduler, searcher, trial_resources
from hypersweep.orchestrator.study import Study
from hypersweep.orchestrator.studydir import Folder, StudyDir
from hypersweep.orchestrator.trust import Sealer, live_state, parses, restore_signed, study_key

# Set by a SIGINT/SIGTERM in this process (orchestrator/runner.py): no new trial starts.
INTERRUPTED = threading.Event()

log = logging.getLogger("hypersweep")


def request_stop() -> None:
    """Stop the study (SIGINT, SIGTERM, an unwritable study directory): no new trial starts,
    and a running Tune experiment ends its loop and saves its state (Tune's own interrupt,
    reached through the SIGUSR1 handler `Tuner.fit` installs)."""
    INTERRUPTED.set()
    tune_handler = signal.getsignal(signal.SIGUSR1)
    if callable(tune_handler):
        tune_handler(signal.SIGUSR1, None)


@dataclass
class LiveArm:
    """The running arm's budget, event sink and concurrency, in this process."""
    budget: Budget
    sink: Callable[..., None]
    workers: int
    guard: Callable[[], None] | None = None  # the study's lease: LeaseLost ends Tune's loop (StudyDir.guard)
    sealer: Sealer | None = None  # signs the experiment's state as Tune writes it (trust.py)
    running: set[str] = field(default_factory=set)  # trials started and not ended
    # arm times: the first trial's start and the last trial's end (what came before and after
    # them is Tune's and Ray's set-up and teardown, charged to the arm too)
    first_start_s: float | None = None
    last_end_s: float | None = None

    def timeline(self) -> dict[str, float | None]:
        """Where the arm's time went at its ends, in arm seconds: its budget, when this Tune run
        started (after a resume: the time charged before), the first trial's start, the last
        trial's end, and Tune's return (the time charged)."""
        r = lambda x: None if x is None else round(x, 3)  # noqa: E731
        return {"budget_s": self.budget.seconds, "tune_started_s": r(self.budget.used_s),
                "first_trial_start_s": r(self.first_start_s),
                "last_trial_end_s": r(self.last_end_s), "tune_returned_s": r(self.budget.elapsed())}


_LIVE: dict[str, LiveArm] = {}


def arm_key(unit: ArmSeed) -> str:
    return unit.key  # one study per coordinator; the directory may be renamed between a crash and a resume


class _Bound:
    """Pickles as its arm's key; finds the arm's `LiveArm` in whichever process runs it."""

    def __init__(self, key: str):
        self.key = key

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def arm(self) -> LiveArm:
        return _LIVE[self.key]


class BudgetedSearch(_Bound, SearchAlgorithm):
    """The arm's search algorithm, stopped by the budget: Tune asks it for trials as slots free
    up, and a trial created after the deadline would train nothing yet leave a record."""

    def __init__(self, inner: SearchAlgorithm, key: str):
        _Bound.__init__(self, key)
        SearchAlgorithm.__init__(self)
        self.inner = inner

    def _closed(self) -> bool:
        return INTERRUPTED.is_set() or self.arm.budget.exhausted()

    def next_trial(self):
        if self._closed() or len(self.arm.running) >= self.arm.workers:
            return None
        return self.inner.next_trial()

    def is_finished(self) -> bool:
        return self._closed() or self.inner.is_finished()

    def set_finished(self):
        self.inner.set_finished()

    @property
    def metric(self):
        return self.inner.metric

    @property
    def total_samples(self):
        return self.inner.total_samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments):
        self.inner.add_configurations(experiments)

    def on_trial_result(self, trial_id: str, result: dict):
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs):
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str):
        self.inner.restore_from_dir(dirpath)


class BudgetStopper(_Bound, tune.Stopper):
    """Stops a trial at `max_steps` reports or at its first report once the arm's budget is
    spent (trials end their step at the deadline themselves, so that report comes promptly and
    carries a checkpoint). The whole experiment (pending trials too) stops once the budget is
    spent and no trial is running any more, or half the tolerance later for a trial that does
    not report: stopping it at the deadline would race those last reports."""

    def __init__(self, key: str, max_steps: int):
        super().__init__(key)
        self.max_steps = max_steps

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result["training_iteration"] >= self.max_steps or self.arm.budget.exhausted()

    def stop_all(self) -> bool:
        arm = self.arm
        b = arm.budget
        return b.exhausted() and (not arm.running or b.elapsed() >= b.seconds + tolerance(b.seconds) / 2)


class TuneEvents(_Bound, tune.Callback):
    """Tune's trial events, stamped with the arm's wall time, handed to the arm's sink as
    (kind, trial_id, hp, payload, arm_time)."""

    def _send(self, kind: str, trial, payload: Any) -> None:
        arm = self.arm
        arm.sink(kind, trial.trial_id if trial else None, trial.config["hp"] if trial else None, payload,
                 arm.budget.elapsed())

    def on_trial_start(self, iteration, trials, trial, **info):
        arm = self.arm
        arm.running.add(trial.trial_id)
        if arm.first_start_s is None:
            arm.first_start_s = arm.budget.elapsed()
        self._send("start", trial, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        plain = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        self._send("result", trial, plain)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)
        self._send("end", trial, not (trial.last_result or {}).get("diverged"))  # a diverged trial ends failed

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
        self._send("end", trial, False)

    def _ended(self, trial) -> None:
        self.arm.running.discard(trial.trial_id)
        self.arm.last_end_s = self.arm.budget.elapsed()

    def on_step_end(self, iteration, trials, **info):
        arm = self.arm
        if arm.guard is not None:
            # LeaseLost: Tune stops the trials and raises it, without saving its experiment state
            arm.guard()
        if arm.sealer is not None:  # right after Tune's own save of this step, if it made one
            if arm.sealer.staging is None and trials:
                arm.sealer.staging = trials[0].storage.experiment_driver_staging_path
            sign_state(arm.sealer, self.key)
        self._send("tick", None, None)

    def on_experiment_end(self, trials, **info):
        # Tune would build the results' errors from each failed trial's error.pkl, a pickle in the
        # study directory; error.txt says the same in text
        for trial in trials:
            trial.run_metadata.pickled_error_filename = None


class QueueSink:
    """A picklable sink that puts events on a Ray queue (for an arm run in a Ray task)."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, *event):
        if event[0] != "tick":
            self.queue.put(event)


def tune_arm(study: Study, study_dir: StudyDir, unit: ArmSeed, param_space: dict[str, Any], workers: int, sink, *,
             used_s: float = 0.0, restore: bool = False, extend: bool = False, trust: bool = False,
             signing_key: bytes | None = None, clock: Clock = time.monotonic) -> dict[str, Any]:
    """Run one arm x seed's Tune experiment under its budget; Tune's events go to `sink`.
    `used_s`: the wall time the arm used before (a resumed arm gets the rest of its budget);
    `restore`: continue the arm's Tune experiment where it stopped (finished trials kept,
    running ones from their last checkpoint, pending ones start), if there is one; `extend`:
    the finished trials go on too (a longer budget: those the old one ended continue from their
    checkpoint at its end; those that had run `max_steps` end at once). A restore reads only
    the experiment's signed state (trust.py) unless `trust` (--trust-study-dir); `signing_key`:
    the coordinator's (default: this process's, trust.study_key).
    Runs in the coordinator (arms one after another) or in a Ray task (concurrent arms).
    Returns the errors, the wall time used and each trial's folder (a path on the study
    directory's filesystem) and config."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

    from hypersweep.workers import trainable_class
    from hypersweep.workers.deadlines import deadline_board

    budget = Budget(study.budget.seconds, clock, used_s=used_s).start()
    key = arm_key(unit)
    _LIVE[key] = LiveArm(budget, sink, workers, study_dir.guard)
    deadline = budget.deadline()
    # Trials read the deadline from the board at every step; a restored trial's config holds an old one.
    deadline_board().post.remote(key, float(deadline))
    # Tune creates trials ahead of free slots (up to 200 for its variant generator): those that
    # start after the deadline train nothing. One per slot keeps the slots' actors starting together.
    # (Tune reads it when the experiment starts; the value is this arm's, put back afterwards.)
    pending_before = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(workers)
    resources = trial_resources(study, unit, workers)
    trainable = tune.with_resources(trainable_class(unit.arm.method), resources)
    storage_path, storage_fs = study_dir.tune_storage()
    attempt = study_dir.tune_attempts(unit.arm.name, unit.seed_index)
    name = study_dir.tune_experiment(unit.arm.name, unit.seed_index, attempt)
    try:
        signing_key = signing_key or study_key()
        carried: dict[str, bytes] = {}  # the experiment's state files this execution takes as signed
        if restore and trust:
            carried = live_state(study_dir, name)
        elif restore:
            restored = restore_signed(study_dir, name, signing_key)
            if restored is None:
                log.warning("%s: its Tune experiment has no signed state to restore (a study from before hypersweep "
                            "signed it, or one stopped in its first seconds); a fresh one runs the rest of the arm's "
                            "budget (its trials start over; what the earlier ones reported is kept)", unit.key)
                name, restore = study_dir.tune_experiment(unit.arm.name, unit.seed_index, attempt + 1), False
            else:
                carried, set_aside = restored
                if set_aside:
                    log.warning("%s: restored from its signed Tune state; set aside, as written after its last signing "
                                "or by someone else: %s", unit.key, ", ".join(set_aside))
        experiment = f"{storage_path}/{name}"
        restore = restore and Tuner.can_restore(experiment, storage_filesystem=storage_fs)
        broken = restore and unreadable_state(Folder(experiment, storage_fs))
        if broken:  # e.g. written while the disk was full: Tune would go on with trials that have no config
            log.warning("%s: its Tune experiment cannot be restored (%s); a fresh one runs the rest of the arm's "
                        "budget (its trials start over; what the earlier ones reported is kept)", unit.key, broken)
            name = study_dir.tune_experiment(unit.arm.name, unit.seed_index, attempt + 1)
            restore = False
        if restore:
            from ray.tune import ResumeConfig
            resume, skip = ResumeConfig.ResumeType.RESUME, ResumeConfig.ResumeType.SKIP
            tuner = Tuner.restore(experiment, trainable, storage_filesystem=storage_fs,
                                  _resume_config=ResumeConfig(finished=resume if extend else skip, unfinished=resume,
                                                              errored=skip))
        else:
            clear_state(study_dir, name)
            carried = {}
            max_steps = (unit.arm.max_epochs or study.training.max_epochs) // study.training.epochs_per_step or 1
            alg = searcher(unit)
            if isinstance(alg, Searcher):  # what Tune does itself for a bare Searcher
                alg = SearchGenerator(ConcurrencyLimiter(alg, max_concurrent=workers))
            tuner = Tuner(
                trainable,
                param_space={**param_space, "deadline": deadline, "deadline_key": key, "max_steps": max_steps},
                tune_config=TuneConfig(metric="val_loss", mode="min", search_alg=BudgetedSearch(alg, key),
                                       num_samples=num_samples(unit), scheduler=scheduler(unit, max_steps),
                                       reuse_actors=True, trial_dirname_creator=_trial_dirname),
                run_config=RunConfig(
                    name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                    stop=BudgetStopper(key, max_steps), callbacks=[TuneEvents(key)], verbose=0,
                    # PBT's exploits restore other trials' checkpoints: keep more of them
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=2 if unit.arm.scheduler != "pbt" else 2 * workers + 2,
                        checkpoint_frequency=study.training.checkpoint_every, checkpoint_at_end=True),
                    failure_config=FailureConfig(max_failures=study.training.max_failures)),
            )
        sealer = _LIVE[key].sealer = Sealer(study_dir, name, signing_key, carried)
        sign_state(sealer, key, tuner=not restore)  # tuner.pkl, written when the Tuner was built
        grid = tuner.fit()
        sign_state(sealer, key)  # Tune's last save
        return {"errors": len(grid.errors), "used": budget.elapsed(), "timeline": _LIVE[key].timeline(),
                "trial_resources": resources,
                "interrupted": INTERRUPTED.is_set(),
                "trials": {str(r.path).rstrip("/").rsplit("/", 1)[-1]: (str(r.path), r.config) for r in grid if r.path}}
    except LeaseLost:
        raise
    except Exception as e:  # the study goes on; the arm is marked failed with this message
        return {"errors": -1, "used": budget.elapsed(), "interrupted": INTERRUPTED.is_set(), "trials": {},
                "error": f"{type(e).__name__}: {e}"}
    finally:
        _LIVE.pop(key, None)
        if pending_before is None:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        else:
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = pending_before


def unreadable_state(experiment: Folder) -> str | None:
    """What of a Tune experiment's saved state cannot be read (a file cut by a crash or a
    full disk), or None. Tune reads its newest experiment_state-*.json, the search algorithm's
    newest state (basic-variant-state-*.json and search_gen_state-*.json are pickles despite
    their names) and tuner.pkl; a pickle is read by its opcodes, never loaded."""
    files = experiment.list()
    newest = [max((f for f in files if f.startswith(prefix)), default=None)
              for prefix in ("experiment_state-", "basic-variant-state-", "search_gen_state-")]
    for name in [*filter(None, newest), *(["tuner.pkl"] if "tuner.pkl" in files else [])]:
        data = experiment.read_bytes(name)
        if not parses(name, data):
            pickled = data[:1] == b"\x80" or name.endswith(".pkl")
            return f"{name}: {'not a whole pickle' if pickled else 'not valid JSON'}"
    return None


def sign_state(sealer: Sealer, key: str, tuner: bool = False) -> None:
    """Sign what Tune saved, or with `tuner` its tuner.pkl. A store that refuses the copy (a
    full disk) costs only freshness: a resume restores the copy signed before."""
    try:
        sealer.seal_tuner() if tuner else sealer.seal()
    except OSError as err:
        log.warning("the Tune state of %s was not signed this time: %s", key, err)


def clear_state(study_dir: StudyDir, experiment: str) -> None:
    """Before a fresh Tune experiment: no state file in its folder but Tune's own (what a killed
    coordinator or anyone else left there would be signed with it), no signed copy."""
    live = study_dir.sub(f"{StudyDir.TUNE}/{experiment}")
    for name in live.list():
        live.delete(name)
    study_dir.delete(f"{StudyDir.SIGNED}/{experiment}")


def _trial_dirname(trial) -> str:
    return trial.trial_id

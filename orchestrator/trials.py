"""Trial records and the compute executor.

A finished Tune trial is described by a `trial.json` in its folder (written by the arm's end,
read by `ensemble` later): what it trained, how good it got, where its run is recorded.
`Compute` runs worker functions (workers/ensemble.py) in this process or as Ray tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hypersweep.orchestrator.studydir import CorruptFile, Folder, StudyDir

TRIAL_FILE = "trial.json"


class EnsembleError(ValueError):
    """Input an ensemble cannot be built from; the message is one line."""


@dataclass(frozen=True)
class TrialRecord:
    """A finished Tune trial, as the arm's end describes it in the trial's folder."""
    folder: Folder
    arm: str
    method: str
    seed_index: int
    seed: int
    trial_id: str
    best_val_loss: float
    config: dict[str, Any]
    run_id: str | None = None  # the arm x seed MLflow run
    tracking_uri: str | None = None

    @property
    def generative(self) -> bool:
        from hypersweep.methods import is_generative
        return is_generative(self.method)

    def checkpoint(self):
        """The trial's last checkpoint (Tune names them checkpoint_000NNN), as a Tune
        Checkpoint: a worker reads it wherever the study directory is."""
        found = self.folder.list(dirs=True)
        found = [name for name in found if name.startswith("checkpoint_")]
        if not found:
            raise EnsembleError(f"trial {self.trial_id} ({self.folder}) has no checkpoint to draw members from")
        from ray.tune import Checkpoint
        return Checkpoint(path=self.folder.sub(found[-1]).path, filesystem=self.folder.fs)


def write_trial_records(trial_folders: dict[str, tuple[Folder, dict[str, Any]]], rows: list[dict], *, arm: str,
                        method: str, seed_index: int, seed: int, run_id: str, tracking_uri: str) -> None:
    """One trial.json per trial folder: what `ensemble` needs to find and rebuild it later."""
    best: dict[str, float] = {}
    for row in rows:
        best[row["trial_id"]] = min(best.get(row["trial_id"], math.inf), row.get("val_loss", math.inf))
    for trial_id, (folder, config) in trial_folders.items():
        if not folder.is_dir():
            continue
        folder.write_json(TRIAL_FILE, {"arm": arm, "method": method, "seed_index": seed_index, "seed": seed,
                                       "trial_id": trial_id, "best_val_loss": best.get(trial_id, math.inf),
                                       "config": config, "run_id": run_id, "tracking_uri": tracking_uri})


def _read_record(folder: Folder) -> TrialRecord:
    data = folder.read_json(TRIAL_FILE, kind=dict)
    try:
        return TrialRecord(folder=folder, **data)
    except TypeError as e:  # keys a trial record does not have, or lacks
        raise CorruptFile(f"{folder}/{TRIAL_FILE}: not a trial record written by hypersweep ({e})") from None


def find_trials(location: Folder) -> list[TrialRecord]:
    """The trials of a study directory, or the one trial of a trial directory."""
    if location.is_file(TRIAL_FILE):
        return [_read_record(location)]
    study = StudyDir(location.path, location.fs)
    if not study.is_dir(StudyDir.TUNE):
        raise EnsembleError(f"{location}: neither a study directory (with tune/) nor a trial directory "
                            f"(with {TRIAL_FILE})")
    records = [_read_record(f) for f in study.trial_folders() if f.is_file(TRIAL_FILE)]
    if not records:
        raise EnsembleError(f"{location}: no finished trials recorded under tune/")
    return records


def groups(trials: Sequence[TrialRecord], arm: str | None = None,
           seed_index: int | None = None) -> dict[tuple[str, int], list[TrialRecord]]:
    """Trials by (arm, seed_index), filtered; an unknown filter is an error naming the choices."""
    out: dict[tuple[str, int], list[TrialRecord]] = {}
    for t in trials:
        out.setdefault((t.arm, t.seed_index), []).append(t)
    if arm is not None and not any(a == arm for a, _ in out):
        raise EnsembleError(f"--arm {arm!r} not in this study; arms: {', '.join(sorted({a for a, _ in out}))}")
    if seed_index is not None and not any(s == seed_index for _, s in out):
        raise EnsembleError(f"--seed-index {seed_index} not in this study; seeds: "
                            f"{', '.join(str(s) for s in sorted({s for _, s in out}))}")
    return {k: v for k, v in out.items() if (arm is None or k[0] == arm) and (seed_index is None or k[1] == seed_index)}


class Compute:
    """Runs worker functions in this process, or as Ray tasks with the study's worker resources."""

    def __init__(self, use_ray: bool = False, num_cpus: float = 1, num_gpus: float = 0):
        self.use_ray, self.num_cpus, self.num_gpus = use_ray, num_cpus, num_gpus

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list[Any]:
        if not self.use_ray:
            return [fn(*args) for args in calls]
        import ray
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(fn)
        return ray.get([task.remote(*args) for args in calls])

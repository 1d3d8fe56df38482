"""The Trainable lifecycle shared by every method family.

Ray Tune drives a trial through these calls (Tune's class API):
    setup(config)            once per trial: load the data split, build the method
    step()                   `epochs_per_step` epochs of training, then one report (a dict)
    save_checkpoint(dir)     the method's full state, optimiser and generators included
    load_checkpoint(dir)     restore it exactly: the next step equals the one never taken
    reset_config(config)     reuse this actor for a new trial (TuneConfig(reuse_actors=True))

The config a trial receives (built by the coordinator, see orchestrator/planning.py):
    method:  the registered method name
    dataset: {name, root, val_fraction, test_fraction, split_index}
    model:   {kind, hidden, ...}
    hp:      the method's hyperparameters (searched ones sampled by Tune)
    seed:    the repetition's seed, which `trial_seed` makes the method's; data_seed: the split's
    deadline: the end of the arm's budget, a `Deadline` (methods/clock.py); absent: no end
    epochs_per_step, device ("auto": a GPU when Ray assigned one)
    replica: independent repeat r of a fixed configuration (a deep ensemble's members)

`build_method(config, device)` makes the registered method's `METHOD` object, which has
`train_epoch(deadline=None) -> float`, `evaluate(split) -> dict`, `state_dict()`,
`load_state_dict()`, and optionally `diagnostics() -> dict` (extra per-step metrics, e.g.
`weight_std`).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import pyarrow.fs as pafs
import torch
from ray import tune

from hypersweep.methods import data as datasets
from hypersweep.methods import method_module
from hypersweep.methods.clock import Deadline, past
from hypersweep.methods.seeding import Stream, child_seed
from hypersweep.methods.targets import build_target

CHECKPOINT_FILE = "state.pt"
DICT_CHECKPOINT = "_dict_checkpoint.pkl"  # Tune's pickle of a dict checkpoint (ray.tune.trainable)
log = logging.getLogger("hypersweep")


@functools.lru_cache(maxsize=4)
def _cached_splits(name, root, val_fraction, test_fraction, split_index, seed):
    # One load per worker process and data split: reused actors skip the disk.
    return datasets.load(name, seed=seed, split_index=split_index, data_root=root,
                         val_fraction=val_fraction, test_fraction=test_fraction)


def load_splits(config: dict[str, Any]) -> datasets.Splits:
    d = config["dataset"]
    root = d.get("root")
    if root and not os.path.isabs(root):  # data sent with a submitted job: this node's copy of the job's folder
        root = os.path.join(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()), root)
    return _cached_splits(d["name"], root, d["val_fraction"], d["test_fraction"],
                          d["split_index"], config["data_seed"])


def worker_device(requested: str = "auto") -> torch.device:
    """The device Ray assigned: a GPU only when the trial asked for one as a resource."""
    if requested != "auto":
        return torch.device(requested)
    import ray
    # Outside a Ray worker (tests, the driver) nothing was requested: the CPU.
    on_gpu = ray.is_initialized() and ray.get_gpu_ids()
    return torch.device("cuda") if on_gpu else torch.device("cpu")


def placement(device: torch.device) -> dict[str, Any]:
    """Where this trial runs, for its reports: the device (a GPU named), the Ray node, and the
    torch CPU threads, set to the CPUs Ray assigned the trial (a one-trial arm gets the arm's
    whole share of the worker slots, see orchestrator/planning.py)."""
    import ray
    where: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        where["device"] = f"{device}:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})" \
            if device.index is None else f"{device} ({torch.cuda.get_device_name(device)})"
    if ray.is_initialized():
        context = ray.get_runtime_context()
        where["node_id"] = context.get_node_id()
        # (a trainable made in a driver, as tests do, has no assigned resources: threads unchanged)
        if context.worker.mode == ray.WORKER_MODE and context.get_assigned_resources().get("CPU", 0) >= 1:
            torch.set_num_threads(int(context.get_assigned_resources()["CPU"]))
    where["torch_threads"] = torch.get_num_threads()
    return where


def trial_seed(config: dict[str, Any]) -> int:
    """The seed of the method's initialisation and noise: the repetition's seed (the same for
    every arm: arms are paired), or for replica r > 0 of a fixed arm (independent runs of one
    configuration) its REPLICA child."""
    replica = int(config.get("replica", 0))
    return config["seed"] if replica == 0 else child_seed(config["seed"], Stream.REPLICA, replica)


def build_target_for(config: dict[str, Any], splits: datasets.Splits):
    m = config["model"]
    return build_target(m["kind"], splits.input_shape, splits.n_outputs, **{k: v for k, v in m.items() if k != "kind"})


def build_method(config: dict[str, Any], device: torch.device):
    """(splits, target, method) of a trial config: what a Trainable trains and what ensemble
    tasks restore from a checkpoint."""
    splits = load_splits(config)
    target = build_target_for(config, splits)
    extra = {"schedule": config["schedule"]} if config.get("schedule") else {}  # sgd replaying an STN schedule
    method = method_module(config["method"]).METHOD(target, splits, config["hp"], seed=trial_seed(config), device=device,
                                                    **extra)
    return splits, target, method


def load_method_state(method, state: dict[str, Any], source: str) -> None:
    """`method.load_state_dict(state)`, or a CheckpointMismatch that says why the checkpoint
    does not fit: the hyperparameters it was saved with (recorded since checkpoints carry them)
    against the trial's, else that it predates them, e.g. a study started by an earlier
    hypersweep whose defaults differed (studies record every value since, Study.pinned)."""
    try:
        method.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        saved, now = state.get("hp"), getattr(method, "hp", {})
        if isinstance(saved, dict):
            differ = [f"{k}: {saved.get(k)!r} saved, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                      if saved.get(k) != now.get(k)]
            why = ("hyperparameters differ: " + "; ".join(differ)) if differ else f"{type(e).__name__}: {e}"
        else:
            why = ("it was saved without its hyperparameters, by a hypersweep older than this one, whose defaults "
                   "may differ: give the values it started with as the arm's params in the study's study.yaml")
        raise CheckpointMismatch(f"{source}: the checkpoint does not fit this trial's "
                                 f"{type(method).__name__}: {why}") from e


class CheckpointMismatch(RuntimeError):
    """A checkpoint that cannot be loaded into the trial's method as it is configured now."""


def newest_checkpoint_beside(checkpoint: tune.Checkpoint) -> tune.Checkpoint | None:
    """None when `checkpoint` exists; else the newest `checkpoint_<n>` folder beside it (the same
    trial's) that holds a hypersweep state, or None when there is none either."""
    import pyarrow.fs

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return None
    parent = path.rsplit("/", 1)[0]
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    except (OSError, FileNotFoundError):
        return None
    names = sorted(info.base_name for info in found if info.type == pyarrow.fs.FileType.Directory
                   and info.base_name.startswith("checkpoint_") and info.base_name[11:].isdigit())
    for name in reversed(names):
        if fs.get_file_info(f"{parent}/{name}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File:
            return tune.Checkpoint(f"{parent}/{name}", filesystem=fs)
    return None


class MethodTrainable(tune.Trainable):
    def setup(self, config: dict[str, Any]) -> None:
        self._t0 = time.monotonic()
        self._elapsed_before = 0.0  # wall time of earlier incarnations of this trial (restores)
        self._restores = 0  # times this trial went on from a checkpoint (a worker died, a study resumed, PBT)
        # CPU time of this trial's process (every thread: torch's too) since its setup, earlier
        # incarnations included: what the arm's compute was, next to its wall time
        self._cpu0, self._cpu_before = time.process_time(), 0.0
        self.device = worker_device(config.get("device", "auto"))
        self.where = placement(self.device)
        self.splits, self.target, self.method = build_method(config, self.device)
        self.epochs_per_step = int(config.get("epochs_per_step", 1))

    def _deadline(self) -> Deadline | None:
        """The arm's deadline: as posted on the deadline board now (it moves when a study is
        resumed, see workers/deadlines.py), else as the config carries it."""
        deadline = self.config.get("deadline") if isinstance(self.config, dict) else None
        if deadline is not None and not isinstance(deadline, Deadline):
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
                raise TypeError(f"config 'deadline': expected a Deadline (Budget.deadline()), got {deadline!r}")
            # Tune's experiment state keeps configs as JSON: a restored trial gets the number back
            deadline = Deadline(float(deadline))
        key = self.config.get("deadline_key") if isinstance(self.config, dict) else None
        if deadline is not None and key is not None:
            from hypersweep.workers.deadlines import posted_deadline
            posted = posted_deadline(key)
            if posted is not None:
                deadline = Deadline(posted, deadline.clock)
        return deadline

    def step(self) -> dict[str, Any]:
        """`epochs_per_step` epochs, fewer when the arm's deadline passes first, then one report:
        work done before the budget ends is always reported. `epochs_this_step` counts complete
        epochs; a pass the deadline cut short trains and counts in `train_loss`, not as an epoch."""
        t = time.monotonic()
        deadline = self._deadline()
        if self.iteration >= int(self.config.get("max_steps") or 0) > 0:
            # a trial that had run all its steps, resumed with the others of an extended arm: it
            # ends at once, training nothing (the report is its last one again, not recorded)
            return {"done": True, "train_loss": float("nan"), "epoch": self.method.epoch, "epochs_this_step": 0,
                    **{f"val_{k}": v for k, v in self.method.evaluate("val").items()}}
        epoch_before, losses = self.method.epoch, []
        for _ in range(self.epochs_per_step):
            if past(deadline):
                break
            # the deadline also ends an epoch between minibatches
            losses.append(self.method.train_epoch(deadline) if deadline is not None else self.method.train_epoch())
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        if losses and not math.isfinite(train_loss):
            # A diverged run would report NaN to the end of its budget: end the trial, failed.
            # Not by raising: Tune retries a raised error up to max_failures, and a retry restores
            # the last checkpoint only to diverge again at the same epoch.
            return {"diverged": 1, "done": True, "val_loss": float("nan"), "epoch": self.method.epoch,
                    "error": f"training diverged: non-finite training loss at epoch {self.method.epoch}"}
        report = {"train_loss": train_loss, "epoch": self.method.epoch,
                  "epochs_this_step": self.method.epoch - epoch_before}
        for split in ("val", "test"):
            report.update({f"{split}_{k}": v for k, v in self.method.evaluate(split).items()})
        if hasattr(self.method, "diagnostics"):
            report.update(self.method.diagnostics())
        if past(deadline):
            report["should_checkpoint"] = True  # the budget ends here: keep this state (ensembles draw from it)
        report["step_time_s"] = time.monotonic() - t
        report["wall_time_s"] = self._elapsed_before + time.monotonic() - self._t0
        report["restores"] = self._restores
        report["cpu_time_s"] = self._cpu_time()
        report.update(self.where)
        return report

    def _cpu_time(self) -> float:
        return self._cpu_before + time.process_time() - self._cpu0

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        state = dict(self.method.state_dict(), elapsed=self._elapsed_before + time.monotonic() - self._t0,
                     restores=self._restores, cpu=self._cpu_time(), hp=dict(getattr(self.method, "hp", {})),
                     iteration=self.iteration)
        torch.save(state, os.path.join(checkpoint_dir, CHECKPOINT_FILE))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, CHECKPOINT_FILE)
        state = torch.load(path, map_location=self.device, weights_only=True)
        load_method_state(self.method, state, path)
        self._elapsed_before, self._t0 = float(state["elapsed"]), time.monotonic()
        self._restores = int(state.get("restores", 0)) + 1
        self._cpu_before, self._cpu0 = float(state.get("cpu", 0.0)), time.process_time()
        if "iteration" in state:  # the step count this state was saved at (see `restore`)
            self._iteration = int(state["iteration"])

    def restore(self, checkpoint_path) -> None:
        """Tune's restore; when the checkpoint Tune recorded is gone from storage, from the newest
        one the trial has. Tune snapshots its experiment every 2 s and deletes checkpoints beyond
        `num_to_keep` as new ones register, so a coordinator killed between the two leaves a
        snapshot naming a deleted checkpoint: Tune failed the trial on every retry (its progress
        lost; a clean-clone CI run saw it). Our checkpoints carry their step count."""
        checkpoint = getattr(checkpoint_path, "checkpoint", checkpoint_path)
        if isinstance(checkpoint, tune.Checkpoint):
            newest = newest_checkpoint_beside(checkpoint)
            if newest is not None:
                log.warning(
                    "%s is gone from storage; restoring the trial from %s", checkpoint.path, newest.path)
                checkpoint_path = (type(checkpoint_path)(checkpoint=newest, metrics=checkpoint_path.metrics)
                                   if hasattr(checkpoint_path, "metrics") else newest)
                checkpoint = newest
            # Tune unpickles a dict checkpoint's file before load_checkpoint; ours are state.pt only,
            # so one in the study directory was put there by someone else: never loaded
            dict_file = f"{checkpoint.path}/{DICT_CHECKPOINT}"
            if checkpoint.filesystem.get_file_info(dict_file).type != pafs.FileType.NotFound:
                raise ValueError(f"{dict_file}: a pickle hypersweep never writes (its checkpoints are "
                                 f"{CHECKPOINT_FILE}); not loaded")
        super().restore(checkpoint_path)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self.setup(new_config)
        self.config = new_config
        return True

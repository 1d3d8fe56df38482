"""MLflow models a user can load: each arm x seed's best model and each distilled ensemble,
logged with `mlflow.pytorch.log_model` (a signature and an input example), so that
`mlflow.pyfunc.load_model(uri).predict(x)` gives the predictions hypersweep evaluates.

A logged model is a `ServedNet` (methods/served.py): the mean prediction of its members'
nets, class probabilities or regression targets in data units, from inputs as hypersweep's
data loaders give them. Loading it needs hypersweep installed (the nets are its classes).

- An arm x seed's model (`model` on the arm's run, at the study's end): a method that trains
  one net (sgd, stn, ...) gives its best trial's net as the trial's last checkpoint holds it; a
  generative method gives the mean of `eval_samples` weight samples of its best trial, which
  is what its reported val/test metrics score. models.json in the study directory lists them:
  model URI, arm run, source trial, members, and their val/test metrics evaluated now.
- A distilled ensemble (`distilled-raw`, `distilled-gauge` on the arm's run, by `ensemble`
  and `distill`): the Polyak average, one net.
`register` puts one in the Model Registry (`--register NAME` of run, resume, ensemble and
distill picks the one with the lowest validation loss).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any, Iterator, Sequence

import numpy as np

from hypersweep.orchestrator.studydir import Folder, StudyDir
from hypersweep.orchestrator.tracking import is_placeholder, one_line
from hypersweep.orchestrator.trials import EnsembleError, TrialRecord, find_trials, groups

log = logging.getLogger("hypersweep")

MODELS_FILE = "models.json"
ARM_MODEL = "model"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}")


class ModelError(ValueError):
    """A model that cannot be logged or registered; the message is one line."""


def check_model_name(name: str) -> str:
    """A Model Registry name that works in `models:/NAME/VERSION` URIs, or ModelError."""
    if not _NAME.fullmatch(name or ""):
        raise ModelError(f"--register {name!r}: a model name is letters, digits, '_', '.', '-' and spaces, "
                         "starting with a letter or digit")
    return name


def requirements() -> list[str]:
    """What the logged model needs to load: the versions that wrote it."""
    from importlib.metadata import PackageNotFoundError, version
    reqs = []
    for package in ("torch", "mlflow", "hypersweep"):
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(package)
    return reqs


def figures(evaluation: dict[str, dict[str, Any]]) -> dict[str, float]:
    """hypersweep's evaluation of the model's members (evaluate_ensemble, per split) as flat
    metrics: val_loss, val_error (val_rmse), test_... of the mean prediction."""
    out = {}
    for split, m in evaluation.items():
        for name in ("error", "rmse", "loss"):
            value = m.get(f"mean_{name}")
            if value is not None and math.isfinite(value):
                out[f"{split}_{name}"] = float(value)
    return out


@contextlib.contextmanager
def _on_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) on `tracking_uri`; the global URI back after."""
    import mlflow
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _reopened(tracking_uri: str, run_id: str) -> Iterator[None]:
    """The run as MLflow's active run, on `tracking_uri`; afterwards it has the status and end
    time it had (an ended arm run stays ended when it was)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    before = client.get_run(run_id).info
    try:
        with _on_store(tracking_uri), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if before.end_time:
            client.set_terminated(run_id, before.status, end_time=before.end_time)


def log_model(tracking_uri: str, run_id: str, module, example: np.ndarray, *, name: str,
              metrics: dict[str, float], metadata: dict[str, Any]) -> str:
    """`module` as an MLflow PyTorch model named `name` on the run, with its signature (inferred
    from `example` and the module's output on it) and the example; `metrics` also on the run as
    `<name>/<metric>`. Returns the model's URI (models:/m-...)."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    with _reopened(tracking_uri, run_id):
        info = mlflow.pytorch.log_model(module, name=name, signature=infer_signature(example, output),
                                        input_example=example, pip_requirements=requirements(),
                                        metadata=metadata)
        mlflow.log_metrics({f"{name}/{k}": v for k, v in metrics.items()}, step=0)
    return info.model_uri


def register(tracking_uri: str, model_uri: str, name: str) -> str:
    """A new version of registered model `name` from `model_uri`: its models:/NAME/VERSION."""
    import mlflow
    with _on_store(tracking_uri):
        version = mlflow.register_model(model_uri, check_model_name(name)).version
    return f"models:/{name}/{version}"


def _cpu(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "device": "cpu"}  # the coordinator evaluates and serialises on its CPU


def arm_model(trials: Sequence[TrialRecord], tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Log the model of one arm x seed (see the module docstring) on its run; its models.json entry."""
    from hypersweep.workers.ensemble import sample_members, served_model
    best = min(trials, key=lambda t: t.best_val_loss)
    drawn = sample_members(_cpu(best.config), best.checkpoint(), None, 0)
    members = len(drawn["weights"])
    served, example, evaluation = served_model(_cpu(best.config), drawn["weights"], drawn["log_noise_std"])
    metrics = figures(evaluation)
    source = {"arm": best.arm, "seed_index": best.seed_index, "trial_id": best.trial_id, "method": best.method,
              "members": members}
    uri = log_model(tracking_uri, run_id, served, example, name=ARM_MODEL, metrics=metrics,
                    metadata={"hypersweep": {**source, "what": "the best trial's net" if members == 1 else
                                             f"the mean prediction of {members} weight samples of the best trial"}})
    return {"model_uri": uri, "run_id": run_id, **source, **metrics}


def log_arm_models(study_dir: StudyDir, tracking_uri: str, arm_runs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The model of every arm x seed that has finished trials, a run, and no model yet (a
    resumed study logs only the missing ones); models.json. A model that cannot be logged is
    one warning line, and the study's records stand."""
    done = study_dir.read_json(MODELS_FILE, default={}, kind=dict)
    try:
        by_unit = groups(find_trials(study_dir))
    except EnsembleError:  # no trial finished
        return done
    for (arm, k), trials in sorted(by_unit.items()):
        key = f"{arm}/seed{k}"
        run_id = arm_runs.get(key)
        if key in done or not run_id or is_placeholder(run_id):
            continue
        try:
            done[key] = arm_model(trials, tracking_uri, run_id)
        except Exception as e:  # a checkpoint gone, the store away: the rest of the study's end goes on
            log.warning("the model of %s was not logged: %s", key, one_line(e))
            continue
        study_dir.write_json(MODELS_FILE, done)
    return done


def best_of(models: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The (key, entry) with the lowest validation loss (error, RMSE when there is no loss)."""
    def rank(item):
        m = item[1]
        return m.get("val_loss", m.get("val_error", m.get("val_rmse", math.inf)))
    if not models:
        raise ModelError("no model was logged, so none can be registered")
    return min(models.items(), key=rank)


def log_distilled(tracker, run_id: str, out: Folder) -> dict[str, dict[str, Any]]:
    """The Polyak averages in an ensemble folder (distilled-<kind>.pt) as models
    `distilled-<kind>` on the arm's run; {kind: entry}. Needs the tracker's queue sent (the run
    made): otherwise one warning line, and the weights files stand."""
    import torch

    from hypersweep.workers.ensemble import served_model
    tracker.flush()
    if tracker.pending:
        log.warning("distilled models not logged: MLflow at %s is away", tracker.uri)
        return {}
    run_id = tracker.resolve(run_id)
    logged: dict[str, dict[str, Any]] = {}
    for kind in ("raw", "gauge"):
        name = f"distilled-{kind}.pt"
        if not out.is_file(name):
            continue
        try:
            with out.reading(name) as local:
                saved = torch.load(local, map_location="cpu", weights_only=True)
            served, example, evaluation = served_model(_cpu(saved["config"]), saved["weights"][None].numpy())
            metrics = figures(evaluation)
            uri = log_model(tracker.uri, run_id, served, example, name=f"distilled-{kind}", metrics=metrics,
                            metadata={"hypersweep": {"what": f"Polyak average ({kind}) of {saved['members']} members",
                                                     "ensemble": str(out)}})
        except Exception as e:
            log.warning("the distilled (%s) model of %s was not logged: %s", kind, out, one_line(e))
            continue
        logged[kind] = {"model_uri": uri, "run_id": run_id, **metrics}
    return logged

"""MLflow records. Only the coordinator writes here; workers report through Tune.

One experiment per study name, one parent run per study execution, one child run per arm x
seed, Tune trials nested under their arm's run. Metrics are buffered and written with
`log_batch`, so a fast trial does not make the coordinator wait on the database for every
report. Every run this object starts is ended (FINISHED, FAILED or KILLED), never left RUNNING.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PARAMS = 100  # and of params
MAX_PARAM_VALUE = 6000


def resolve_tracking_uri(flag: str | None = None, study_uri: str | None = None) -> str:
    """--tracking-uri, else the study's tracking.uri, else MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db. Absolute, because Tune trials chdir into their own folders."""
    uri = flag or study_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str | None, flush_every_s: float = 2.0):
        """`experiment` None: only for logging to runs that exist already (by id)."""
        from mlflow.tracking import MlflowClient

        # mlflow sets its loggers up when imported; quiet its INFO lines (table creation...) after that.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = None
        if experiment is not None:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.flush_every_s = flush_every_s
        self._buffers: dict[str, list] = {}
        self._last_flush = time.monotonic()
        self._open: list[str] = []

    def start_run(self, name: str, *, tags: Mapping[str, Any] | None = None, parent_id: str | None = None,
                  params: Mapping[str, Any] | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._open.append(run_id)
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(str(k)[:250], str(v)[:MAX_PARAM_VALUE]) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Buffered; written at the latest `flush_every_s` later, and by `flush()`."""
        from mlflow.entities import Metric
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        buf = self._buffers.setdefault(run_id, [])
        buf.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for run_id, metrics in self._buffers.items():
            for i in range(0, len(metrics), MAX_BATCH):
                self.client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH])
        self._buffers = {}
        self._last_flush = time.monotonic()

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    # -- continuing the runs of a resumed study ----------------------------------------------
    def find_run(self, **tags: str) -> str | None:
        """The first run of this experiment with these tag values (a run made before its id
        reached runs.json), or None."""
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1,
                                        order_by=["attributes.start_time ASC"])
        return found[0].info.run_id if found else None

    def child_runs(self, parent_id: str, tag: str) -> dict[str, str]:
        """{value of `tag`: run id} of the runs nested under `parent_id` (the oldest of equals)."""
        out: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                           max_results=1000, order_by=["attributes.start_time ASC"],
                                           page_token=token)
            for run in page:
                if tag in run.data.tags:
                    out.setdefault(run.data.tags[tag], run.info.run_id)
            token = page.token
            if not token:
                return out

    def reopen(self, run_id: str) -> int:
        """Continue a run of an earlier execution: RUNNING again, tagged with how often it was
        resumed (returned), and ended by this tracker like the runs it starts."""
        run = self.client.get_run(run_id)
        resumed = int(run.data.tags.get("resumed", "0")) + 1
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, {"resumed": resumed})
        if run_id not in self._open:
            self._open.append(run_id)
        return resumed

    def adopt_if_running(self, run_id: str) -> None:
        """A run an earlier execution left RUNNING is ended by this tracker (KILLED at the
        latest, by `end_all`)."""
        if run_id not in self._open and self.client.get_run(run_id).info.status == "RUNNING":
            self._open.append(run_id)

    def last_step(self, run_id: str, key: str, default: int = 0) -> int:
        """The highest step of `key` recorded on the run (`default`: none)."""
        self.flush()
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=default)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(run_id, status)
        if run_id in self._open:
            self._open.remove(run_id)

    def end_if_open(self, run_id: str, status: str) -> None:
        if run_id in self._open:
            self.end_run(run_id, status)

    def end_all(self, status: str) -> None:
        """End every run still open (children first), e.g. after an error or Ctrl-C."""
        try:
            self.flush()
        finally:
            for run_id in reversed(list(self._open)):
                self.client.set_terminated(run_id, status)
            self._open = []

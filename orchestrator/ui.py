"""`hypersweep ui`: the MLflow UI on a study's store, bound to 127.0.0.1, and the links that
open what a user compares: the experiment in its model-training view with the arm runs only,
the study's parent run, and one compare page per seed with that seed's arm runs.

MLflow 3's UI opens an experiment in its GenAI view (Traces, Judges) unless the URL says
`workflowType=machine_learning`; its pages are routes after `#/`.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

ARM_FILTER = "tags.kind = 'arm'"


MODEL_TRAINING = "workflowType=machine_learning"


def experiment_link(base: str, experiment_id: str) -> str:
    # (the runs route, `/runs`, is the one that reads searchFilter from the URL)
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&searchFilter={quote(ARM_FILTER)}"


def run_link(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page, or one of its artifacts open in the run's artifact pane."""
    page = f"/artifacts/{artifact}" if artifact else ""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{page}?{MODEL_TRAINING}"


def compare_link(base: str, experiment_id: str, run_ids: list[str]) -> str:
    return (f"{base}/#/compare-runs?runs={quote(json.dumps(sorted(run_ids)))}"
            f"&experiments={quote(json.dumps([experiment_id]))}&{MODEL_TRAINING}")


def study_links(base: str, runs: dict) -> list[tuple[str, str]]:
    """(what, URL) for a study's runs.json: the arms, the parent run, a compare page per seed."""
    exp, parent = runs.get("experiment_id"), runs.get("parent_run_id")
    if not exp:
        return [("experiments", f"{base}/#/experiments")]
    links = [("arm runs (model-training view)", experiment_link(base, exp))]
    if parent:
        links.append(("study run", run_link(base, exp, parent)))
        links.append(("its report (once `hypersweep compare` wrote it)", run_link(base, exp, parent,
                                                                                "report/report.html")))
    by_seed: dict[str, list[str]] = {}
    for key, run_id in sorted((runs.get("arms") or {}).items()):
        by_seed.setdefault(key.rpartition("/seed")[2], []).append(run_id)
    for seed, ids in sorted(by_seed.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if len(ids) > 1:
            links.append((f"compare the arms, seed {seed}", compare_link(base, exp, ids)))
    return links


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, artifacts: str | None, log: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` over the store `uri`; artifacts of new experiments
    under `artifacts` (those hypersweep made name their own location, beside the database)."""
    from hypersweep.orchestrator.tracking import init_store
    init_store(uri)  # the server's workers would otherwise each make the tables (and race a study starting)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    if artifacts:
        command += ["--default-artifact-root", artifacts]
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(base: str, proc: subprocess.Popen, timeout_s: float = 90) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def stop_server(proc: subprocess.Popen) -> None:
    import os
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

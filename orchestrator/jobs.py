"""Studies as Ray Jobs on a running cluster: `hypersweep submit | jobs | logs | stop`.

A submitted study's coordinator runs on the cluster's head (Ray Jobs starts it there), the one
MLflow writer, exactly as `hypersweep run --address auto` would. What travels with the job is a
folder with the study file (and a data folder, only when asked): Ray uploads it through the
head's dashboard and deletes it when the job ends. So the records must go elsewhere: the study
directory on storage every node and a later head reach (`--study-dir`, a shared path or a
bucket), and MLflow to a store the head reaches. Then `submit --resume STUDY_DIR` continues a
study that was stopped, or whose head was lost.

Talks to the head's dashboard (`http://HEAD:8265`, Ray's Jobs API from the `cluster` extra);
with token authentication on the cluster, Ray's client sends the token it finds
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=token).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Seconds a stopped job's coordinator gets between SIGTERM and Ray's SIGKILL (Ray's default is
# 3 s): enough to stop its trials, keep their last reports and leave the records consistent.
STOP_WAIT_S = 120
# Set in a submitted job's environment: `run` and `resume` then refuse a default MLflow store
# inside the job's working folder, which Ray deletes when the job ends.
JOB_ENV = "HYPERSWEEP_JOB"
# Ray uploads a job's folder through the head's object store, up to about 500 MiB; larger data
# goes on the cluster's storage and is named with --data-root.
MAX_UPLOAD_BYTES = 400 * 2**20
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(Exception):
    """A `submit`/`jobs`/`logs`/`stop` that cannot go on; the message is one line."""


@dataclass
class Submission:
    job_id: str
    study_dir: str
    entrypoint: str


def client(address: str | None):
    """Ray's Jobs client for the dashboard at `address` (else RAY_API_SERVER_ADDRESS, else
    RAY_ADDRESS when it is an http address)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        given = f" (given: {address})" if address else ""
        raise JobsError(f"give the cluster's dashboard as --address http://HEAD:8265{given}, or set "
                        "RAY_API_SERVER_ADDRESS (with a KubeRay cluster: kubectl port-forward svc/<name>-head-svc "
                        "8265:8265, then http://127.0.0.1:8265)")
    import importlib.util
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        JobSubmissionClient = None
    if JobSubmissionClient is None or importlib.util.find_spec("aiohttp_cors") is None:  # (ray[default])
        raise JobsError("Ray's Jobs API is not installed: pip install 'hypersweep[cluster]'")
    import logging
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):  # (INFO lines on every upload and log stream)
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, RuntimeError (auth, version): the first line says which
        raise JobsError(f"--address {address}: no Ray Jobs API answers there ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def job_id_for(study_name: str) -> str:
    """A submission id users can read: hypersweep-<study>-<UTC time>-<4 hex>."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", study_name)[:60].strip("-") or "study"
    return f"hypersweep-{name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def submit(jobs, *, study_file: str | None, study_dir: str, resume: bool, options: list[str],
           upload_data: str | None = None, study_name: str | None = None) -> Submission:
    """Start the study (or `resume` of `study_dir`) as a Ray Job; returns at once. `options`:
    `run`/`resume` options passed on as given (already checked here). `upload_data`: a local
    folder sent with the job and used as its --data-root."""
    folder = Path(tempfile.mkdtemp(prefix="hypersweep-submit-"))
    try:
        if resume:
            command = ["resume", study_dir]
        else:
            shutil.copyfile(study_file, folder / "study.yaml")
            command = ["run", "study.yaml", "--study-dir", study_dir]
        if upload_data:
            size = sum(f.stat().st_size for f in Path(upload_data).rglob("*") if f.is_file())
            if size > MAX_UPLOAD_BYTES:
                raise JobsError(f"--upload-data {upload_data}: {size / 2**20:.0f} MiB is more than Ray uploads with "
                                f"a job ({MAX_UPLOAD_BYTES // 2**20} MiB here); put it on the cluster's storage and "
                                "give --data-root PATH instead")
            shutil.copytree(upload_data, folder / "data", symlinks=False)
            options = [*options, "--data-root", "data"]
        argv = [*command, "--address", "auto", "--no-live", *options]
        entrypoint = shlex.join(["python", "-m", "hypersweep.orchestrator.cli", *argv])
        job_id = job_id_for(study_name or Path(study_dir.rstrip("/")).name)
        runtime_env: dict[str, Any] = {
            "working_dir": str(folder),
            "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), JOB_ENV: "1",
                         "PYTHONUNBUFFERED": "1"},
        }
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                                     metadata={"hypersweep": command[0], "study_dir": study_dir,
                                               "study": study_name or ""})
        except Exception as e:
            raise JobsError(f"the cluster refused the job ({_first_line(e)})") from None
        return Submission(job_id, study_dir, entrypoint)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except Exception as e:  # RuntimeError: no such job (HTTP 404), or the server failed
        raise JobsError(f"job {job_id}: {_first_line(e)}") from None


def listing(jobs) -> list[dict[str, str]]:
    """Every job the cluster knows, newest first; hypersweep's with their study directory."""
    try:
        found = jobs.list_jobs()
    except Exception as e:
        raise JobsError(f"cannot list the cluster's jobs ({_first_line(e)})") from None
    rows = []
    for j in sorted(found, key=lambda j: j.start_time or 0, reverse=True):
        meta = j.metadata or {}
        started = dt.datetime.fromtimestamp(j.start_time / 1000, dt.timezone.utc) if j.start_time else None
        rows.append({"job": j.submission_id or j.job_id or "?", "status": str(getattr(j.status, "value", j.status)),
                     "started (UTC)": f"{started:%Y-%m-%d %H:%M:%S}" if started else "-",
                     "what": meta.get("hypersweep", "(not hypersweep)"), "study dir": meta.get("study_dir", "-")})
    return rows


def status_of(job) -> str:
    return str(getattr(job.status, "value", job.status))


def follow(jobs, job_id: str, out=sys.stdout) -> None:
    """Print the job's log as it grows, until the job ends."""
    import asyncio

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:
        raise JobsError(f"job {job_id}: the log stream broke ({_first_line(e)}); `hypersweep logs {job_id}` "
                        "prints what there is") from None


def logs(jobs, job_id: str) -> str:
    try:
        return jobs.get_job_logs(job_id)
    except Exception as e:
        raise JobsError(f"job {job_id}: {_first_line(e)}") from None


def stop(jobs, job_id: str) -> bool:
    """Ask the job to stop (SIGTERM to its coordinator, which stops the study as Ctrl-C does);
    False when it had ended already."""
    try:
        return jobs.stop_job(job_id)
    except Exception as e:
        raise JobsError(f"job {job_id}: {_first_line(e)}") from None

"""MLflow records. Only the coordinator writes here; workers report through Tune.

One experiment per study name, one parent run per study execution, one child run per arm x
seed, Tune trials nested under their arm's run. Metrics are buffered and written with
`log_batch`, so a fast trial does not make the coordinator wait on the database for every
report. Every run this object starts is ended (FINISHED, FAILED or KILLED), never left RUNNING.

An MLflow store that is unreachable or busy for a while (a restarted server, a locked sqlite
file) does not stop the study. Every write is one operation on one ordered queue:
1. with nothing queued it is written at once; a transient failure (connection refused or
   reset, a timeout, HTTP 408/429/5xx, "database is locked") is retried with exponential
   backoff for `retry_for_s` (a few seconds: the Tune loop waits meanwhile), then the operation
   stays queued and the call returns;
2. while operations wait, later ones queue behind them, so one run's operations keep their
   order and a run is made before anything is logged on it; a later call (or `flush()`) sends
   the queue again, at most every 1, 2, 4, 8 s while the store stays away;
3. a run started while operations wait gets a placeholder id, `pending:<key>`, which every
   method here accepts. Once MLflow has made the run, `resolve(placeholder)` gives its id and
   the callbacks registered with `on_run_created` get (placeholder, id). Callers that keep run
   ids beyond this tracker (runs.json, trial records) register one and store the id it gives;
   a placeholder an earlier tracker left unresolved names no run (`without_placeholders`):
   the run, if MLflow made it after all, is found by its tags;
4. `end_all`, and `end_run` of the last open run (the end of a study), wait up to
   `final_wait_s` for the queue; what is still unsent then is named in one warning line and
   handed to the callbacks registered with `on_abandon` as JSON-able records (`unsent()`),
   which the caller keeps (the study directory's outbox) and a later tracker sends with
   `send_unsent`: `hypersweep resume` does, once the store is back.
A write MLflow refuses (a param changing its value, an invalid value, a deleted run) is not
retried: the answer would be the same every time, and every later record would wait behind
it. It is logged as a warning and dropped; the study directory still has the record.

Writes may run twice (a request that reached MLflow whose answer was lost): metrics keep the
timestamp of the call, so a second write of one is the same row (MLflow's log_batch skips an
identical (key, timestamp, step, value)); params and tags rewrite the same value; a run made
twice is prevented by the `hypersweep.run_key` tag every run gets, which a retried create looks
for first.

Not thread-safe: the coordinator calls it from one thread (Tune callbacks run in the driver's
loop).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from hypersweep.orchestrator.budget import Clock

log = logging.getLogger("hypersweep")

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PARAMS = 100  # and of params
MAX_PARAM_VALUE = 6000

PLACEHOLDER = "pending:"  # a run id that MLflow has not given yet
RUN_KEY_TAG = "hypersweep.run_key"  # on every run: the key of its placeholder, found again after a lost answer

# mlflow's REST client retries a refused connection 7 times with backoff factor 2 (minutes) and
# waits 120 s for an answer (MLFLOW_HTTP_REQUEST_* in mlflow/environment_variables.py). It has
# no per-client setting: RestStore calls mlflow.utils.rest_utils.http_request with none of those
# arguments, and http_request reads the variables at every request. So the Tracker sets them
# around its own calls only (unless the user set them) and does the retrying itself, where it
# can give up after a few seconds and queue instead of stalling the Tune loop.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
WRITE_TIMEOUT_S = 5  # a log_batch of 1000 metrics takes ~0.2 s through a server; a hung one costs this
SLOW_TIMEOUT_S = 60  # searches of a large experiment, artifact uploads

FIRST_RETRY_S = 0.25  # backoff: 0.25, 0.5, 1, 2, ... s between tries
MAX_RETRY_GAP_S = 8.0

# MLflow error codes that mean "not now" rather than "not this"
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "SERVICE_UNDER_MAINTENANCE", "WORKSPACE_TEMPORARILY_UNAVAILABLE",
                              "DEADLINE_EXCEEDED", "ABORTED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED",
                              "COULD_NOT_ACQUIRE_LOCK"})
_BUSY_WORDS = ("database is locked", "database is busy", "database table is locked")


class TrackingUnavailable(Exception):
    """MLflow could not be reached for something that cannot wait in the queue: a read, or the
    experiment at start-up."""


class _NotYet(Exception):
    """A placeholder whose create still waits in the queue (treated as transient)."""


class _Unmade(Exception):
    """A placeholder MLflow never made a run for (its create was refused, or an earlier
    tracker's never reached MLflow)."""


def resolve_tracking_uri(flag: str | None = None, study_uri: str | None = None) -> str:
    """--tracking-uri, else the study's tracking.uri, else MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db. Absolute, because Tune trials chdir into their own folders."""
    uri = flag or study_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (sqlite, a file store): writing there sends nothing out."""
    from urllib.parse import urlparse
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("", "sqlite", "file") or len(scheme) == 1  # (a Windows drive letter)


def choose_store(recorded: str | None, flag: str | None) -> tuple[str | None, str | None]:
    """Where records of an existing study go: (uri, None), or (None, why not). The user names
    the store (--tracking-uri, MLFLOW_TRACKING_URI); a store a study directory's own files name
    (runs.json, trial.json, an ensemble's metadata) is used only when it is on this machine or
    the user named the same: a planted server address is never contacted."""
    if flag:
        return resolve_tracking_uri(flag), None
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if not recorded:
        return resolve_tracking_uri(None), None
    if (env and resolve_tracking_uri(env) == recorded) or is_local_store(recorded):
        return recorded, None
    return None, (f"the study's files name MLflow at {recorded}; records go to a server only when you name it: "
                  f"--tracking-uri {recorded}")


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database
    (mlartifacts/), not in ./mlruns of whatever directory the command ran in."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


# filesystems where SQLite's write-ahead log is safe: on local disks only (its shared-memory index
# does not work over NFS, SMB and the like, https://sqlite.org/wal.html)
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "overlay", "jfs", "reiserfs"}


def filesystem_of(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem that holds `path` (`mounts`: the text of Linux's /proc/mounts,
    read when None), None when unknown."""
    try:
        mounts = [line.split()[1:3] for line in (mounts or Path("/proc/mounts").read_text()).splitlines()]
    except OSError:
        return None
    path, best = path.resolve(), None
    for point, kind in (m for m in mounts if len(m) == 2):  # (the last of equal mount points is on top)
        point = Path(re.sub(r"\\([0-7]{3})", lambda o: chr(int(o[1], 8)), point))  # (" " is written \040)
        if (path == point or point in path.parents) and (best is None or len(point.parts) >= len(best[0].parts)):
            best = (point, kind)
    return best[1] if best else None


def write_ahead(db: Path) -> bool:
    """Put a sqlite store on a local disk in write-ahead-log mode (kept in the file, so `mlflow ui`
    and every later process use it too): a commit then appends to mlflow.db-wal instead of
    rewriting pages through a rollback journal, and with synchronous=NORMAL on the coordinator's
    connections (sqlite_connection) it waits for no fsync. A process killed mid-study loses
    nothing committed (the log is replayed by the next opener); a power cut may roll back the
    store's last commits (not the study directory's records). Not on network filesystems, and
    not where the filesystem is unknown. Returns whether the store is in WAL mode."""
    import sqlite3
    if filesystem_of(db) not in LOCAL_FILESYSTEMS:
        return False
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:  # (busy: it stays in rollback-journal mode)
            return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal"
    except sqlite3.Error:
        return False


def sqlite_connection(dbapi_connection, _record) -> None:
    """SQLAlchemy 'connect' hook: a sqlite connection of a store in WAL mode syncs at checkpoints,
    not at every commit."""
    import sqlite3
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                cursor.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:  # (a database locked by another process: left as it is)
            pass
        finally:
            cursor.close()


def init_store(uri: str) -> None:
    """Make (or upgrade) a sqlite store's tables once, under a lock file beside the database,
    before anything uses it. MLflow creates and migrates the schema on a process's first access,
    and processes that do it at once on a new database fail: four at once on a fresh file, three
    times over, left one of twelve standing (alembic's "Online migration expected to match one
    row", "table ... already exists"). A study, `hypersweep ui` and `compare` may well start
    together on the default store. Other stores are left to their server."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow.tracking import MlflowClient
    db = Path(uri[len("sqlite:///"):].split("?")[0])  # (sqlite:///x.db?timeout=30: the file is x.db)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # (its INFO lines on table creation)
            if write_ahead(db):  # (before MLflow's first connection, which its engine keeps)
                _listen_for_sqlite_connections()
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _listen_for_sqlite_connections() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    if not event.contains(Engine, "connect", sqlite_connection):
        event.listen(Engine, "connect", sqlite_connection)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _params(params: Mapping[str, Any]) -> list:
    from mlflow.entities import Param
    return [Param(str(k)[:250], str(v)[:MAX_PARAM_VALUE]) for k, v in flatten(params).items()]


def is_placeholder(run_id: Any) -> bool:
    return isinstance(run_id, str) and run_id.startswith(PLACEHOLDER)


def without_placeholders(ids: dict[str, Any]) -> dict[str, Any]:
    """`ids` (e.g. runs.json) without the placeholders in it, at any depth."""
    return {k: without_placeholders(v) if isinstance(v, dict) else v for k, v in ids.items() if not is_placeholder(v)}


def swap_id(ids: dict[str, Any], old: str, new: str) -> bool:
    """Replace the value `old` by `new` anywhere in `ids`, in place; whether there was one."""
    found = False
    for k, v in ids.items():
        if isinstance(v, dict):
            found = swap_id(v, old, new) or found
        elif v == old:
            ids[k], found = new, True
    return found


def transient(err: BaseException) -> bool:
    """Whether `err` says the store cannot answer now (worth trying again), rather than that it
    refuses this operation. Looks through the exception's causes: mlflow wraps the requests /
    urllib3 error in an MlflowException whose own code is INTERNAL_ERROR."""
    import requests
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.exceptions.SSLError):
            return False  # a certificate problem does not go away by waiting
        if isinstance(e, (_NotYet, ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                          requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
                          requests.exceptions.RetryError)):  # RetryError: urllib3 gave up on a 408/429/5xx answer
            return True
        if getattr(e, "error_code", None) in _TRANSIENT_CODES:
            return True
        if any(w in str(e).lower() for w in _BUSY_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def one_line(err: BaseException) -> str:
    """An error as one line of at most 200 characters (its first line, else its type)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _http_limits(timeout_s: int):
    limits = {**HTTP_LIMITS, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {name: None for name in limits if name not in os.environ}  # a variable the user set wins
    os.environ.update({name: limits[name] for name in saved})
    try:
        yield
    finally:
        for name in saved:
            os.environ.pop(name, None)


@dataclass
class _Op:
    kind: str  # create | batch | terminate | status | artifact
    handle: str  # the run as the caller knows it: an MLflow id or a placeholder
    args: dict[str, Any] = field(default_factory=dict)
    queued: bool = False  # not written when it was submitted
    tried: bool = False  # sent at least once: a create may have reached MLflow
    split: bool = False  # one item of a refused batch

    def items(self) -> int:
        return sum(len(self.args.get(k, ())) for k in ("metrics", "params", "tags"))

    def __str__(self) -> str:
        if self.kind == "create":
            return f"the run {self.args['name']!r}"
        if self.kind == "batch":
            what = ", ".join(f"{len(self.args[k])} {k}" for k in ("metrics", "params", "tags") if self.args.get(k))
            return f"{what} of run {self.handle}"
        if self.kind == "artifact":
            return f"the artifact {Path(self.args['path']).name} of run {self.handle}"
        return f"status {self.args['status']} of run {self.handle}"


class Tracker:
    def __init__(self, uri: str, experiment: str | None, flush_every_s: float = 2.0, *, client=None,
                 clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 retry_for_s: float = 3.0, read_wait_s: float = 10.0, final_wait_s: float = 30.0):
        """`experiment` None: only for logging to runs that exist already (by id). `client`: an
        MlflowClient-like object (tests pass a faulty one). `retry_for_s`: how long a write is
        retried before it is queued; `read_wait_s`: how long a read (and the experiment, here)
        waits for the store; `final_wait_s`: how long the end of the study waits for the queue.
        Raises TrackingUnavailable when the experiment cannot be read or made."""
        if client is None:
            from mlflow.tracking import MlflowClient
            # mlflow sets its loggers up when imported; quiet its INFO lines (table creation...) after that.
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            try:
                init_store(uri)
            except Exception as e:  # (a folder that cannot be written...): the first read below says it in one line
                log.debug("initialising %s: %s", uri, e)
            client = MlflowClient(tracking_uri=uri)
        self.uri, self.client, self.clock, self.sleep = uri, client, clock, sleep
        self.flush_every_s, self.retry_for_s, self.read_wait_s, self.final_wait_s = \
            flush_every_s, retry_for_s, read_wait_s, final_wait_s
        self.replay_hint = ""  # the end of the warning about records left unsent (the caller's words)
        # called before every write: the study's lease raises LeaseLost there once this
        # coordinator no longer holds the study (orchestrator/lease.py)
        self.guard: Callable[[], None] | None = None
        self.stats: Counter[str] = Counter()  # queued, merged, replayed, dropped, abandoned, late_runs, outages...
        self._params: dict[str, list] = {}  # run -> params not yet sent (start_run's, sent by flush)
        self._buffers: dict[str, list] = {}
        self._last_flush = clock()
        self._open: list[str] = []
        self._pending: deque[_Op] = deque()
        self._ids: dict[str, str] = {}  # placeholder -> MLflow run id
        self._creating: set[str] = set()  # placeholders whose create is queued
        self._unmade: set[str] = set()
        self._unmade_warned: set[str] = set()
        self._callbacks: list[Callable[[str, str], None]] = []
        self._abandon_callbacks: list[Callable[[list[dict[str, Any]]], None]] = []
        self._next_try = 0.0  # no new attempt on the queue before (clock)
        self._gap = 1.0  # between attempts while the store is away: 1, 2, 4, 8 s
        self._down_since: float | None = None
        self._draining = False
        self._spool: Path | None = None  # copies of artifacts that wait in the queue
        self.experiment_id = None
        if experiment is not None:
            exp = self._read(lambda: client.get_experiment_by_name(experiment), f"experiment {experiment!r}",
                             read_wait_s, drain=False)
            self.experiment_id = exp.experiment_id if exp else self._read(
                lambda: self._create_experiment(experiment), f"experiment {experiment!r}", read_wait_s, drain=False)
        atexit.register(_close_at_exit, weakref.ref(self))  # `compare`, `ensemble`: no run ends their queue

    def _create_experiment(self, name: str) -> str:
        """A new experiment, or the one another process made since we looked (studies started together)."""
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root(self.uri))
        except Exception as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    # -- placeholders ----------------------------------------------------------------------
    def on_run_created(self, callback: Callable[[str, str], None]) -> None:
        """`callback(placeholder, run_id)` once MLflow has made a run that `start_run` returned
        as a placeholder. It must not call this tracker."""
        self._callbacks.append(callback)

    def resolve(self, run_id: str) -> str:
        """The MLflow id of a run as `start_run` returned it: the id itself, or a placeholder's
        id once MLflow has made the run (the placeholder until then)."""
        return self._ids.get(run_id, run_id)

    @property
    def pending(self) -> int:
        """Operations waiting for the store."""
        return len(self._pending)

    # -- writes ----------------------------------------------------------------------------
    def start_run(self, name: str, *, tags: Mapping[str, Any] | None = None, parent_id: str | None = None,
                  params: Mapping[str, Any] | None = None) -> str:
        """The new run's id, or a placeholder when MLflow cannot make it now (see the module)."""
        key = uuid.uuid4().hex
        handle = PLACEHOLDER + key
        tags = {k: str(v) for k, v in (tags or {}).items()}
        tags[RUN_KEY_TAG] = key
        self._creating.add(handle)
        self._submit(_Op("create", handle, {"name": name, "tags": tags, "parent": parent_id, "start_ms": _now_ms(),
                                            "key": key}))
        run_id = self.resolve(handle)
        self._open.append(run_id)
        if params:  # sent with the run's first metrics, one log_batch (flush), not a request of their own
            self._params.setdefault(run_id, []).extend(_params(params))
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = _params(params)
        for i in range(0, len(items), MAX_PARAMS):
            self._submit(_Op("batch", run_id, {"params": items[i:i + MAX_PARAMS]}))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self._submit(_Op("batch", run_id, {"tags": [RunTag(k, str(v)) for k, v in tags.items()]}))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Buffered; written at the latest `flush_every_s` later, and by `flush()`."""
        from mlflow.entities import Metric
        ts = timestamp_ms if timestamp_ms is not None else _now_ms()
        buf = self._buffers.setdefault(run_id, [])
        buf.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None)
        if self.clock() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self, run_id: str | None = None) -> None:
        """Send the buffered metrics, with the params of runs started since the last flush,
        after whatever waits in the queue: a run's first log_batch carries both (MLflow takes
        up to MAX_PARAMS params and MAX_BATCH items in all per request). `run_id`: that run's
        only (its end), the others' wait for the next flush."""
        if self.guard is not None:
            self.guard()
        if run_id is None:
            buffers, self._buffers = self._buffers, {}
            params, self._params = self._params, {}
            self._last_flush = self.clock()
        else:  # by the id or the placeholder it was logged under
            real = self.resolve(run_id)
            mine = [k for k in {**self._params, **self._buffers} if k == run_id or self.resolve(k) == real]
            buffers = {k: self._buffers.pop(k) for k in mine if k in self._buffers}
            params = {k: self._params.pop(k) for k in mine if k in self._params}
        for run_id in {**params, **buffers}:
            p, m = params.get(run_id, []), buffers.get(run_id, [])
            while p or m:
                first, p = p[:MAX_PARAMS], p[MAX_PARAMS:]
                room = MAX_BATCH - len(first)
                batch = {"params": first, "metrics": m[:room]}
                m = m[room:]
                self._submit(_Op("batch", run_id, {k: v for k, v in batch.items() if v}))
        if self._pending and self.clock() >= self._next_try:
            self._drain(0.0)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder; a copy waits in the queue when MLflow cannot take it now (the
        caller's path may be a temporary one)."""
        self._submit(_Op("artifact", run_id, {"path": str(path), "artifact_path": artifact_path}))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """The run's buffered records, then its end (other runs' buffers wait for their flush:
        a study ending thousands of trials does not send its arm's curve with every one)."""
        self.flush(run_id)
        self._submit(_Op("terminate", run_id, {"status": status, "end_ms": _now_ms()}))
        k = self._open_index(run_id)
        if k is not None:
            del self._open[k]
            if not self._open:  # the study's last run: its records go now, or are named
                self.close()

    def end_if_open(self, run_id: str, status: str) -> None:
        if self._open_index(run_id) is not None:
            self.end_run(run_id, status)

    def _open_index(self, run_id: str) -> int | None:
        """Where the run is among the open ones, by its placeholder or its id."""
        real = self.resolve(run_id)
        return next((k for k, r in enumerate(self._open) if r == run_id or self.resolve(r) == real), None)

    def end_all(self, status: str) -> None:
        """End every run still open (children first), e.g. after an error or Ctrl-C."""
        try:
            self.flush()
        finally:
            for run_id in reversed(list(self._open)):
                self._submit(_Op("terminate", run_id, {"status": status, "end_ms": _now_ms()}))
            self._open = []
            self.close()

    def close(self) -> None:
        """Send what waits, for up to `final_wait_s`; what is still unsent then is dropped with
        one warning line (the study directory keeps it). A tracker whose study is no longer
        this coordinator's drops what waits."""
        if self.guard is not None:
            try:
                self.guard()
            except Exception:
                self._buffers, self._params, self._open = {}, {}, []
                self._pending.clear()
                return
        self.flush()
        if self._pending:
            self._drain(self.final_wait_s)
        if self._pending:
            runs = {op.handle for op in self._pending}
            metrics = sum(len(op.args.get("metrics", ())) for op in self._pending)
            log.warning("MLflow at %s still unreachable after %g s: %d records of %d runs not written "
                        "(%d metric values)%s", self.uri, self.final_wait_s, len(self._pending), len(runs), metrics,
                        self.replay_hint)
            self.stats["abandoned"] += len(self._pending)
            records = self.unsent() if self._abandon_callbacks else []
            for callback in self._abandon_callbacks:
                try:
                    callback(records)
                except Exception:  # keeping them failed: the warning above stands
                    log.exception("keeping the unsent MLflow records failed")
            for op in self._pending:
                if op.kind == "create":  # later writes on it are dropped, not queued behind nothing
                    self._creating.discard(op.handle)
                    self._unmade.add(op.handle)
            self._pending.clear()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    # -- records the store never got: kept by the caller, sent by a later tracker ------------
    def on_abandon(self, callback: Callable[[list[dict[str, Any]]], None]) -> None:
        """`callback(records)` when `close` gives up on what waits: `unsent()` at that moment.
        It must not call this tracker."""
        self._abandon_callbacks.append(callback)

    def unsent(self) -> list[dict[str, Any]]:
        """What waits for the store, in order (buffered metrics last), as JSON-able records
        that `send_unsent` of a later tracker takes. An artifact's `path` is a local copy that
        lives until this tracker sends or drops it: a caller that keeps the records copies it."""
        ops = list(self._pending) + [_Op("batch", run_id, {"metrics": metrics})
                                     for run_id, metrics in self._buffers.items() if metrics]
        return [_record_of(op) for op in ops]

    def send_unsent(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send an earlier tracker's `unsent()` records after whatever waits here, retried for
        `read_wait_s`. Returns what still waits then (nothing when the store took it all), which
        this tracker forgets: the caller keeps it for a later try. Sending a record twice is
        harmless (see the module), so a caller keeps them until this returns."""
        for record in records:
            op = _op_of(record)
            if op.kind == "create":
                self._creating.add(op.handle)
            self._mark_queued(op)
            self._pending.append(op)
        if self._drain(self.read_wait_s):
            return []
        left = self.unsent()
        for op in self._pending:
            if op.kind == "create":
                self._creating.discard(op.handle)
        self._pending.clear()
        self._buffers.clear()
        return left

    # -- continuing the runs of a resumed study ----------------------------------------------
    def find_run(self, **tags: str) -> str | None:
        """The first run of this experiment with these tag values (a run made before its id
        reached runs.json), or None; also None when MLflow cannot be reached within
        `retry_for_s`, with a warning: a new study looks for every arm's run, and it must go on
        (the only risk is a second run for an arm whose earlier execution died between making
        its run and writing runs.json)."""
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        try:
            found = self._read(lambda: self.client.search_runs([self.experiment_id], filter_string=where, max_results=1,
                                                               order_by=["attributes.start_time ASC"]),
                               f"a run with {where}", self.retry_for_s)
        except TrackingUnavailable as e:
            log.warning("%s; taking it that there is none", e)
            return None
        return found[0].info.run_id if found else None

    def child_runs(self, parent_id: str, tag: str) -> dict[str, str]:
        """{value of `tag`: run id} of the runs nested under `parent_id` (the oldest of equals)."""
        out: dict[str, str] = {}
        token = None
        while True:
            page = self._read(lambda: self.client.search_runs(
                [self.experiment_id], f"tags.mlflow.parentRunId = '{self._run_id(parent_id)}'", max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=token), f"the runs under {parent_id}", self.read_wait_s)
            for run in page:
                if tag in run.data.tags:
                    out.setdefault(run.data.tags[tag], run.info.run_id)
            token = page.token
            if not token:
                return out

    def reopen(self, run_id: str) -> int:
        """Continue a run of an earlier execution: RUNNING again, tagged with how often it was
        resumed (returned), and ended by this tracker like the runs it starts."""
        run = self._read(lambda: self.client.get_run(self._run_id(run_id)), f"run {run_id}", self.read_wait_s)
        resumed = int(run.data.tags.get("resumed", "0")) + 1
        self._submit(_Op("status", run_id, {"status": "RUNNING"}))
        self.set_tags(run_id, {"resumed": resumed})
        if self._open_index(run_id) is None:
            self._open.append(run_id)
        return resumed

    def adopt_if_running(self, run_id: str) -> None:
        """A run an earlier execution left RUNNING is ended by this tracker (KILLED at the
        latest, by `end_all`)."""
        if self._open_index(run_id) is not None:
            return
        run = self._read(lambda: self.client.get_run(self._run_id(run_id)), f"run {run_id}", self.read_wait_s)
        if run.info.status == "RUNNING":
            self._open.append(run_id)

    def last_step(self, run_id: str, key: str, default: int = 0) -> int:
        """The highest step of `key` recorded on the run (`default`: none). Everything queued is
        sent first: an answer that missed it would send those steps twice."""
        self.flush()
        history = self._read(lambda: self.client.get_metric_history(self._run_id(run_id), key),
                             f"{key} of run {run_id}", self.read_wait_s)
        return max((m.step for m in history), default=default)

    # -- the queue -------------------------------------------------------------------------
    def _call(self, fn, *args, timeout_s: int = WRITE_TIMEOUT_S, **kwargs):
        with _http_limits(timeout_s):
            return fn(*args, **kwargs)

    def _read(self, fn: Callable[[], Any], what: str, wait_s: float, drain: bool = True):
        """A read, after the queue (a read before it would miss this tracker's own records),
        retried on transient failures for `wait_s`; TrackingUnavailable after that."""
        end = self.clock() + wait_s
        if drain and self._pending and not self._drain(wait_s):
            raise TrackingUnavailable(f"MLflow at {self.uri} unreachable for {wait_s:g} s ({what}): "
                                      f"{len(self._pending)} records wait to be written")
        delay = FIRST_RETRY_S
        while True:
            try:
                out = self._call(fn, timeout_s=SLOW_TIMEOUT_S)
            except Exception as err:
                if not transient(err):
                    raise
                self._went_down(err)
                if self.clock() >= end:
                    raise TrackingUnavailable(f"MLflow at {self.uri} unreachable for {wait_s:g} s ({what}): "
                                              f"{one_line(err)}") from err
                self.sleep(min(delay, end - self.clock()))  # the last try at the end of the wait
                delay = min(2 * delay, MAX_RETRY_GAP_S)
                continue
            if not self._pending:
                self._came_back()
            return out

    def _submit(self, op: _Op) -> None:
        """Every write comes here: written at once (retried for `retry_for_s`) when nothing
        waits, else queued behind what waits, which is retried when its time has come."""
        if self.guard is not None:
            self.guard()
        if self._pending or self._draining:
            self._mark_queued(op)
            if self._merge(op):
                return
            self._pending.append(op)
            if self.clock() >= self._next_try:
                self._drain(0.0)
        else:
            self._pending.append(op)
            self._drain(self.retry_for_s)
            for left in self._pending:  # this op (or its items, after a refusal) could not be written
                self._mark_queued(left)
        if op.kind == "artifact" and op in self._pending:
            self._keep_copy(op)

    def _mark_queued(self, op: _Op) -> None:
        if not op.queued:
            op.queued = True
            self.stats["queued"] += 1
            self.stats["queued_metrics"] += len(op.args.get("metrics", ()))

    def _merge(self, op: _Op) -> bool:
        """Metrics join the run's last queued batch of metrics (with the run's params, if it
        carries them) when nothing of that run came after it (fewer requests when the store is
        back; the order of the run's records holds)."""
        if op.kind != "batch" or set(op.args) != {"metrics"}:
            return False
        for prev in reversed(self._pending):
            if prev.handle != op.handle:
                continue
            if (prev.kind == "batch" and set(prev.args) in ({"metrics"}, {"params", "metrics"}) and not prev.tried
                    and prev.items() + len(op.args["metrics"]) <= MAX_BATCH):
                prev.args["metrics"] = prev.args["metrics"] + op.args["metrics"]
                self.stats["merged"] += 1
                return True
            return False
        return False

    def _drain(self, wait_s: float) -> bool:
        """Send the queue in order. A transient failure is retried with exponential backoff
        until `wait_s` has passed; then the rest waits for a later call. True: nothing waits."""
        if self._draining:  # a callback that called back in
            return not self._pending
        self._draining = True
        try:
            end = self.clock() + wait_s
            delay = FIRST_RETRY_S
            while self._pending:
                op = self._pending[0]
                try:
                    self._apply(op)
                except Exception as err:
                    if not transient(err):
                        self._refused(op, err)
                        continue
                    self._went_down(err)
                    if self.clock() >= end:
                        self._next_try = self.clock() + self._gap
                        self._gap = min(2 * self._gap, MAX_RETRY_GAP_S)
                        return False
                    self.sleep(min(delay, end - self.clock()))  # the last try at the end of the wait
                    delay = min(2 * delay, MAX_RETRY_GAP_S)
                    continue
                self._pending.popleft()
                if op.queued:
                    self.stats["replayed"] += 1
                    self.stats["replayed_metrics"] += len(op.args.get("metrics", ()))
                if op.kind == "artifact" and self._spool and Path(op.args["path"]).is_relative_to(self._spool):
                    shutil.rmtree(Path(op.args["path"]).parent, ignore_errors=True)
            self._came_back()
            return True
        finally:
            self._draining = False

    def _apply(self, op: _Op) -> None:
        a, c = op.args, self.client
        if op.kind == "create":
            tags = dict(a["tags"])
            if a["parent"]:
                tags["mlflow.parentRunId"] = self._run_id(a["parent"])
            run_id = self._find_key(a["key"]) if op.tried else None  # the earlier try may have made it
            if run_id is None:
                op.tried = True
                run_id = self._call(c.create_run, self.experiment_id, start_time=a["start_ms"], tags=tags,
                                    run_name=a["name"]).info.run_id
            self._made(op, run_id)
            return
        run_id = self._run_id(op.handle)
        op.tried = True
        if op.kind == "batch":
            self._call(c.log_batch, run_id, metrics=a.get("metrics", ()), params=a.get("params", ()),
                       tags=a.get("tags", ()))
        elif op.kind == "terminate":
            self._call(c.set_terminated, run_id, a["status"], end_time=a["end_ms"])
        elif op.kind == "status":
            self._call(c.update_run, run_id, status=a["status"])
        elif op.kind == "artifact":
            self._call(c.log_artifact, run_id, a["path"], a["artifact_path"], timeout_s=SLOW_TIMEOUT_S)
        else:
            raise ValueError(f"unknown operation {op.kind!r}")

    def _made(self, op: _Op, run_id: str) -> None:
        self._ids[op.handle] = run_id
        self._creating.discard(op.handle)
        if op.queued:  # the caller holds the placeholder
            self.stats["late_runs"] += 1
            for callback in self._callbacks:
                try:
                    callback(op.handle, run_id)
                except Exception:  # one caller's bookkeeping must not stop the queue
                    log.exception("on_run_created callback failed for %s -> %s", op.handle, run_id)

    def _run_id(self, run_id: str) -> str:
        """The MLflow id of a run as callers name it. A placeholder this tracker did not make
        (one in an earlier execution's runs.json or trial records) is looked up by its key."""
        if not is_placeholder(run_id) or run_id in self._ids:
            return self._ids.get(run_id, run_id)
        if run_id in self._creating:
            raise _NotYet(run_id)
        if run_id not in self._unmade:
            found = self._find_key(run_id[len(PLACEHOLDER):])
            if found is not None:
                self._ids[run_id] = found
                return found
            self._unmade.add(run_id)
        raise _Unmade(f"MLflow never made the run {run_id}")

    def _find_key(self, key: str) -> str | None:
        experiments = [self.experiment_id] if self.experiment_id is not None else \
            [e.experiment_id for e in self._call(self.client.search_experiments, timeout_s=SLOW_TIMEOUT_S)]
        found = self._call(self.client.search_runs, experiments, f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1,
                           timeout_s=SLOW_TIMEOUT_S)
        return found[0].info.run_id if found else None

    def _refused(self, op: _Op, err: Exception) -> None:
        """MLflow refused `op` (see the module: not retried). A refused batch is sent again item
        by item, once, so that one bad value does not take the others with it."""
        if not isinstance(err, (_Unmade, OSError)) and not _is_mlflow_error(err):
            self._pending.popleft()
            raise err  # a bug here, not an answer from MLflow: loud
        self._pending.popleft()
        if op.kind == "batch" and not op.split and op.items() > 1 and not isinstance(err, _Unmade):
            singles = [_Op("batch", op.handle, {k: [item]}, queued=op.queued, split=True)
                       for k in ("metrics", "params", "tags") for item in op.args.get(k, ())]
            if op.queued:
                self.stats["queued"] += len(singles) - 1
            self._pending.extendleft(reversed(singles))
            return
        if op.kind == "create":
            self._creating.discard(op.handle)
            self._unmade.add(op.handle)
        self.stats["dropped"] += 1
        if isinstance(err, _Unmade):
            if op.handle in self._unmade_warned:
                return
            self._unmade_warned.add(op.handle)
        log.warning("MLflow refused %s (%s); not retried, the study directory keeps the record", op, one_line(err))

    def _keep_copy(self, op: _Op) -> None:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="hypersweep-mlflow-"))
        src = Path(op.args["path"])
        dst = Path(tempfile.mkdtemp(dir=self._spool)) / src.name  # the name MLflow gives the artifact
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        op.args["path"] = str(dst)

    def _went_down(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = self.clock()
            self.stats["outages"] += 1
            log.warning("MLflow at %s unreachable (%s): its records wait in a queue, retried while the study goes on",
                        self.uri, one_line(err))

    def _came_back(self) -> None:
        if self._down_since is not None:
            gone = self.clock() - self._down_since
            self.stats["outage_ms"] += int(gone * 1000)
            log.warning("MLflow at %s back after %.1f s: %d queued records written so far (%d runs made late)",
                        self.uri, gone, self.stats["replayed"], self.stats["late_runs"])
            self._down_since = None
        self._gap = 1.0
        self._next_try = 0.0


def _record_of(op: _Op) -> dict[str, Any]:
    args = dict(op.args)
    for k in ("metrics", "params", "tags") if op.kind == "batch" else ():
        if k in args:
            args[k] = [[m.key, m.value, m.timestamp, m.step] if k == "metrics" else [m.key, m.value] for m in args[k]]
    return {"kind": op.kind, "handle": op.handle, "args": args}


def _op_of(record: dict[str, Any]) -> _Op:
    """An operation of an earlier tracker: a create is looked up by its key before it is
    made again (that tracker may have made it); the rest is written again as it was."""
    from mlflow.entities import Metric, Param, RunTag
    args = dict(record["args"])
    for k, entity in (("metrics", Metric), ("params", Param), ("tags", RunTag)) if record["kind"] == "batch" else ():
        if k in args:
            args[k] = [entity(*item) for item in args[k]]
    return _Op(record["kind"], record["handle"], args, tried=record["kind"] == "create")


def _is_mlflow_error(err: BaseException) -> bool:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(err, MlflowException)


def _close_at_exit(ref: "weakref.ref[Tracker]") -> None:
    tracker = ref()
    if tracker is not None and (tracker._pending or tracker._buffers):
        try:
            tracker.close()
        except Exception:  # at exit: say it, do not mask the exit status
            log.exception("MLflow at %s: records not written at exit", tracker.uri)

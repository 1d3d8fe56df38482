"""One study, one coordinator: the lease on a study directory.

A coordinator (`run`, `resume`, a submitted job's coordinator) holds the study's lease for as
long as it writes records; a second one refuses, in one line naming the holder. The lease is a
series of generations in the study directory:

    lease/000001.json   the first holder (host, pid, start, token, command) and its heartbeat
    lease/000002.json   the next holder, after the first released the study or was found stale

The holder is the newest generation. A generation file is *created* only if it does not exist
(an exclusive create: one of two coordinators that race for it wins), and afterwards rewritten
only by its holder, with a heartbeat every `HEARTBEAT_S`. What "only if it does not exist"
rests on depends on the filesystem (README, "Stopping and resuming a long study"):
- a local disk or NFS: a hard link of a finished temporary file, which fails if the name exists;
- S3 (`s3://`): a conditional PUT (`If-None-Match: *`) through boto3, with the endpoint and
  credentials of the study directory's pyarrow filesystem;
- anything else (`gs://`, fsspec filesystems): best effort: the file is written when absent,
  then read back after `SETTLE_S`; the coordinator whose token is there has the lease.

A lease is stale when its holder released it, when its heartbeat is older than the grace period
the holder recorded, or, on the holder's own host, when the holder's process is gone (so a
`resume` after a SIGKILL needs nothing more on the same machine, and waits out the grace period
from another one). A holder that finds a newer generation (its lease taken over by
`resume --break-lease`), or that has not renewed its heartbeat for half the grace period, has
lost the lease: every later write of its records raises `LeaseLost` (the guard of its StudyDir and
its Tracker), and it stops without writing more.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

from hypersweep.orchestrator.studydir import CorruptFile, Folder, StudyDir, Unwritable, _unwritable

HEARTBEAT_S = 5.0  # how often the holder renews its lease
GRACE_S = 60.0  # a heartbeat older than this (by the reader's clock) is a dead holder's
SETTLE_S = 1.0  # best-effort exclusive create: how long a written record settles before it is read back

_GENERATION = re.compile(r"^(\d{6})\.json$")


class LeaseHeld(Exception):
    """Another coordinator holds the study (or is creating it); the message is one line naming
    it. Nothing was written."""


class LeaseLost(Exception):
    """This coordinator's lease was taken over, or could not be renewed: it writes no more
    records. (An Exception, so that Ray Tune ends its loop and trials when a callback raises it,
    without saving its experiment state; callers that catch Exception let it through.)"""


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_started(pid: int) -> float | None:
    """When process `pid` of this host started (epoch seconds), None when there is none (a
    zombie counts as gone: its coordinator is dead, only its parent has not reaped it)."""
    import psutil
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Holder:
    """One generation of the lease: who holds (held) the study, and its last heartbeat."""
    generation: int
    host: str
    pid: int
    pid_started: float  # the process's start (epoch s): a reused pid is not the holder
    started: float  # when it took the lease (epoch s)
    heartbeat: float  # its last renewal (epoch s, the holder's clock)
    grace_s: float
    heartbeat_s: float  # how often it renews (a coordinator that breaks the lease waits two of these)
    token: str
    command: str
    released: bool = False
    took_over: dict[str, Any] | None = None  # the holder before it, when it was stale or broken

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Holder":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})

    def describe(self, now: float) -> str:
        """`host pid P (command) since T, last heartbeat N s ago`."""
        return (f"{self.host} pid {self.pid} ({self.command}) since {_utc(self.started)}, last heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f} s ago")

    def stale(self, now: float, here: str) -> str | None:
        """Why this holder no longer holds the study, or None while it may."""
        if self.released:
            return "released"
        if self.host == here:
            started = _process_started(self.pid)
            if started is None or abs(started - self.pid_started) > 1.0:
                return f"its process {self.pid} on {self.host} is gone"
        if now - self.heartbeat > self.grace_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (grace {self.grace_s:g} s)"
        return None


class Lease:
    """The lease of one study directory, held by this process once `acquire` succeeds; a
    thread renews it every `heartbeat_s` until `release`. `guard` is what the holder's writers
    call before each write (StudyDir, Tracker, the Tune loop): LeaseLost once it is lost.
    `host` and `clock` are this process's (tests pass another host name, or a fake clock)."""

    def __init__(self, study_dir: StudyDir, *, command: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                 grace_s: float = GRACE_S, host: str | None = None, clock: Callable[[], float] = time.time,
                 on_lost: Callable[[], None] | None = None):
        self.study_dir = study_dir
        self.folder = Folder(f"{study_dir.path}/{StudyDir.LEASE}", study_dir.fs)  # (unguarded: the lease's own writes)
        self.command = command or " ".join(["hypersweep", *sys.argv[1:]])[:300]
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.host, self.clock = host or socket.gethostname(), clock
        self.on_lost = on_lost
        self.held: Holder | None = None
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat's write and the release's, one at a time
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0
        self._beat_error: Exception | None = None

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def name(generation: int) -> str:
        return f"{generation:06d}.json"

    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.folder.list() if (m := _GENERATION.match(n)))

    def current(self) -> Holder | None:
        """The newest generation's holder (None when the study never had one)."""
        gens = self.generations()
        if not gens:
            return None
        return self._read(gens[-1])

    def _read(self, generation: int) -> Holder:
        data = self.folder.read_json(self.name(generation), kind=dict)
        try:
            return Holder.from_json(data)
        except TypeError:
            raise CorruptFile(f"{self.folder._full(self.name(generation))}: not a lease record "
                              "(resume --break-lease takes the study over)") from None

    def stale(self, holder: Holder) -> str | None:
        return holder.stale(self.clock(), self.host)

    def check_free(self) -> None:
        """LeaseHeld while a coordinator holds the study (nothing is written)."""
        holder = self.current()
        if holder is not None and self.stale(holder) is None:
            raise LeaseHeld(f"{self.study_dir} is held by another coordinator: {holder.describe(self.clock())}")

    # -- taking it -------------------------------------------------------------------------
    def acquire(self, *, new_study: bool = False, take_over: Callable[[Holder, str], bool] | None = None) -> Holder | None:
        """Hold the study; returns the holder taken over (stale, or live and given up by
        `take_over(holder, description)`), or None when there was none. `new_study`: the
        directory is being made by this coordinator, so any holder at all is another `run`.
        LeaseHeld when another coordinator holds it."""
        gens = self.generations()
        prev, why = None, None
        if gens:
            try:
                prev = self._read(gens[-1])
            except CorruptFile:
                if take_over is None or new_study:
                    raise
                why = "unreadable"
        now = self.clock()
        if gens and new_study:
            raise LeaseHeld(f"{self.study_dir} is being created by another coordinator: {prev.describe(now)}")
        if prev is not None:
            why = self.stale(prev)
            if why is None:
                description = prev.describe(now)
                if take_over is None or not take_over(prev, description):
                    raise LeaseHeld(f"{self.study_dir} is held by another coordinator: {description}; wait for it "
                                    "to end or stop it (a dead one is taken over by resume at once on its host, "
                                    f"after {prev.grace_s:g} s without a heartbeat elsewhere), or take it over with "
                                    "resume --break-lease")
                why = "broken"
        import psutil
        generation = gens[-1] + 1 if gens else 1
        record = Holder(generation, self.host, os.getpid(), psutil.Process().create_time(), now, now, self.grace_s,
                        self.heartbeat_s, secrets.token_hex(8), self.command,
                        took_over=None if not gens else {
                            "generation": gens[-1], "why": why,
                            **({"host": prev.host, "pid": prev.pid, "token": prev.token} if prev else {})})
        if not self._create(self.name(generation), record):
            theirs = self._read(generation)
            raise LeaseHeld(f"{self.study_dir} was taken at the same moment by another coordinator: "
                            f"{theirs.describe(self.clock())}")
        self.held, self._last_beat = record, now
        self._thread = threading.Thread(target=self._beat_loop, name="hypersweep-lease", daemon=True)
        self._thread.start()
        if why == "broken" and prev is not None:  # it stops at its next heartbeat: let it, before writing
            try:
                time.sleep(2 * prev.heartbeat_s)
            except BaseException:  # (Ctrl-C meanwhile: the study is left free, not held by no one)
                self.release()
                raise
        return prev if why is not None else None

    def _create(self, rel: str, record: Holder) -> bool:
        """Write `rel` only if it does not exist; True when this call made it."""
        data = json.dumps(asdict(record), indent=1).encode()
        fs = self.folder.fs
        full = self.folder._full(rel)
        self.folder.makedirs()
        import pyarrow.fs as pafs
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{full}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, full)  # atomic, and it fails when the name exists (NFS too)
                    return True
                except FileExistsError:
                    return False
                except OSError as err:
                    if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    return _create_exclusive(full, data)  # a filesystem without hard links (CIFS, some FUSE)
                finally:
                    os.unlink(tmp)
            except OSError as err:  # a read-only or full disk: one line, as any write of the study
                raise _unwritable(full, err) from err
        if fs.type_name == "s3":
            return _s3_put_if_absent(fs, full, data)
        # best effort: no exclusive create in this filesystem's API
        if self.folder.exists(rel):
            return False
        self.folder.write_bytes(rel, data)
        time.sleep(SETTLE_S)
        return self._read(record.generation).token == record.token

    # -- holding it ------------------------------------------------------------------------
    def guard(self) -> None:
        """LeaseLost once this coordinator no longer holds the study: its lease was taken over,
        or it has not been renewed for half the grace period (the heartbeat thread stalled, the
        machine slept, the store was away), well before another host may take it over."""
        if self.lost_reason is None and self.held is not None and self.clock() - self._last_beat > self.grace_s / 2:
            error = f" (last error: {self._beat_error})" if self._beat_error is not None else ""
            self._lose(f"the lease on {self.study_dir} was not renewed for {self.clock() - self._last_beat:.0f} s"
                       f"{error}: another coordinator may hold it by now, so this one stopped without writing more "
                       "records")
        if self.lost_reason is not None:
            raise LeaseLost(self.lost_reason)

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception as err:  # (whatever the store raises: the guard's clock still runs)
                if not self.lost:
                    self._beat_error = err

    def beat(self) -> None:
        """Renew the lease, or find it lost: taken over (a newer generation, or its own record
        holding another token), or not renewed for half the grace period."""
        with self._writing:
            held = self.held
            if held is None or self.lost or self._stop.is_set():
                return
            now = self.clock()
            try:
                theirs = self._read(held.generation + 1) if self.folder.exists(self.name(held.generation + 1)) else \
                    self._read(held.generation)
                if theirs.token != held.token:
                    self._lose(f"the lease on {self.study_dir} was taken over by {theirs.host} pid {theirs.pid} "
                               f"({theirs.command}) at {_utc(theirs.started)}: this coordinator stopped without "
                               "writing more records")
                    return
                self.held = replace(held, heartbeat=now)
                self.folder.write_json(self.name(held.generation), asdict(self.held))
                self._last_beat = now
            except (OSError, CorruptFile) as err:  # the store is away: the lease holds for half the grace period
                self._beat_error = err
            with contextlib.suppress(LeaseLost):
                self.guard()  # (marks it lost when it is)

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason  # (said once, by whoever catches the LeaseLost it raises)
        if self.on_lost is not None:
            self.on_lost()

    def release(self) -> None:
        """End the heartbeat; a lease still held is marked released (the next coordinator takes
        it at once). A store that refuses the write leaves the lease to go stale."""
        self._stop.set()
        with self._writing:  # (after a heartbeat under way, never before it)
            held, self.held = self.held, None
            if held is None or self.lost:
                return
            with contextlib.suppress(OSError, CorruptFile):
                if not self.folder.exists(self.name(held.generation + 1)):
                    self.folder.write_json(self.name(held.generation),
                                           asdict(replace(held, heartbeat=self.clock(), released=True)))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _create_exclusive(full: str, data: bytes) -> bool:
    """O_CREAT | O_EXCL: atomic too, but a reader may see the file before its bytes."""
    try:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _s3_put_if_absent(fs, full: str, data: bytes) -> bool:
    """A conditional PUT (If-None-Match: *) of `data` at `full` (bucket/key) on the S3 endpoint
    of the pyarrow S3FileSystem `fs`; False when the key exists (HTTP 412)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from hypersweep.orchestrator.tracking import one_line
    opts = fs.__reduce__()[1][0]  # the filesystem's own settings: endpoint, region, keys
    endpoint = opts.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=opts.get("region") or None,
                          aws_access_key_id=opts.get("access_key") or None,
                          aws_secret_access_key=opts.get("secret_key") or None,
                          aws_session_token=opts.get("session_token") or None)
    bucket, _, key = full.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except BotoCoreError as e:  # no credentials, no endpoint, a botocore without conditional writes
        raise Unwritable(errno.EIO, f"cannot write s3://{full}: {one_line(e)}") from None
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412 or \
                e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise Unwritable(errno.EIO, f"cannot write s3://{full}: {one_line(e)}") from None
    return True

"""One study, one coordinator: the lease on a study directory, on a local path, a `file://` URI,
a filesystem without an exclusive create (a fake object store) and a real S3 endpoint (moto's
server on loopback, through pyarrow's S3FileSystem and a conditional PUT)."""
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from hypersweep.orchestrator.lease import Lease, LeaseHeld, LeaseLost
from hypersweep.orchestrator.studydir import CorruptFile, StudyDir
from hypersweep.orchestrator.tracking import Tracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's standalone S3 server on loopback, with a bucket."""
    pytest.importorskip("moto.server")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="test", secret_key="test", region="us-east-1",
                           allow_bucket_creation=True)
    end = time.monotonic() + 30
    while True:
        try:
            fs.create_dir("studies")
            break
        except OSError:
            if time.monotonic() > end or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield fs
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(params=["path", "file-uri", "fake-object-store", "s3"])
def study_dir(request, tmp_path):
    if request.param == "path":
        return StudyDir(tmp_path / "s")
    if request.param == "file-uri":
        return StudyDir(f"file://{tmp_path}/s")
    if request.param == "fake-object-store":  # no exclusive create in its API: written, then read back
        import fsspec
        from fsspec.implementations.memory import MemoryFileSystem
        MemoryFileSystem.store.clear()
        return StudyDir("/studies/s", pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory"))))
    fs = request.getfixturevalue("s3_endpoint")
    return StudyDir(f"studies/{request.node.name.replace('[', '-').rstrip(']')}-{time.monotonic_ns()}", fs)


def _lease(study_dir, **kw) -> Lease:
    return Lease(StudyDir(study_dir.path, study_dir.fs), command="hypersweep test", **kw)


def test_a_second_coordinator_is_refused_in_one_line_naming_the_holder(study_dir):
    first = _lease(study_dir)
    assert first.acquire(new_study=True) is None
    try:
        for second in (_lease(study_dir), _lease(study_dir, host="elsewhere")):  # this process; another host
            with pytest.raises(LeaseHeld) as err:
                second.acquire()
            [line] = str(err.value).splitlines()
            assert f"held by another coordinator: {first.host} pid {first.held.pid} (hypersweep test) since " in line
            assert re.search(r"last heartbeat [01] s ago", line) and "--break-lease" in line
            with pytest.raises(LeaseHeld):
                second.check_free()
        with pytest.raises(LeaseHeld, match="being created by another coordinator"):
            _lease(study_dir).acquire(new_study=True)
        assert _lease(study_dir).generations() == [1]  # the refused wrote nothing
    finally:
        first.release()
    # released: the next one takes it at once, and says whose it was
    nxt = _lease(study_dir)
    prev = nxt.acquire()
    assert prev.generation == 1 and prev.released and nxt.held.took_over["why"] == "released"
    nxt.release()


def test_exactly_one_of_coordinators_racing_for_a_new_study_wins(study_dir):
    leases = [_lease(study_dir) for _ in range(4)]
    start, outcomes = threading.Barrier(len(leases)), []

    def race(lease):
        start.wait()
        try:
            lease.acquire(new_study=True)
            outcomes.append("won")
        except LeaseHeld as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes.count("won") == 1, outcomes
    assert all("another coordinator" in o for o in outcomes if o != "won")
    [winner] = [lease for lease in leases if lease.held is not None]
    assert _lease(study_dir).current().token == winner.held.token
    winner.release()


def test_a_dead_holder_is_taken_over_at_once_on_its_host(study_dir):
    dead = subprocess.run([sys.executable, "-c", "import os, psutil; print(os.getpid(), "
                           "psutil.Process().create_time())"], capture_output=True, text=True, check=True)
    pid, started = dead.stdout.split()
    first = _lease(study_dir)
    first.acquire(new_study=True)
    first._stop.set()  # (no more heartbeats; its record names a process that has ended)
    record = {**json.loads(first.folder.read_text("000001.json")), "pid": int(pid), "pid_started": float(started)}
    first.folder.write_json("000001.json", record)
    taker = _lease(study_dir)
    assert taker.acquire().pid == int(pid)
    assert taker.held.took_over == {"generation": 1, "why": f"its process {pid} on {taker.host} is gone",
                                    "host": taker.host, "pid": int(pid), "token": record["token"]}
    taker._stop.set()


def test_a_foreign_holder_is_stale_only_after_its_grace_period(study_dir):
    now = [1_000_000.0]
    clock = lambda: now[0]  # noqa: E731
    holder = _lease(study_dir, host="node-a", clock=clock, grace_s=60)
    holder.acquire(new_study=True)
    holder._stop.set()
    here = _lease(study_dir, host="node-b", clock=clock)
    now[0] += 59
    with pytest.raises(LeaseHeld, match="node-a pid .* last heartbeat 59 s ago"):
        here.acquire()
    now[0] += 2
    prev = here.acquire()
    assert prev.host == "node-a" and here.held.took_over["why"] == "no heartbeat for 61 s (grace 60 s)"
    here._stop.set()


class _Client:
    """What the Tracker writes through (an MlflowClient's log_batch), kept."""
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append((run_id, list(metrics)))


def test_a_broken_lease_stops_its_holder_and_its_writers(study_dir):
    lost = threading.Event()
    holder = _lease(study_dir, heartbeat_s=0.2, on_lost=lost.set)
    holder.acquire(new_study=True)
    sd = StudyDir(study_dir.path, study_dir.fs)
    sd.guard = holder.guard
    client = _Client()
    tracker = Tracker("sqlite:///unused.db", None, client=client)
    tracker.guard = holder.guard
    tracker.log_metrics("run-1", {"x": 0.5}, 1)
    tracker.flush()
    sd.write_text("before.txt", "mine")

    asked = []
    thief = _lease(study_dir, heartbeat_s=0.2)
    t0 = time.monotonic()
    prev = thief.acquire(take_over=lambda h, description: asked.append(description) or True)
    assert time.monotonic() - t0 >= 2 * 0.2  # it let the holder see the new generation first
    assert prev.token == holder.held.token and thief.held.took_over["why"] == "broken"
    assert len(asked) == 1 and "last heartbeat" in asked[0]
    assert lost.wait(5), "the old holder did not notice"
    assert "was taken over by" in holder.lost_reason and thief.host in holder.lost_reason

    with pytest.raises(LeaseLost):
        sd.write_text("after.txt", "not mine any more")
    with pytest.raises(LeaseLost):
        sd.append_journal("a", 0, [{"trial_id": "t", "step": 1}])
    tracker.log_metrics("run-1", {"x": 1.0}, 2)
    with pytest.raises(LeaseLost):
        tracker.flush()
    tracker.log_metrics("run-1", {"x": 2.0}, 3)
    tracker.close()  # drops what waits, writes nothing
    assert [(r, [m.step for m in ms]) for r, ms in client.batches] == [("run-1", [1])]
    assert not sd.exists("after.txt") and sd.read_text("before.txt") == "mine"
    holder.release()  # a lost lease is not released: the thief's generation stays the holder
    assert _lease(study_dir).current().token == thief.held.token
    thief.release()

    # a take-over the user declines writes nothing
    again = _lease(study_dir)
    again.acquire()
    with pytest.raises(LeaseHeld):
        _lease(study_dir).acquire(take_over=lambda h, d: False)
    assert _lease(study_dir).generations()[-1] == again.held.generation
    again.release()


def test_a_holder_that_cannot_renew_for_half_its_grace_period_stops(tmp_path):
    now = [1_000_000.0]
    lost = threading.Event()
    # (its thread would beat once an hour: beats are driven by hand below)
    holder = Lease(StudyDir(tmp_path / "s"), heartbeat_s=3600, grace_s=60, clock=lambda: now[0], on_lost=lost.set)
    holder.acquire(new_study=True)

    def refuse(*args, **kwargs):
        raise OSError(5, "Input/output error")

    holder.folder.write_json = refuse
    now[0] += 20
    holder.beat()
    holder.guard()  # within half the grace period the lease holds
    assert not holder.lost
    now[0] += 11  # no heartbeat thread needed: the guard itself looks at the time
    with pytest.raises(LeaseLost, match="was not renewed for 31 s"):
        holder.guard()
    assert lost.is_set() and "Input/output error" in holder.lost_reason
    holder.release()


def test_an_unreadable_lease_record_is_one_line_and_only_broken_on_purpose(tmp_path):
    sd = StudyDir(tmp_path / "s")
    sd.write_text("lease/000001.json", "{not json")
    with pytest.raises(CorruptFile) as err:
        Lease(sd).acquire()
    assert len(str(err.value).splitlines()) == 1 and "000001.json" in str(err.value)
    lease = Lease(sd)
    assert lease.acquire(take_over=lambda h, d: True) is None
    assert lease.held.generation == 2 and lease.held.took_over == {"generation": 1, "why": "unreadable"}
    lease.release()

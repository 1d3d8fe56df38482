"""A study directory that stops taking writes (disk full, quota, read-only): the study stops with
one clear line, nothing already written is cut or lost, and `resume` finishes it once there is
room again.

The whole study runs on a small tmpfs that the test fills in the middle of a searched arm (a
real ENOSPC for the coordinator and for Ray Tune alike); where this machine cannot mount one,
that test is skipped and the writes' own behaviour is still checked on a faulty filesystem."""
import errno
import json
import os
import pickle
import signal
import subprocess
import time
import uuid

import pyarrow.fs as pafs
import pytest
import yaml

from hypersweep.orchestrator.studydir import StudyDir, Unwritable
from tests.test_resume import STUDY, _check_finished_study, _cli, _finish, _journal, _kill_group, _running, _wait_for


class FullAfter(pafs.PyFileSystem):
    """A local filesystem whose writes fail with ENOSPC once `full` is set."""


class _Handler(pafs.FileSystemHandler):
    def __init__(self, state: dict):
        self.local, self.state = pafs.LocalFileSystem(), state

    def _gate(self):
        if self.state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "full-after"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self._gate()
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        stream = self.local.open_output_stream(path)
        if self.state["full"]:
            stream.write(b'{"cut')  # a write that got part of the way
            stream.close()
            self._gate()
        return stream

    def open_append_stream(self, path, metadata):
        stream = self.local.open_append_stream(path)
        if self.state["full"]:
            stream.write(b'{"cut')
            stream.close()
            self._gate()
        return stream


def test_a_failed_write_keeps_the_old_file_and_a_cut_journal_line_is_mended(tmp_path):
    state = {"full": False}
    sd = StudyDir(str(tmp_path / "sd"), pafs.PyFileSystem(_Handler(state)))
    sd.create("name: x\n")
    arms = {"a/seed0": {"status": "running", "wall_time_used_s": 1.0}}
    sd.write_json(StudyDir.ARMS, arms)
    row = {"trial_id": "t1", "step": 1, "val_loss": 0.5}
    sd.append_journal("a", 0, [row])
    state["full"] = True
    with pytest.raises(Unwritable, match=r"cannot write .*arms\.json: No space left on device") as err:
        sd.write_json(StudyDir.ARMS, {"a/seed0": {"status": "done", "wall_time_used_s": 2.0}})
    assert err.value.errno == errno.ENOSPC
    assert sd.arms() == arms and not [p for p in os.listdir(tmp_path / "sd") if p.endswith(".tmp")]
    with pytest.raises(Unwritable, match="No space left on device"):
        sd.append_journal("a", 0, [{**row, "step": 2}])
    assert sd.read_journal("a", 0) == [row]  # the cut line is not a report
    state["full"] = False
    sd.mend_journal("a", 0)  # what a resumed arm does first: the next line starts on its own
    sd.append_journal("a", 0, [{**row, "step": 2}])
    assert [r["step"] for r in sd.read_journal("a", 0)] == [1, 2]
    with pytest.raises(Unwritable, match="cannot write"):
        StudyDir(str(tmp_path / "sd" / "study.yaml" / "below")).create("name: x\n")  # a file in the way


def test_run_into_a_study_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (tmp_path / "file").write_text("in the way")
    r = subprocess.run(["hypersweep", "run", str(tmp_path / "study.yaml"), "--study-dir", str(tmp_path / "file" / "sd"),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-live"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"hypersweep: error: --study-dir {tmp_path / 'file' / 'sd'}: cannot write"), line


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB tmpfs of its own, or a skip where this machine cannot mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the faulty-filesystem tests cover the writes")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk) -> "os.PathLike":
    """Fill the disk to the last byte; returns the filler file."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    for size in (1 << 16, 1 << 12, 1 << 8, 1):  # the last pages too
        try:
            with open(filler, "ab") as f:
                while True:
                    f.write(b"\0" * size)
                    f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow  # (~2 min; the write failures it meets are each tested on a faulty filesystem above)
def test_a_full_disk_stops_the_study_and_resume_finishes_it(tmp_path, small_disk):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    sd, uri = small_disk / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's store is elsewhere
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        _wait_for(lambda: _running(sd, "rand/seed0") and len(_journal(sd, "rand", 0)) >= 2, 120, run)
        filler = _fill(small_disk)
        t0 = time.monotonic()
        out = _finish(run, timeout=120)
        stop_s = time.monotonic() - t0
    finally:
        _kill_group(run)
    lines = [line for line in out.splitlines() if line.startswith("hypersweep:")]
    assert run.returncode == 1, out
    assert lines == [f"hypersweep: error: the study directory stopped taking writes (cannot write {sd}/"
                     + lines[0].split(f"cannot write {sd}/", 1)[1]], out
    assert "No space left on device" in lines[0] and f"hypersweep resume {sd}" in lines[0]
    print(f"\nstopped {stop_s:.1f} s after the disk filled")
    arms = json.loads((sd / "arms.json").read_text())  # the last one written, whole
    assert arms["rand/seed0"]["status"] in ("running", "interrupted") and "rand/seed1" not in arms
    before = {(arm, k): _journal(sd, arm, k) for arm in ("fixed", "rand") for k in (0, 1)}

    os.unlink(filler)
    resume = _cli("resume", str(sd), "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    _check_finished_study(sd, uri, before, restored=False)  # (Tune's last checkpoints may not have made it)
    assert not list(sd.rglob("*.tmp"))
    fresh = (sd / "tune" / "rand-seed0.attempt2").is_dir()
    print("the arm's Tune state:", "unreadable, a fresh experiment ran" if fresh else "restored")
    assert fresh == ("cannot be restored" in out), out


def test_a_tune_state_cut_by_a_full_disk_is_told_apart(tmp_path):
    from hypersweep.orchestrator.studydir import Folder
    from hypersweep.orchestrator.tune_run import unreadable_state
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment_state-2026-11-23_10-00-00.json").write_text('{"trials": []}')
    (exp / "experiment_state-2026-11-23_10-00-05.json").write_text('{"trials": [')  # the newest: cut
    (exp / "tuner.pkl").write_bytes(b"\x80\x04\x95")
    assert unreadable_state(Folder(exp)) == "experiment_state-2026-11-23_10-00-05.json: not valid JSON"
    (exp / "experiment_state-2026-11-23_10-00-05.json").write_text('{"trials": []}')
    assert unreadable_state(Folder(exp)) == "tuner.pkl: not a whole pickle"  # read by its opcodes, never loaded
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {}}))
    assert unreadable_state(Folder(exp)) is None


@pytest.mark.slow
def test_sigterm_during_concurrent_arms_stops_them_and_resume_finishes(tmp_path):
    """With the concurrent schedule the arms' Tune experiments run in Ray tasks: a stop ends
    them at once (as a crash would, each restorable), not at the end of their budgets."""
    study = {**STUDY, "budget": {**STUDY["budget"], "schedule": "concurrent"}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        _wait_for(lambda: _running(sd, "rand/seed0") and len(_journal(sd, "rand", 0)) >= 2, 120, run)
        t0 = time.monotonic()
        os.kill(run.pid, signal.SIGTERM)
        out = _finish(run, timeout=120)
        stop_s = time.monotonic() - t0
    finally:
        _kill_group(run)
    assert run.returncode == 130, out
    print(f"\nstopped {stop_s:.1f} s after SIGTERM")
    # the searched arm did not run out its budget (the fixed one may have ended before: 2 steps)
    arms = json.loads((sd / "arms.json").read_text())
    assert arms["rand/seed0"]["status"] == "interrupted", arms
    assert arms["fixed/seed0"]["status"] in ("interrupted", "done"), arms
    before = {(arm, k): _journal(sd, arm, k) for arm in ("fixed", "rand") for k in (0, 1)}
    resume = _cli("resume", str(sd), "--no-live")
    out = _finish(resume)
    assert resume.returncode == 0, out
    _check_finished_study(sd, uri, before, restored=False)

"""Nothing in a study directory runs as code: Tune's state is restored only from the copy this
user's coordinator signed (orchestrator/trust.py), and the signing key is the owner's alone."""
import json
import os
import pickle
import stat

import pytest

from hypersweep.orchestrator.studydir import StudyDir
from hypersweep.orchestrator.trust import (Sealer, UntrustedFile, check_study, parses, restore_signed, study_key,
                                           verified_files)
from hypersweep.workers.base import DICT_CHECKPOINT


class Planted:
    """A pickle that runs code when loaded: it creates its marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def key(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSWEEP_KEY_FILE", str(tmp_path / "keys" / "study.key"))
    return study_key()


def test_the_key_is_made_on_first_use_for_its_owner_only(tmp_path, key):
    path = tmp_path / "keys" / "study.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert study_key() == key and len(key) == 32  # the same key from then on
    path.chmod(0o644)
    with pytest.raises(UntrustedFile, match=f"readable by other users .*chmod 600 {path}"):
        study_key()
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(UntrustedFile, match="not a hypersweep key"):
        study_key()


def test_a_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HYPERSWEEP_KEY", "ab" * 32)  # a Kubernetes Secret, say
    assert study_key() == bytes.fromhex("ab" * 32)
    monkeypatch.setenv("HYPERSWEEP_KEY", "abcd")
    with pytest.raises(UntrustedFile, match="HYPERSWEEP_KEY: not a hypersweep key"):
        study_key()


STATE = "experiment_state-2026-12-04_10-00-00.json"
SEARCH = "basic-variant-state-2026-12-04_10-00-00.json"


def _experiment(sd: StudyDir, tmp_path, name="rand-seed0"):
    """An experiment as Tune leaves it: tuner.pkl, and state files it saves in its staging folder
    on the driver and copies to the study directory."""
    live, staging = sd.sub(f"tune/{name}"), tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    live.write_bytes("tuner.pkl", pickle.dumps({"param_space": {"lr": 0.1}}))
    live.write_text(".validate_storage_marker", "")
    live.write_text("t1/trial.json", "{}")
    sealer = Sealer(sd, name, study_key())
    sealer.seal_tuner()
    sealer.staging = str(staging)
    _save(live, staging, STATE, json.dumps({"trial_data": [], "stats": {}}).encode())
    _save(live, staging, SEARCH, pickle.dumps({"counter": 3}))
    return live, staging, sealer


def _save(live, staging, name, data: bytes):
    """What Tune does every 2 s: save to its staging folder, copy to the study directory."""
    (staging / name).write_bytes(data)
    live.write_bytes(name, data)


def test_a_resume_reads_only_what_was_signed_and_nothing_planted_runs(tmp_path, key):
    sd = StudyDir(tmp_path / "sd")
    live, staging, sealer = _experiment(sd, tmp_path)
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Planted(marker))
    sealer.seal()
    live.write_bytes("search_gen_state-2099-01-01_00-00-00.json", evil)  # planted while the study runs:
    _save(live, staging, STATE, json.dumps({"trial_data": ["t1"], "stats": {}}).encode())
    sealer.seal()  # ... never signed: only what this Tune staged is
    assert sorted(verified_files(sd, "rand-seed0", key)) == [SEARCH, STATE, "tuner.pkl"]
    # the coordinator dies after one more save it had no time to sign
    _save(live, staging, STATE, json.dumps({"trial_data": ["t1", "t2"]}).encode())
    live.write_bytes("t1/error.pkl", evil)  # and someone plants a failed trial's exception, a dict checkpoint
    live.write_bytes(f"t1/checkpoint_000002/{DICT_CHECKPOINT}", evil)
    live.write_bytes("t1/checkpoint_000002/state.pt", b"weights")
    check_study(sd, key)  # tuner.pkl untouched: the study may resume
    files, set_aside = restore_signed(sd, "rand-seed0", key)
    assert set_aside == ["search_gen_state-2099-01-01_00-00-00.json", STATE, "t1/error.pkl",
                         f"t1/checkpoint_000002/{DICT_CHECKPOINT}"]
    assert sorted(live.list()) == [".validate_storage_marker", SEARCH, STATE, "tuner.pkl"]
    assert json.loads(live.read_text(STATE))["trial_data"] == ["t1"] and files[STATE] == live.read_bytes(STATE)
    assert live.is_file("t1/trial.json") and live.is_file("t1/checkpoint_000002/state.pt")
    assert not marker.exists()

    # the attack of the issue: a planted tuner.pkl is refused in one line, before anything is loaded
    live.write_bytes("tuner.pkl", evil)
    with pytest.raises(UntrustedFile) as err:
        check_study(sd, key)
    [line] = str(err.value).splitlines()
    assert line.startswith(f"{sd}/tune/rand-seed0/tuner.pkl: not the file") and "--trust-study-dir" in line
    assert not marker.exists()

    # a later execution signs on top of what it restored (its own staging folder)
    again = Sealer(sd, "rand-seed0", key, carried=files)
    again.staging = str(tmp_path / "staging2")
    (tmp_path / "staging2").mkdir()
    _save(live, tmp_path / "staging2", "experiment_state-2026-12-04_11-00-00.json", b'{"trial_data": ["t1"]}')
    again.seal()
    assert sorted(verified_files(sd, "rand-seed0", key)) == [SEARCH, STATE, "experiment_state-2026-12-04_11-00-00.json",
                                                             "tuner.pkl"]


def test_a_forged_or_edited_signed_copy_is_refused(tmp_path, key, monkeypatch):
    sd = StudyDir(tmp_path / "sd")
    _, _, sealer = _experiment(sd, tmp_path)
    sealer.seal()
    signed = sd.sub("tune-signed/rand-seed0")
    [blob] = [n for n in signed.list() if n.endswith("-tuner.pkl")]
    original = signed.read_bytes(blob)
    signed.write_bytes(blob, pickle.dumps(Planted(tmp_path / "PWNED")))
    with pytest.raises(UntrustedFile, match=f"{blob}: not the file that was signed"):
        restore_signed(sd, "rand-seed0", key)
    signed.write_bytes(blob, original)
    # a manifest signed with someone else's key (an attacker can sign with their own)
    monkeypatch.setenv("HYPERSWEEP_KEY_FILE", str(tmp_path / "other.key"))
    forger = Sealer(sd, "rand-seed0", study_key())
    forger.seal_tuner()
    with pytest.raises(UntrustedFile, match="its signature does not match this user's key"):
        check_study(sd, key)
    assert not (tmp_path / "PWNED").exists()


def test_a_file_being_written_is_not_signed_until_it_is_whole(tmp_path, key):
    sd = StudyDir(tmp_path / "sd")
    live, staging, sealer = _experiment(sd, tmp_path)
    sealer.seal()
    whole = pickle.dumps({"counter": 4})
    (staging / SEARCH).write_bytes(whole[:-3])  # cut mid-write
    sealer.seal()
    assert pickle.loads(verified_files(sd, "rand-seed0", key)[SEARCH]) == {"counter": 3}
    (staging / SEARCH).write_bytes(whole)
    sealer.seal()
    assert verified_files(sd, "rand-seed0", key)[SEARCH] == whole
    assert len(sd.sub("tune-signed/rand-seed0").list()) == 4  # old copies removed: 3 files and the manifest


def test_pickles_are_checked_by_their_opcodes_without_running(tmp_path):
    evil = pickle.dumps(Planted(tmp_path / "PWNED"))
    assert parses("tuner.pkl", evil) and not parses("tuner.pkl", evil[:-1])
    assert parses("a.json", b'{"x": 1}') and not parses("a.json", b'{"x": ')
    assert not (tmp_path / "PWNED").exists()

"""A study directory is data: nothing in it runs as code unless this user's coordinator wrote it.

Ray Tune keeps its experiment state in pickles (tuner.pkl, the search algorithm's state) and in
JSON that holds pickles (experiment_state-*.json: each trial's config and storage, hex-encoded
cloudpickle), and pickles each failed trial's exception (error.pkl). `Tuner.restore` unpickles
them, so whoever can write a study directory (a shared folder, a bucket) could run code as
whoever resumes it. hypersweep therefore restores a Tune experiment only from a *signed copy*:

    tune-signed/<experiment>/manifest.json       file name -> SHA-256, and an HMAC-SHA256 of that
    tune-signed/<experiment>/<sha256>-<name>     the copy of each of the experiment's top files

The coordinator (or the Ray task running an arm's Tune loop, on the coordinator's node) copies
what its Tune wrote: tuner.pkl when the Tuner is built, then the state files Tune saves first
in its staging folder on the driver (looked at after every step of its loop, and at its end), only
files that parse (JSON, or a pickle read by `pickletools`, which runs nothing); the files of
earlier executions are carried over from their verified copy. It signs the manifest with this
user's key
(`key_file()`: made on first use, readable by its owner only; on a cluster the head gets the
same file, as Ray's token). `resume` verifies every manifest before anything else (one line,
exit 2, when one fails), then puts the verified copies in place of the experiment's files,
removing the rest (files newer than the last copy, or planted), every error.pkl and every
_dict_checkpoint.pkl, so Tune reads only what this user's coordinator wrote (a trial refuses a
_dict_checkpoint.pkl that appears later, workers/base.py). An experiment with no signed copy (a study from
before this, or a coordinator killed in its first seconds) is not restored: the arm runs the rest
of its budget in a fresh Tune experiment. `--trust-study-dir` skips all of this.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickletools
import secrets
from datetime import datetime, timezone
from pathlib import Path

from hypersweep.orchestrator.studydir import Folder, StudyDir
from hypersweep.workers.base import DICT_CHECKPOINT

KEY_ENV = "HYPERSWEEP_KEY_FILE"
KEY_VALUE_ENV = "HYPERSWEEP_KEY"  # the key itself (hex), e.g. from a Kubernetes Secret; before the file
MANIFEST = "manifest.json"
_NOT_STATE = {".validate_storage_marker"}  # Tune's empty marker of a writable storage


class UntrustedFile(Exception):
    """A file of a study directory that is not what this user's coordinator wrote (or a key
    that cannot be used); the message is one line naming it."""


_OVERRIDE = "; nothing was loaded (resume --trust-study-dir loads the study directory's files as they are)"


def key_file() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "hypersweep" / "study.key")


def study_key() -> bytes:
    """This user's signing key, made on first use (0600 in a 0700 folder). UntrustedFile when
    it is readable by others or not this user's (anyone who reads it can sign a pickle)."""
    if os.environ.get(KEY_VALUE_ENV):
        try:
            key = bytes.fromhex(os.environ[KEY_VALUE_ENV].strip())
        except ValueError:
            key = b""
        if len(key) < 16:
            raise UntrustedFile(f"{KEY_VALUE_ENV}: not a hypersweep key (64 hex digits)")
        return key
    path = key_file()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another coordinator made it at the same moment
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise UntrustedFile(f"{path}: the key that signs study state cannot be read ({e.strerror}); set "
                            f"{KEY_ENV} to this user's key file") from None
    if st.st_mode & 0o077:
        raise UntrustedFile(f"{path}: the key that signs study state is readable by other users (mode "
                            f"{st.st_mode & 0o777:o}); make it the owner's only: chmod 600 {path}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UntrustedFile(f"{path}: the key that signs study state belongs to another user")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise UntrustedFile(f"{path}: not a hypersweep key (64 hex digits)")
    return key


def _sign(key: bytes, files: dict[str, str], experiment: str) -> str:
    body = json.dumps({"experiment": experiment, "files": files}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def parses(name: str, data: bytes) -> bool:
    """Whether a Tune state file is whole: JSON that loads, or a pickle whose opcodes read to
    its STOP (pickletools decodes without running anything)."""
    if data[:1] == b"\x80":
        try:
            for _ in pickletools.genops(io.BytesIO(data)):
                pass
            return True
        except Exception:  # a cut file: ValueError at the end of the data
            return False
    try:
        json.loads(data)
        return True
    except ValueError:
        return not name.endswith((".json", ".pkl")) and bool(data)


class Sealer:
    """The signed copy of one Tune experiment's state (see the module docstring). It signs
    only what this process's Tune wrote: `tuner.pkl` when the Tuner is built, and the state
    files Tune saves first into its staging folder on the driver (a local folder the study
    directory's other writers cannot reach) before it copies them to the study directory; the
    files of earlier executions come from their verified signed copy (`carried`)."""

    def __init__(self, study_dir: StudyDir, experiment: str, key: bytes, carried: dict[str, bytes] | None = None):
        self.experiment, self.key = experiment, key
        self.live = study_dir.sub(f"{StudyDir.TUNE}/{experiment}")
        self.signed = study_dir.sub(f"{StudyDir.SIGNED}/{experiment}")
        self.staging: str | None = None  # Tune's driver staging folder, once a trial names it
        self._files = {name: hashlib.sha256(data).hexdigest() for name, data in (carried or {}).items()}
        self._seen: dict[str, tuple[int, int]] = {}  # staged name -> (size, mtime) when last signed

    def seal_tuner(self) -> None:
        """Sign tuner.pkl, which `Tuner(...)` has just written to the study directory."""
        self._sign({"tuner.pkl": self.live.read_bytes("tuner.pkl")})

    def seal(self) -> None:
        """Sign the state files Tune staged since the last time; a file that does not parse yet
        is taken by the next seal. Unchanged files cost a stat (a look at the folder: ~12 us),
        so this runs after every step of Tune's loop."""
        if self.staging is None or not os.path.isdir(self.staging):
            return
        staged = {}
        with os.scandir(self.staging) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False) or entry.name in _NOT_STATE:
                    continue
                stat = entry.stat(follow_symlinks=False)
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._seen.get(entry.name) == stamp:
                    continue
                data = Path(entry.path).read_bytes()
                if parses(entry.name, data):
                    staged[entry.name], self._seen[entry.name] = data, stamp
        self._sign(staged)

    def _sign(self, new: dict[str, bytes]) -> None:
        files = dict(self._files)
        for name, data in new.items():
            digest = hashlib.sha256(data).hexdigest()
            if files.get(name) != digest:
                self.signed.write_bytes(f"{digest[:16]}-{name}", data)
                files[name] = digest
        if files == self._files and self.signed.is_file(MANIFEST):
            return
        self.signed.write_json(MANIFEST, {"experiment": self.experiment, "files": files,
                                          "signed_utc": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
                                          "hmac": _sign(self.key, files, self.experiment)})
        self._files = files
        keep = {f"{d[:16]}-{n}" for n, d in files.items()} | {MANIFEST}
        for stale in set(self.signed.list()) - keep:  # copies of older versions
            self.signed.delete(stale)


def _state_names(live: Folder) -> list[str]:
    """The top-level files of a Tune experiment folder that hold its state."""
    return [name for name in live.list() if name not in _NOT_STATE]


def live_state(study_dir: StudyDir, experiment: str) -> dict[str, bytes]:
    """An experiment's state files as the study directory holds them (--trust-study-dir)."""
    live = study_dir.sub(f"{StudyDir.TUNE}/{experiment}")
    return {name: live.read_bytes(name) for name in _state_names(live)}


def has_signed_state(study_dir: StudyDir, experiment: str) -> bool:
    return study_dir.is_file(f"{StudyDir.SIGNED}/{experiment}/{MANIFEST}")


def verified_files(study_dir: StudyDir, experiment: str, key: bytes) -> dict[str, bytes] | None:
    """The signed copy of an experiment's state, verified (name -> bytes); None when it has
    none; UntrustedFile naming the file when the manifest or a copy is not what was signed."""
    signed = study_dir.sub(f"{StudyDir.SIGNED}/{experiment}")
    if not signed.is_file(MANIFEST):
        return None
    where = f"{signed}/{MANIFEST}"
    try:
        manifest = json.loads(signed.read_text(MANIFEST))
        files, mac = manifest["files"], manifest["hmac"]
        assert isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
    except Exception:
        raise UntrustedFile(f"{where}: not a manifest of signed Tune state{_OVERRIDE}") from None
    if not hmac.compare_digest(str(mac), _sign(key, files, experiment)):
        raise UntrustedFile(f"{where}: its signature does not match this user's key ({key_file()}): written "
                            f"by someone else, or signed with another key{_OVERRIDE}")
    out = {}
    for name, digest in files.items():
        blob = f"{digest[:16]}-{name}"
        data = signed.read_bytes(blob) if signed.is_file(blob) else b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise UntrustedFile(f"{signed}/{blob}: not the file that was signed{_OVERRIDE}")
        out[name] = data
    return out


def check_study(study_dir: StudyDir, key: bytes) -> None:
    """Verify every signed copy of the study's Tune state, and the experiments' tuner.pkl
    against theirs (it is written once, when the Tuner is built, and signed at once): the
    read-only check `resume` makes before it takes the study. UntrustedFile on the first
    failure."""
    for experiment in study_dir.list(StudyDir.TUNE, dirs=True):
        files = verified_files(study_dir, experiment, key)
        live = f"{StudyDir.TUNE}/{experiment}/tuner.pkl"
        if files is not None and "tuner.pkl" in files and study_dir.is_file(live) and \
                study_dir.read_bytes(live) != files["tuner.pkl"]:
            raise UntrustedFile(f"{study_dir}/{live}: not the file this study's coordinator wrote (its signed "
                                f"copy differs){_OVERRIDE}")


def restore_signed(study_dir: StudyDir, experiment: str, key: bytes) -> tuple[dict[str, bytes], list[str]] | None:
    """Put the verified signed copy of an experiment's state in place of its files. Its other
    top-level files, every trial's error.pkl (Tune's pickled exception) and every
    `_dict_checkpoint.pkl` (a pickle Tune loads before the trainable's own state.pt, which
    hypersweep never writes) are removed. Returns the verified files and the names of those it
    removed or replaced (written after the last signing, or by someone else); None when the
    experiment has no signed copy (nothing changed). UntrustedFile as `verified_files`."""
    files = verified_files(study_dir, experiment, key)
    if files is None:
        return None
    live: Folder = study_dir.sub(f"{StudyDir.TUNE}/{experiment}")
    set_aside = sorted(set(_state_names(live)) - set(files))
    for name in set_aside:
        live.delete(name)
    for name, data in files.items():
        if not live.is_file(name) or live.read_bytes(name) != data:
            if live.is_file(name):
                set_aside.append(name)
            live.write_bytes(name, data)
    for trial in live.list(dirs=True):
        pickles = [f"{trial}/error.pkl"] + [f"{trial}/{c}/{DICT_CHECKPOINT}" for c in live.list(trial, dirs=True)]
        for name in filter(live.is_file, pickles):
            live.delete(name)
            set_aside.append(name)
    return files, set_aside

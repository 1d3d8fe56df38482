"""The study directory: the one owner of its files.

Everything a study writes, and everything `compare`, `ensemble` and (later) `resume` read, goes
through `StudyDir`; no other module spells a file name of the study directory. Every write
is atomic (a temporary file moved into place), so a crash never leaves a half-written file.

Files go through a pyarrow filesystem, so the directory may be a local path, a `file://` URI,
a cloud URI pyarrow opens (`s3://`, `gs://`, ...), or any `pyarrow.fs.FileSystem` handed to
the constructor (tests use a `SubTreeFileSystem` and an fsspec one):

    study.yaml                     the resolved study
    results/<arm>__seed<k>.parquet one part per arm x seed, rewritten while it runs
    results/<arm>__seed<k>.jsonl   its journal: every report appended as it arrives
    results.parquet                all parts, consolidated
    runs.json                      arm/seed -> MLflow run ids (and the tracking URI); `code`: the
                                   code of each execution (version, commit; start, resumes)
    arms.json                      status and wall time used per arm x seed
    summary.md                     the summary table
    plots/                         hyperparameter schedules
    ensembles/<arm>-seed<k>/       ensemble tables, distilled weights (see ensembles.py)
    report.md, anytime.png         from `compare`; ensembles.md from `ensembles-report`
    tune/<arm>-seed<k>/<trial>/    Ray Tune's experiment folders, checkpoints, trial.json
    tune-signed/<arm>-seed<k>/     the signed copy of each experiment's Tune state, the only one
                                   a resume restores (see trust.py)
    lease/<generation>.json        who coordinates the study, with a heartbeat (see lease.py)
    mlflow-outbox/                 MLflow records the store did not take (only while it was
                                   away): records.json and copies of their artifacts, sent by
                                   `resume`
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pyarrow.fs as pafs

# Columns every results row has; metrics and `hp_<name>` hyperparameter columns follow.
KEY_COLUMNS = ["study_id", "arm", "method", "search", "dataset", "seed_index", "seed", "trial_id",
               "step", "arm_time_s"]


def _open(location: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, str(location).rstrip("/")
    text = str(location)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _one_type_per_column(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with every column Parquet can store: a column whose cells mix kinds (the parts of
    two methods that give one hyperparameter name a number and a text, e.g. `hidden`) holds
    their text. Missing cells stay missing."""
    mixed = []
    for column in df.columns[df.dtypes == object]:
        kinds = {type(v) for v in df[column] if not (isinstance(v, float) and v != v) and v is not None}
        if len(kinds) > 1:
            mixed.append(column)
    if not mixed:
        return df
    df = df.copy()
    for column in mixed:
        df[column] = [v if v is None or (isinstance(v, float) and v != v) else str(v) for v in df[column]]
    return df


class Unwritable(OSError):
    """A write to the study directory failed (disk full, quota, read-only, no permission): the
    study stops, with what it had written before intact (every write is atomic)."""


class CorruptFile(ValueError):
    """A file of a study directory that cannot be read as what it should be (cut, edited,
    foreign); the message is one line naming it."""


def _unwritable(full: str, err: OSError) -> Unwritable:
    reason = os.strerror(err.errno) if err.errno else str(err)
    return Unwritable(err.errno, f"cannot write {full}: {reason}")


def _plain(value: Any) -> Any:
    """JSON for numpy scalars in report rows."""
    return value.item() if hasattr(value, "item") else str(value)


class Folder:
    """A folder on a pyarrow filesystem with atomic writes; the base of `StudyDir` and of
    an ensemble's output folder."""

    def __init__(self, location: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        self.fs, self.path = _open(location, filesystem)
        # called before every write: the study's lease (orchestrator/lease.py) raises LeaseLost
        # there once this coordinator no longer holds the study. Not pickled: a Ray task that
        # gets the folder writes nothing of the coordinator's records.
        self.guard: Callable[[], None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "guard": None}

    def _writing(self) -> None:
        if self.guard is not None:
            self.guard()

    # -- where -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        """The folder as a local path, when it is one (None on other filesystems)."""
        return Path(self.path) if self.is_local else None

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.fs.type_name}://{self.path}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def _full(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def sub(self, rel: str) -> "Folder":
        folder = Folder(self._full(rel), self.fs)
        folder.guard = self.guard
        return folder

    # -- what is there ---------------------------------------------------------------------
    def _info(self, rel: str = "") -> pafs.FileInfo:
        return self.fs.get_file_info(self._full(rel))

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.Directory

    def list(self, rel: str = "", *, suffix: str = "", dirs: bool = False) -> list[str]:
        """Names (not paths) in a sub-folder, sorted: files ending in `suffix`, or folders."""
        if not self.is_dir(rel):
            return []
        want = pafs.FileType.Directory if dirs else pafs.FileType.File
        infos = self.fs.get_file_info(pafs.FileSelector(self._full(rel)))
        return sorted(i.base_name for i in infos if i.type == want and i.base_name.endswith(suffix)
                      and not i.base_name.endswith(".tmp"))

    def makedirs(self, rel: str = "") -> None:
        self._writing()
        try:
            self.fs.create_dir(self._full(rel), recursive=True)
        except OSError as err:
            raise _unwritable(self._full(rel), err) from err

    # -- reading ---------------------------------------------------------------------------
    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, at most limit + 1 of them (the caller tells "too big")."""
        with self.fs.open_input_stream(self._full(rel)) as f:
            return f.read() if limit is None else f.read(limit + 1)

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode()
        except UnicodeDecodeError as e:
            raise CorruptFile(f"{self._full(rel)}: not UTF-8 text (offset {e.start})") from None

    def read_json(self, rel: str, default: Any = None, kind: type | None = None) -> Any:
        """The JSON in `rel` (`default` when there is none); CorruptFile when it is not JSON, or
        not a `kind` (dict, list) when one is asked for."""
        if not self.is_file(rel):
            return default
        try:
            value = json.loads(self.read_text(rel))
        except ValueError as e:
            raise CorruptFile(f"{self._full(rel)}: not valid JSON ({e})") from None
        if kind is not None and not isinstance(value, kind):
            raise CorruptFile(f"{self._full(rel)}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"got {type(value).__name__}")
        return value

    def read_table(self, rel: str) -> pd.DataFrame | None:
        if not self.is_file(rel):
            return None
        try:
            return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))
        except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid (a ValueError), a cut file
            raise CorruptFile(f"{self._full(rel)}: not a readable Parquet table ({type(e).__name__})") from None

    # -- writing, atomically -----------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write to a temporary name beside the target, then move it into place: readers see
        the old file or the new one, never a half-written one."""
        self._writing()
        full = self._full(rel)
        tmp = f"{full}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.create_dir(posixpath.dirname(full), recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, full)
        except OSError as err:  # (pyarrow's errors are OSErrors, with the errno of a local one)
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise _unwritable(full, err) from err
        return full

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2))

    def write_table(self, rel: str, df: pd.DataFrame) -> str:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return self.write_bytes(rel, buf.getvalue())

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[Path]:
        """A local path to write `rel` through (matplotlib, torch.save): the file is moved
        into the folder when the block ends without an error."""
        with tempfile.TemporaryDirectory(prefix="hypersweep-") as tmp:
            local = Path(tmp) / posixpath.basename(rel)
            yield local
            self.write_bytes(rel, local.read_bytes())

    @contextlib.contextmanager
    def reading(self, rel: str = "") -> Iterator[Path]:
        """A local path holding `rel` (a file or a folder) for libraries that need one (MLflow
        artifacts): the file itself on a local filesystem, else a temporary copy."""
        if self.is_local:
            yield Path(self._full(rel))
            return
        with tempfile.TemporaryDirectory(prefix="hypersweep-") as tmp:
            local = Path(tmp) / (posixpath.basename(rel) or self.name)
            pafs.copy_files(self._full(rel), str(local), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield local

    def delete(self, rel: str) -> None:
        """A file or a folder (with what is in it), if there."""
        self._writing()
        kind = self._info(rel).type
        if kind == pafs.FileType.File:
            self.fs.delete_file(self._full(rel))
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(self._full(rel))

    def put(self, rel: str, local: Path) -> None:
        """Copy a local file or folder to `rel`, file by file (each write atomic)."""
        if local.is_dir():
            for item in sorted(local.rglob("*")):
                if item.is_file():
                    self.write_bytes(posixpath.join(rel, item.relative_to(local).as_posix()), item.read_bytes())
        else:
            self.write_bytes(rel, local.read_bytes())


class StudyDir(Folder):
    """Every file of one study directory (see the module docstring)."""

    STUDY = "study.yaml"
    PARTS = "results"
    RESULTS = "results.parquet"
    RUNS = "runs.json"
    ARMS = "arms.json"
    SUMMARY = "summary.md"
    PLOTS = "plots"
    ENSEMBLES = "ensembles"
    TUNE = "tune"
    REPORT = "report.md"
    REPORT_HTML = "report.html"
    ANYTIME = "anytime.png"
    ENSEMBLES_REPORT = "ensembles.md"
    OUTBOX = "mlflow-outbox"
    LEASE = "lease"
    SIGNED = "tune-signed"

    @property
    def study_id(self) -> str:
        return self.name

    def is_study(self) -> bool:
        return self.is_file(self.STUDY)

    def create(self, study_yaml: str) -> None:
        """Write the resolved study file into a new directory, where only the lease this
        coordinator took to create it may be; an existing study is never reused."""
        if [n for n in self.list() + self.list(dirs=True) if n != self.LEASE]:
            raise FileExistsError(f"{self} already exists")
        self.makedirs()
        self.makedirs(self.PARTS)
        self.write_text(self.STUDY, study_yaml)

    # -- the study file and the small records ------------------------------------------------
    def study_yaml(self) -> str:
        return self.read_text(self.STUDY)

    def study_dict(self, validated: bool = False) -> dict[str, Any]:
        """The study file as a mapping, read within the bounds of a study file; `validated`:
        checked as a study again. CorruptFile naming it when it is not (any more)."""
        from hypersweep.orchestrator.study import MAX_FILE_BYTES, StudyError, decode_study, load_yaml, parse_study
        source = self._full(self.STUDY)
        try:
            raw = load_yaml(decode_study(self.read_bytes(self.STUDY, MAX_FILE_BYTES), source), source)
            if validated:
                return parse_study(raw, source).model_dump(mode="python")
        except StudyError as e:
            raise CorruptFile(str(e)) from None
        if not isinstance(raw, dict):
            raise CorruptFile(f"{source}: expected a mapping of study keys, got {type(raw).__name__}")
        return raw

    def runs(self) -> dict[str, Any]:
        return self.read_json(self.RUNS, {}, kind=dict)

    def write_runs(self, runs: dict[str, Any]) -> None:
        self.write_json(self.RUNS, runs)

    def arms(self) -> dict[str, Any]:
        arms = self.read_json(self.ARMS, {}, kind=dict)
        if not all(isinstance(a, dict) and {"status", "wall_time_used_s"} <= set(a) for a in arms.values()):
            raise CorruptFile(f"{self._full(self.ARMS)}: not the arms of a study (status, wall time per arm x seed)")
        return arms

    def write_arms(self, arms: dict[str, Any]) -> None:
        self.write_json(self.ARMS, arms)

    # -- MLflow records the store did not take -----------------------------------------------
    def write_outbox(self, records: list[dict[str, Any]]) -> None:
        """Keep `records` (tracking.Tracker.unsent(), in order) in place of what was kept
        before, with a copy of each artifact they name; no records: nothing kept."""
        if not records:
            self.delete(self.OUTBOX)
            return
        kept, files = [], set()
        for record in records:
            if record["kind"] == "artifact":
                local = Path(record["args"]["path"])
                # the same queued artifact keeps its local copy across snapshots: copied once
                name = f"files/{hashlib.sha1(str(local).encode()).hexdigest()[:16]}/{local.name}"
                if not self.exists(f"{self.OUTBOX}/{name}"):
                    self.put(f"{self.OUTBOX}/{name}", local)
                files.add(name.split("/")[1])
                record = {**record, "args": {**record["args"], "path": name}}
            kept.append(record)
        self.write_text(f"{self.OUTBOX}/records.json", json.dumps(kept, default=_plain))
        for stale in set(self.list(f"{self.OUTBOX}/files", dirs=True)) - files:
            self.delete(f"{self.OUTBOX}/files/{stale}")

    def outbox(self) -> list[dict[str, Any]]:
        """The kept records, an artifact's `path` relative to the outbox (see `outbox_files`)."""
        return json.loads(self.read_text(f"{self.OUTBOX}/records.json")) if self.is_file(
            f"{self.OUTBOX}/records.json") else []

    @contextlib.contextmanager
    def outbox_files(self, records: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """The records with local paths for their artifacts, valid inside the block."""
        with self.reading(self.OUTBOX) as local:
            yield [{**r, "args": {**r["args"], "path": str(local / r["args"]["path"])}} if r["kind"] == "artifact"
                   else r for r in records]

    # -- results: one part per arm x seed, consolidated into results.parquet -----------------
    @staticmethod
    def part_name(arm: str, seed_index: int) -> str:
        return f"{StudyDir.PARTS}/{arm}__seed{seed_index}.parquet"

    def write_part(self, arm: str, seed_index: int, rows: list[dict[str, Any]]) -> str:
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=KEY_COLUMNS)
        return self.write_table(self.part_name(arm, seed_index),
                                df[KEY_COLUMNS + [c for c in df.columns if c not in KEY_COLUMNS]])

    def read_part(self, arm: str, seed_index: int) -> pd.DataFrame | None:
        return self.read_table(self.part_name(arm, seed_index))

    # -- the journal: every report appended as it arrives, the part's source on a resume ----
    @staticmethod
    def journal_name(arm: str, seed_index: int) -> str:
        return f"{StudyDir.PARTS}/{arm}__seed{seed_index}.jsonl"

    def append_journal(self, arm: str, seed_index: int, rows: list[dict[str, Any]]) -> None:
        """Append reports, one JSON line each. A report is in the journal before it is sent to
        MLflow, so a coordinator killed at any moment loses no report it had received.
        Filesystems without appends (object stores) get the journal rewritten instead."""
        if not rows:
            return
        self._writing()
        name = self.journal_name(arm, seed_index)
        data = "".join(json.dumps(row, default=_plain) + "\n" for row in rows).encode()
        full = self._full(name)
        try:
            with self.fs.open_append_stream(full) as f:
                f.write(data)
        except OSError as err:
            if err.errno:  # a local disk: full, read-only...; a line it cut is dropped when read
                raise _unwritable(full, err) from err
            self._rewrite_journal(name, data)  # an object store that has no appends
        except NotImplementedError:  # (pyarrow's ArrowNotImplementedError)
            self._rewrite_journal(name, data)

    def _rewrite_journal(self, name: str, data: bytes) -> None:
        old = self.read_bytes(name) if self.is_file(name) else b""
        self.write_bytes(name, old + data)

    def mend_journal(self, arm: str, seed_index: int) -> None:
        """Drop a last line cut by a crash or a full disk, before the journal is appended to
        again (the next report would otherwise join it, and both be lost)."""
        name = self.journal_name(arm, seed_index)
        info = self._info(name)
        if info.type != pafs.FileType.File or not info.size:
            return
        with self.fs.open_input_file(self._full(name)) as f:  # the last byte only: whole lines end in one
            f.seek(info.size - 1)
            if f.read(1) == b"\n":
                return
        data = self.read_bytes(name)
        self.write_bytes(name, data[:data.rfind(b"\n") + 1])

    def read_journal(self, arm: str, seed_index: int) -> list[dict[str, Any]]:
        """The journal's reports in arrival order, a report replayed after a restore (same
        trial and step) kept once, a line cut by a crash dropped."""
        name = self.journal_name(arm, seed_index)
        if not self.is_file(name):
            return []
        rows, seen = [], set()
        for line in self.read_text(name).splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the last line of a coordinator killed mid-write
                continue
            key = (row["trial_id"], row["step"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
        return rows

    def results(self) -> pd.DataFrame:
        """Every report so far: all parts (those of running arms included), in one table."""
        frames = [self.read_table(f"{self.PARTS}/{name}") for name in self.list(self.PARTS, suffix=".parquet")]
        frames = [f for f in frames if f is not None and not f.empty]
        # (one arm's part holds one method; parts of two methods may give a column two kinds)
        if not frames:
            return pd.DataFrame(columns=KEY_COLUMNS)
        return _one_type_per_column(pd.concat(frames, ignore_index=True))

    def consolidate(self) -> str:
        """Rewrite results.parquet from the parts."""
        return self.write_table(self.RESULTS, self.results())

    # -- folders of other writers ---------------------------------------------------------------
    def plot_name(self, arm: str, seed_index: int) -> str:
        return f"{self.PLOTS}/schedule-{arm}-seed{seed_index}.png"

    def ensemble_folder(self, arm: str, seed_index: int) -> Folder:
        return self.sub(f"{self.ENSEMBLES}/{arm}-seed{seed_index}")

    def ensemble_folders(self) -> list[Folder]:
        return [self.sub(f"{self.ENSEMBLES}/{name}") for name in self.list(self.ENSEMBLES, dirs=True)]

    def tune_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """Ray Tune's (storage_path, storage_filesystem) for this study's experiments."""
        return (self._full(self.TUNE), None) if self.is_local else (self._full(self.TUNE), self.fs)

    def tune_experiment(self, arm: str, seed_index: int, attempt: int = 1) -> str:
        """The folder of an arm x seed's Tune experiment under tune/. A later attempt is a fresh
        experiment, started when the saved state of the one before could not be restored."""
        return f"{arm}-seed{seed_index}" if attempt == 1 else f"{arm}-seed{seed_index}.attempt{attempt}"

    def tune_attempts(self, arm: str, seed_index: int) -> int:
        """The latest attempt of the arm x seed's Tune experiment (1 when there is none yet)."""
        attempt = 1
        while self.is_dir(f"{self.TUNE}/{self.tune_experiment(arm, seed_index, attempt + 1)}"):
            attempt += 1
        return attempt

    def latest_tune_experiment(self, arm: str, seed_index: int) -> str:
        return self.tune_experiment(arm, seed_index, self.tune_attempts(arm, seed_index))

    def trial_folders(self) -> list[Folder]:
        """Every trial folder under tune/ (tune/<experiment>/<trial>/)."""
        out = []
        for exp in self.list(self.TUNE, dirs=True):
            for trial in self.list(f"{self.TUNE}/{exp}", dirs=True):
                out.append(self.sub(f"{self.TUNE}/{exp}/{trial}"))
        return out


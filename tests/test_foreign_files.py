"""A study directory is data, not instructions: the files in it (runs.json, trial.json, an
ensemble's metadata, a checkpoint) never choose a server to contact, a copied directory does
not write into the original's MLflow runs, a corrupt file is one line and exit 2, and nothing
already written is overwritten."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from hypersweep.orchestrator.cli import main

STUDY = {
    "name": "foreign", "seed": 4, "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [16]},
    "arms": [{"name": "deep", "method": "sgd", "search": "fixed", "num_samples": 2, "params": {"lr": 0.05},
              "max_epochs": 4, "ensemble": {"members": 2}}],
    "budget": {"seconds": 20, "workers": 1},
    "training": {"epochs_per_step": 2, "checkpoint_every": 1},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One finished study with an ensemble, run from its own working directory, its MLflow
    database in another folder."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "work").mkdir()
    (root / "store").mkdir()
    (root / "work" / "study.yaml").write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    r = subprocess.run([sys.executable, "-m", "hypersweep.orchestrator.cli", "run", "study.yaml", "--study-dir", "sd",
                        "--tracking-uri", uri, "--no-live"], cwd=root / "work", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, uri


@pytest.fixture
def study(made, tmp_path):
    """A fresh copy of the study directory, under the same name (so it is the same study)."""
    root, uri = made
    shutil.copytree(root / "work" / "sd", tmp_path / "sd")
    return tmp_path / "sd", uri


def _invoke(*args: str):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stderr.splitlines()


def test_artifacts_go_beside_the_database_not_into_the_working_directory(made):
    root, uri = made
    assert not (root / "work" / "mlruns").exists()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("foreign")
    assert exp.artifact_location == (root / "store" / "mlartifacts").as_uri()
    [parent] = client.search_runs([exp.experiment_id], "tags.kind = 'study'")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"study.yaml", "results.parquet"}
    assert (root / "store" / "mlartifacts" / parent.info.run_id / "artifacts" / "study.yaml").is_file()


class Listener:
    """A TCP port that counts who connects to it: a planted server address."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections, self.done = 0, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.done:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.done = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def planted():
    listener = Listener()
    yield listener
    listener.close()


def _plant_runs(sd, uri):
    runs = json.loads((sd / "runs.json").read_text())
    runs["tracking_uri"] = uri
    (sd / "runs.json").write_text(json.dumps(runs))


def _interrupted(sd):
    """As if the coordinator had died in the arm: `resume` has work to do (and a store to write to)."""
    arms = json.loads((sd / "arms.json").read_text())
    arms["deep/seed0"]["status"] = "interrupted"
    (sd / "arms.json").write_text(json.dumps(arms))


def test_a_server_named_in_runs_json_is_never_contacted(study, planted, monkeypatch):
    sd, _ = study
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _plant_runs(sd, planted.uri)
    code, err = _invoke("compare", str(sd))
    assert code == 0 and any(f"--tracking-uri {planted.uri}" in line for line in err), err
    _interrupted(sd)
    code, err = _invoke("resume", str(sd), "--no-live")
    assert code == 2 and len(err) == 1 and f"records go to a server only when you name it: --tracking-uri " \
        f"{planted.uri}" in err[0], err
    assert planted.connections == 0


def test_a_server_named_in_trial_records_or_ensemble_metadata_is_never_contacted(study, planted, monkeypatch, tmp_path):
    sd, _ = study
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for trial_json in sd.glob("tune/*/*/trial.json"):
        record = json.loads(trial_json.read_text())
        trial_json.write_text(json.dumps({**record, "tracking_uri": planted.uri}))
    code, err = _invoke("ensemble", str(sd), "-k", "2", "--out", str(tmp_path / "ens"))
    assert code == 0 and any("nothing logged" in line and planted.uri in line for line in err), err

    table_path = sd / "ensembles" / "deep-seed0" / "ensemble.parquet"
    table = pq.read_table(table_path)
    meta = json.loads(table.schema.metadata[b"hypersweep"])
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           b"hypersweep": json.dumps({**meta, "tracking_uri": planted.uri}).encode()})
    pq.write_table(table, table_path)
    code, err = _invoke("distill", str(table_path), "--out", str(tmp_path / "distilled"))
    assert code == 0 and any("nothing logged" in line for line in err), err
    assert planted.connections == 0


def test_a_copied_study_directory_does_not_write_into_the_original_runs(made, tmp_path):
    root, uri = made
    copy = tmp_path / "copy-of-sd"
    shutil.copytree(root / "work" / "sd", copy)
    client = MlflowClient(uri)
    parent = json.loads((copy / "runs.json").read_text())["parent_run_id"]
    before = {a.path for a in client.list_artifacts(parent)}
    code, err = _invoke("compare", str(copy))
    assert code == 0 and any("belongs to study sd, not copy-of-sd" in line for line in err), err
    assert {a.path for a in client.list_artifacts(parent)} == before


def test_distill_never_overwrites(study, tmp_path):
    sd, _ = study
    folder = sd / "ensembles" / "deep-seed0"
    stamp = (folder / "distill.json").read_bytes()
    code, err = _invoke("distill", str(folder), "--no-mlflow")
    assert code == 2 and len(err) == 1 and "already holds a distillation" in err[0] and "--out" in err[0]
    assert (folder / "distill.json").read_bytes() == stamp
    code, _ = _invoke("distill", str(folder), "--no-mlflow", "--out", str(tmp_path / "beside"))
    assert code == 0 and (tmp_path / "beside" / "distill.json").is_file()


def test_a_dangling_symlink_is_not_a_new_study_dir(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    code, err = _invoke("run", str(tmp_path / "study.yaml"), "--study-dir", str(tmp_path / "link"), "--no-live")
    assert code == 2 and len(err) == 1 and "already exists (a symbolic link)" in err[0]
    assert not (tmp_path / "elsewhere").exists()


def _corrupt(sd, what):
    trial = sorted(sd.glob("tune/*/*_00000"))[0]
    if what == "part":
        (sd / "results" / "deep__seed0.parquet").write_bytes(b"PAR1garbage")
    elif what == "study.yaml":
        (sd / "study.yaml").write_text("name: [\n")
    elif what == "study.yaml-invalid":
        (sd / "study.yaml").write_text(yaml.safe_dump({**STUDY, "seeds": -1}))
    elif what == "arms.json":
        (sd / "arms.json").write_text('{"deep/seed0": ')
    elif what == "arms.json-list":
        (sd / "arms.json").write_text("[1, 2]")
    elif what == "runs.json":
        (sd / "runs.json").write_bytes(b"\xff\xfe")
        _interrupted(sd)
    elif what == "trial.json":
        (trial / "trial.json").write_text("{bad")
    elif what == "trial.json-keys":
        (trial / "trial.json").write_text(json.dumps({"surprise": 1}))
    elif what == "state.pt":
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {sd}/PWNED",))
        for state in trial.glob("checkpoint_*/state.pt"):
            state.write_bytes(pickle.dumps(Payload()))
    elif what == "ensemble.json":
        (sd / "ensembles" / "deep-seed0" / "ensemble.json").write_text("{x")
    elif what == "ensemble.parquet-columns":
        path = sd / "ensembles" / "deep-seed0" / "ensemble.parquet"
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["weights"]), path)


@pytest.mark.parametrize("what, command, says", [
    ("part", "compare", "deep__seed0.parquet: not a readable Parquet table"),
    ("study.yaml", "compare", "study.yaml: not valid YAML"),
    ("study.yaml-invalid", "compare", "study.yaml: seeds"),
    ("arms.json", "compare", "arms.json: not valid JSON"),
    ("arms.json-list", "compare", "arms.json: expected a JSON object, got list"),
    ("arms.json", "resume", "arms.json: not valid JSON"),
    ("runs.json", "resume", "runs.json: not UTF-8 text"),
    ("trial.json", "ensemble", "trial.json: not valid JSON"),
    ("trial.json-keys", "ensemble", "trial.json: not a trial record"),
    ("state.pt", "ensemble", "state.pt: not a checkpoint of this trial"),
    ("ensemble.json", "distill", "ensemble.json: not valid JSON"),
    ("ensemble.parquet-columns", "distill", "ensemble.parquet: not an ensemble table"),
])
def test_a_corrupt_file_is_one_line_and_exit_2(study, tmp_path, what, command, says):
    sd, _ = study
    _corrupt(sd, what)
    args = {"compare": ["compare", str(sd), "--no-mlflow"], "resume": ["resume", str(sd), "--no-live"],
            "ensemble": ["ensemble", str(sd), "-k", "2", "--out", str(tmp_path / "ens"), "--no-mlflow"],
            "distill": ["distill", str(sd / "ensembles" / "deep-seed0"), "--out", str(tmp_path / "d"),
                        "--no-mlflow"]}[command]
    code, err = _invoke(*args)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (sd / "PWNED").exists()
    assert not (tmp_path / "ens").exists() and not (tmp_path / "d").exists()  # nothing written


def test_an_oversized_study_file_in_a_study_dir_is_not_read_whole(tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "study.yaml").write_text("name: x\n" + "#" * (2 << 20))
    code, err = _invoke("resume", str(sd), "--no-live")
    assert code == 2 and err == [f"hypersweep: error: {sd}/study.yaml: larger than 1 MiB; a study file is a page of YAML"]

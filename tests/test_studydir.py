"""The study directory's one owner: the same files through any pyarrow filesystem, atomic
writes, and a whole study run into a `file://` URI."""
import json

import pandas as pd
import pyarrow.fs as pafs
import pytest

from hypersweep.orchestrator.studydir import KEY_COLUMNS, Folder, StudyDir


def _memory_fs():
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem
    MemoryFileSystem.store.clear()  # the memory store is global to the process
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))


def _row(arm, seed_index, trial, step, **metrics):
    return {"study_id": "s", "arm": arm, "method": "sgd", "search": "random", "dataset": "digits",
            "seed_index": seed_index, "seed": 7, "trial_id": trial, "step": step, "arm_time_s": float(step), **metrics}


@pytest.fixture(params=["path", "file-uri", "subtree", "fsspec-memory"])
def study_dir(request, tmp_path):
    if request.param == "path":
        return StudyDir(tmp_path / "s")
    if request.param == "file-uri":
        return StudyDir(f"file://{tmp_path}/s")
    if request.param == "subtree":
        (tmp_path / "bucket").mkdir()
        return StudyDir("studies/s", pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    return StudyDir("/studies/s", _memory_fs())


def test_every_file_round_trips_on_every_filesystem(study_dir):
    study_dir.create("name: s\nseeds: 2\n")
    assert study_dir.is_study() and study_dir.study_dict() == {"name": "s", "seeds": 2}
    with pytest.raises(FileExistsError):
        study_dir.create("name: other\n")  # never reused
    assert study_dir.study_dict()["name"] == "s"

    study_dir.write_runs({"parent_run_id": "p", "arms": {"a/seed0": "r0"}})
    study_dir.write_arms({"a/seed0": {"status": "done", "wall_time_used_s": 9.5}})
    assert study_dir.runs()["arms"] == {"a/seed0": "r0"}
    assert study_dir.arms()["a/seed0"]["wall_time_used_s"] == 9.5

    study_dir.write_part("a", 0, [_row("a", 0, "t1", 1, val_loss=0.5), _row("a", 0, "t1", 2, val_loss=0.25)])
    study_dir.write_part("a", 1, [])  # an arm that reported nothing still has its (empty) part
    study_dir.write_part("b", 0, [_row("b", 0, "t9", 1, val_loss=0.75, hp_lr=0.1)])
    assert list(study_dir.read_part("a", 0).val_loss) == [0.5, 0.25]
    assert list(study_dir.read_part("a", 0).columns[:len(KEY_COLUMNS)]) == KEY_COLUMNS
    assert study_dir.read_part("c", 0) is None
    study_dir.consolidate()
    results = study_dir.read_table(StudyDir.RESULTS)
    assert sorted(zip(results.arm, results.step)) == [("a", 1), ("a", 2), ("b", 1)]
    assert results.hp_lr.isna().sum() == 2 and results.hp_lr.max() == 0.1

    with study_dir.writing(study_dir.plot_name("a", 0)) as local:
        local.write_bytes(b"\x89PNG fake")
    assert study_dir.read_bytes("plots/schedule-a-seed0.png") == b"\x89PNG fake"
    with study_dir.reading(StudyDir.RUNS) as local:
        assert json.loads(local.read_text())["parent_run_id"] == "p"  # a local copy for MLflow

    ens = study_dir.ensemble_folder("a", 0)
    ens.write_json("ensemble.json", {"members": 3})
    assert [f.name for f in study_dir.ensemble_folders()] == ["a-seed0"]
    # no temporary file is left behind by any of the atomic writes
    names = study_dir.list() + study_dir.list(StudyDir.PARTS) + study_dir.list(StudyDir.PLOTS)
    assert not [n for n in names if ".tmp" in n]
    assert set(study_dir.list()) == {"study.yaml", "runs.json", "arms.json", "results.parquet"}


def test_a_write_that_fails_leaves_the_old_file(tmp_path):
    folder = Folder(tmp_path)
    folder.write_json("arms.json", {"v": 1})

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with folder.writing("arms.json") as local:
            local.write_text('{"v": 2')  # half-written, then the writer dies
            raise Boom()
    assert folder.read_json("arms.json") == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arms.json"]


def test_file_uri_and_path_are_the_same_directory(tmp_path):
    StudyDir(tmp_path / "s").create("name: s\n")
    by_uri = StudyDir(f"file://{tmp_path}/s")
    assert by_uri.is_study() and by_uri.local_path == tmp_path / "s" and by_uri.study_id == "s"
    assert pd.DataFrame(by_uri.results()).empty


def test_a_study_runs_into_a_file_uri(tmp_path, ray_session):
    """`run --study-dir file://...`: every file of the study lands there, Tune's folders too,
    and `compare` and `ensemble` read it back through the same URI."""
    import yaml
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    study = {"name": "uri", "seed": 3, "dataset": {"name": "digits"}, "model": {"kind": "mlp", "hidden": [16]},
             "arms": [{"name": "rand", "method": "sgd", "search": "random", "num_samples": 2,
                       "space": {"lr": {"loguniform": [0.01, 0.1]}}}],
             "budget": {"seconds": 30, "workers": 2}, "training": {"max_epochs": 2, "checkpoint_every": 1}}
    (tmp_path / "uri.yaml").write_text(yaml.safe_dump(study))
    uri = f"file://{tmp_path}/sd"
    r = CliRunner().invoke(main, ["run", str(tmp_path / "uri.yaml"), "--study-dir", uri,
                                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-live"])
    assert r.exit_code == 0, r.output + str(r.exception)
    sd = StudyDir(uri)
    assert {"study.yaml", "results.parquet", "runs.json", "arms.json", "summary.md"} <= set(sd.list())
    results = sd.read_table(StudyDir.RESULTS)
    assert results.trial_id.nunique() == 2 and set(results.step) == {1, 2}
    trials = sd.trial_folders()
    assert len(trials) == 2 and all(t.is_file("trial.json") for t in trials)
    assert all(any(n.startswith("checkpoint_") for n in t.list(dirs=True)) for t in trials)
    r = CliRunner().invoke(main, ["compare", uri, "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert sd.is_file(StudyDir.REPORT) and sd.is_file(StudyDir.ANYTIME)
    r = CliRunner().invoke(main, ["ensemble", uri, "-k", "2", "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert len(pd.read_parquet(tmp_path / "sd" / "ensembles" / "rand-seed0" / "ensemble.parquet")) == 2


def test_results_hold_parts_whose_methods_give_one_name_two_kinds(tmp_path):
    """hyper-hpo's `hidden` is a list (kept as its JSON text), hyper-posterior's a number: the
    consolidated table holds both as text, nothing dropped."""
    d = StudyDir(tmp_path / "s")
    d.create("name: s\n")
    d.write_part("a", 0, [_row("a", 0, "t1", 1, val_loss=0.5) | {"hp_hidden": "[50]"}])
    d.write_part("b", 0, [_row("b", 0, "t2", 1, val_loss=0.4) | {"hp_hidden": 64, "hp_tune": "dropout"}])
    d.consolidate()
    table = d.read_table(StudyDir.RESULTS)
    assert sorted(table.hp_hidden) == ["64", "[50]"] and table.hp_tune.isna().sum() == 1

"""How the coordinator's cost grows: time and memory per trial for 10, 100, 1,000 and 10,000 trivial
trials (each with 10 reports), recorded exactly as in a study (journal and results rows, one
MLflow run per trial, buffered metrics, the arm's anytime curve, runs.json and arms.json) into
a fresh SQLite store; and MLflow's
cost per metric value with and without batching. Tune itself is left out: its per-trial cost
is the orchestration benchmark's subject; this one isolates what hypersweep adds.

    python -m bench.run scale
"""
from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.common import md_table, write

TRIALS = (10, 100, 1000, 10000)
REPORTS = 10


def coordinator_cost(n_trials: int, folder: Path) -> dict:
    from hypersweep.orchestrator.planning import plan
    from hypersweep.orchestrator.progress import ArmStatus
    from hypersweep.orchestrator.recorder import ArmContext, Recorder
    from hypersweep.orchestrator.runner import StudyRecords
    from hypersweep.orchestrator.study import parse_study
    from hypersweep.orchestrator.studydir import StudyDir
    from hypersweep.orchestrator.tracking import Tracker
    study = parse_study({"name": "scale", "dataset": {"name": "digits"},
                         "arms": [{"name": "a", "method": "sgd", "search": "random", "num_samples": n_trials,
                                   "space": {"lr": {"loguniform": [1e-3, 0.1]}}}],
                         "budget": {"seconds": 10}})
    unit = plan(study)[0]
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}", "scale")
    run_id = tracker.start_run("a-seed0")
    status = ArmStatus("a", 0, 10.0)
    study_dir = StudyDir(folder / "study")
    study_dir.create(study.to_yaml())
    # the study's own records too (runs.json learns every trial run, arms.json beats), as in a study
    records = StudyRecords(study, study_dir, tracker, {"tracking_uri": tracker.uri, "parent_run_id": run_id},
                           [status])
    recorder = Recorder(ArmContext(study, "scale", unit, run_id, status, records), tracker, study_dir)
    tracemalloc.start()
    t0 = time.perf_counter()
    for i in range(n_trials):
        tid, hp = f"t{i:05d}", {"lr": 0.01 + i * 1e-6, "batch_size": 64}
        recorder.handle("start", tid, hp, None, 0.0)
        for step in range(1, REPORTS + 1):
            result = {"training_iteration": step, "train_loss": 1.0 / step, "val_loss": 1.0 / step + i * 1e-6,
                      "val_error": 0.1, "test_loss": 1.0, "test_error": 0.1, "epoch": step, "wall_time_s": step * 0.1,
                      "step_time_s": 0.1}
            recorder.handle("result", tid, hp, result, step * 0.1)
        recorder.handle("end", tid, hp, True, 1.0)
    tracker.flush()
    elapsed = time.perf_counter() - t0
    if recorder.write_error is not None or len(recorder.rows) != n_trials * REPORTS:  # measured nothing
        raise RuntimeError(f"the recorder kept {len(recorder.rows)} of {n_trials * REPORTS} reports: "
                           f"{recorder.write_error}")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracker.end_all("FINISHED")
    return {"trials": n_trials, "reports_per_trial": REPORTS, "coordinator_s": elapsed,
            "ms_per_trial": 1e3 * elapsed / n_trials, "peak_python_mb": peak / 2 ** 20,
            "kb_per_trial": peak / 1024 / n_trials}


def mlflow_cost(folder: Path, n: int = 2000) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from hypersweep.orchestrator.tracking import Tracker
    uri = f"sqlite:///{folder / 'mlflow-cost.db'}"
    tracker = Tracker(uri, "cost")
    client = MlflowClient(uri)
    unbatched = tracker.start_run("unbatched")
    t = time.perf_counter()
    for i in range(n // 10):  # fewer: one round trip each
        client.log_metric(unbatched, "m", float(i), step=i)
    per_value_unbatched = (time.perf_counter() - t) / (n // 10)
    batched = tracker.start_run("batched")
    t = time.perf_counter()
    for i in range(n // 5):
        tracker.log_metrics(batched, {f"m{k}": float(i) for k in range(5)}, step=i)
    tracker.flush()
    per_value_batched = (time.perf_counter() - t) / n
    tracker.end_all("FINISHED")
    return [{"mode": "log_metric, one call per value", "ms_per_value": 1e3 * per_value_unbatched},
            {"mode": "hypersweep Tracker (buffered log_batch)", "ms_per_value": 1e3 * per_value_batched,
             "speed-up": per_value_unbatched / per_value_batched}]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in TRIALS:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            rows.append(coordinator_cost(n, folder))
            print(rows[-1], flush=True)
        cost = mlflow_cost(Path(tmp))
    growth = rows[-1]["ms_per_trial"] / rows[0]["ms_per_trial"]
    text = (f"Coordinator cost per trial ({REPORTS} reports each; flat means the ratio {TRIALS[-1]} : {TRIALS[0]} "
            f"trials stays near 1; measured {growth:.2f}):\n\n" + md_table(rows) + "\nMLflow logging into SQLite, per metric value:\n\n"
            + md_table(cost))
    path = write("scale", {"coordinator": rows, "mlflow": cost, f"ms_per_trial_growth_{TRIALS[-1]}_vs_{TRIALS[0]}": growth}, text,
                 "python -m bench.run scale")
    print(path.read_text())


if __name__ == "__main__":
    main()

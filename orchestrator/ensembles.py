"""Ensembles and distillation, coordinated: find trained trials in a study directory, have the
workers draw and evaluate members (workers/ensemble.py, as Ray tasks when Ray is up), write the
ensemble table and distilled weights, and record them on the arm's MLflow run.

Members of an arm x seed:
- a generative method (it has `sample_weights`): K samples from its best trial;
- any other method: its K best trials by validation loss, one member each (K replicas of a
  fixed arm are the deep-ensemble baseline).

Files, in the output folder (default STUDY/ensembles/ARM-seedI/):
    ensemble.parquet   one row per member: source run and trial, seed, sample seed, the flat
                       float32 weights, the member's val/test metrics, the trial config (JSON)
    ensemble.json      the members' metric lists and the ensemble's mean-prediction and vote metrics
    distill.json       Polyak averages (raw; gauge-fixed where defined) and their metrics
    distilled-raw.pt, distilled-gauge.pt   {"weights": (P,), "names", "shapes", "config"}
    members.png        histogram of single-member accuracy (RMSE) with the ensemble and distilled lines
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

TRIAL_FILE = "trial.json"
ENSEMBLE_FILE = "ensemble.parquet"


class EnsembleError(ValueError):
    """Input an ensemble cannot be built from; the message is one line."""


@dataclass(frozen=True)
class TrialRecord:
    """A finished Tune trial, as `run_arm` describes it in the trial's folder."""
    path: Path
    arm: str
    method: str
    seed_index: int
    seed: int
    trial_id: str
    best_val_loss: float
    config: dict[str, Any]
    run_id: str | None = None  # the arm x seed MLflow run
    tracking_uri: str | None = None

    @property
    def generative(self) -> bool:
        from hypersweep.methods import method_module
        return hasattr(method_module(self.method).METHOD, "sample_weights")

    def checkpoint(self) -> Path:
        """The trial's last checkpoint (Tune names them checkpoint_000NNN)."""
        found = sorted(self.path.glob("checkpoint_*"))
        if not found:
            raise EnsembleError(f"trial {self.trial_id} ({self.path}) has no checkpoint to draw members from")
        return found[-1]


def write_trial_records(trial_dirs: dict[str, tuple[Path, dict[str, Any]]], rows: list[dict], *, arm: str,
                        method: str, seed_index: int, seed: int, run_id: str, tracking_uri: str) -> None:
    """One trial.json per trial folder: what `ensemble` needs to find and rebuild it later."""
    best: dict[str, float] = {}
    for row in rows:
        best[row["trial_id"]] = min(best.get(row["trial_id"], math.inf), row.get("val_loss", math.inf))
    for trial_id, (path, config) in trial_dirs.items():
        if not path.is_dir():
            continue
        record = {"arm": arm, "method": method, "seed_index": seed_index, "seed": seed, "trial_id": trial_id,
                  "best_val_loss": best.get(trial_id, math.inf), "config": config, "run_id": run_id,
                  "tracking_uri": tracking_uri}
        tmp = path / (TRIAL_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path / TRIAL_FILE)


def _read_record(file: Path) -> TrialRecord:
    raw = json.loads(file.read_text())
    return TrialRecord(path=file.parent, **raw)


def find_trials(path: Path) -> list[TrialRecord]:
    """The trials of a study directory, or the one trial of a trial directory."""
    if (path / TRIAL_FILE).is_file():
        return [_read_record(path / TRIAL_FILE)]
    if not (path / "tune").is_dir():
        raise EnsembleError(f"{path}: neither a study directory (with tune/) nor a trial directory (with {TRIAL_FILE})")
    records = [_read_record(f) for f in sorted((path / "tune").glob(f"*/*/{TRIAL_FILE}"))]
    if not records:
        raise EnsembleError(f"{path}: no finished trials recorded under tune/")
    return records


def groups(trials: Sequence[TrialRecord], arm: str | None = None,
           seed_index: int | None = None) -> dict[tuple[str, int], list[TrialRecord]]:
    """Trials by (arm, seed_index), filtered; an unknown filter is an error naming the choices."""
    out: dict[tuple[str, int], list[TrialRecord]] = {}
    for t in trials:
        out.setdefault((t.arm, t.seed_index), []).append(t)
    if arm is not None and not any(a == arm for a, _ in out):
        raise EnsembleError(f"--arm {arm!r} not in this study; arms: {', '.join(sorted({a for a, _ in out}))}")
    if seed_index is not None and not any(s == seed_index for _, s in out):
        raise EnsembleError(f"--seed-index {seed_index} not in this study; seeds: "
                            f"{', '.join(str(s) for s in sorted({s for _, s in out}))}")
    return {k: v for k, v in out.items() if (arm is None or k[0] == arm) and (seed_index is None or k[1] == seed_index)}


class Compute:
    """Runs worker functions in this process, or as Ray tasks with the study's worker resources."""

    def __init__(self, use_ray: bool = False, num_cpus: float = 1, num_gpus: float = 0):
        self.use_ray, self.num_cpus, self.num_gpus = use_ray, num_cpus, num_gpus

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list[Any]:
        if not self.use_ray:
            return [fn(*args) for args in calls]
        import ray
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(fn)
        return ray.get([task.remote(*args) for args in calls])


@dataclass
class Ensemble:
    members: list[dict[str, Any]]  # one dict per member: provenance and metrics (no weights)
    weights: np.ndarray  # (K, P) float32
    log_noise_std: np.ndarray  # (K,)
    config: dict[str, Any]  # the config of the (first) source trial: dataset and model
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> evaluate_ensemble output

    @property
    def task(self) -> str:
        return "classification" if "member_error" in self.metrics["val"] else "regression"

    @property
    def quality(self) -> str:
        return "error" if self.task == "classification" else "rmse"


def member_sources(trials: Sequence[TrialRecord], members: int, sample_seed: int = 0
                   ) -> list[tuple[TrialRecord, int, int]]:
    """(trial, members drawn from it, sample seed) for one arm x seed, checked before any
    work: the best trial of a generative method, else the `members` best trials."""
    if members < 1:
        raise EnsembleError(f"--members must be at least 1, got {members}")
    ranked = sorted(trials, key=lambda t: t.best_val_loss)
    if ranked[0].generative:
        ranked[0].checkpoint()
        return [(ranked[0], members, sample_seed)]
    if len(ranked) < members:
        t = ranked[0]
        raise EnsembleError(f"arm {t.arm!r} seed {t.seed_index}: {members} members need {members} independent "
                            f"trials of the non-generative method {t.method!r}, found {len(ranked)} "
                            f"(give the arm num_samples >= {members})")
    for t in ranked[:members]:
        t.checkpoint()
    return [(t, 1, 0) for t in ranked[:members]]


def build_ensemble(trials: Sequence[TrialRecord], members: int, compute: Compute, sample_seed: int = 0) -> Ensemble:
    """Draw and evaluate the members of one arm x seed (see the module docstring)."""
    from hypersweep.workers.ensemble import evaluate_weights, sample_members
    sources = member_sources(trials, members, sample_seed)
    drawn = compute.map(sample_members, [(t.config, str(t.checkpoint()), k, s) for t, k, s in sources])
    weights = np.concatenate([d["weights"] for d in drawn])
    log_std = np.concatenate([d["log_noise_std"] for d in drawn])
    rows = []
    for (t, k, s), d in zip(sources, drawn):
        for j in range(len(d["weights"])):
            rows.append({"member": len(rows), "arm": t.arm, "method": t.method, "seed_index": t.seed_index,
                         "seed": t.seed, "trial_id": t.trial_id, "source_run": t.run_id or "",
                         "sample_seed": s, "sample_index": j, "config": json.dumps(t.config)})
    config = sources[0][0].config
    metrics = compute.map(evaluate_weights, [(config, weights, log_std)])[0]
    ens = Ensemble(rows, weights, log_std, config, metrics)
    q = ens.quality
    for split in ("val", "test"):
        for row, value in zip(rows, metrics[split][f"member_{q}"]):
            row[f"{split}_{q}"] = value
        if q == "error":
            for row, value in zip(rows, metrics[split]["member_loss"]):
                row[f"{split}_loss"] = value
    return ens


def write_ensemble(ens: Ensemble, out_dir: Path, provenance: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(ens.members)
    flat = pa.array(ens.weights.reshape(-1), pa.float32())
    table = table.append_column("weights", pa.FixedSizeListArray.from_arrays(flat, ens.weights.shape[1]))
    table = table.append_column("log_noise_std", pa.array(ens.log_noise_std, pa.float32()))
    meta = {"hypersweep": json.dumps({"config": ens.config, **provenance})}
    table = table.replace_schema_metadata(meta)
    path = out_dir / ENSEMBLE_FILE
    pq.write_table(table, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    _write_json(out_dir / "ensemble.json", {"members": len(ens.members), "metrics": ens.metrics, **provenance})
    return path


def read_ensemble(path: Path) -> tuple[Ensemble, dict[str, Any]]:
    """An ensemble.parquet (or the folder holding it) and its provenance."""
    import pyarrow.parquet as pq
    file = path / ENSEMBLE_FILE if path.is_dir() else path
    if not file.is_file():
        raise EnsembleError(f"{path}: no {ENSEMBLE_FILE} (run `hypersweep ensemble` first)")
    try:
        table = pq.read_table(file)
        meta = json.loads(table.schema.metadata[b"hypersweep"])
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise EnsembleError(f"{file}: not an ensemble table written by hypersweep ({type(e).__name__})") from None
    weights = np.stack(table.column("weights").to_numpy(zero_copy_only=False)).astype(np.float32)
    log_std = table.column("log_noise_std").to_numpy()
    rows = table.drop_columns(["weights", "log_noise_std"]).to_pylist()
    ens = Ensemble(rows, weights, log_std, meta.pop("config"))
    saved = json.loads((file.parent / "ensemble.json").read_text()) if (file.parent / "ensemble.json").is_file() else {}
    ens.metrics = saved.get("metrics", {})
    return ens, meta


def distill(ens: Ensemble, out_dir: Path, compute: Compute) -> dict[str, dict[str, Any]]:
    """Polyak averages of the members, evaluated; weights files and distill.json in out_dir."""
    import torch

    from hypersweep.workers.ensemble import distill_weights
    result = compute.map(distill_weights, [(ens.config, ens.weights, ens.log_noise_std)])[0]
    spec = result.pop("spec")
    summary = {}
    for kind, r in result.items():
        torch.save({"weights": torch.from_numpy(np.array(r["weights"])), **spec, "config": ens.config, "kind": kind,
                    "members": len(ens.members)}, out_dir / f"distilled-{kind}.pt")
        summary[kind] = {"val": r["val"], "test": r["test"]}
    _write_json(out_dir / "distill.json", summary)
    return summary


def headline(ens: Ensemble, distilled: dict[str, dict[str, Any]] | None) -> dict[str, float]:
    """Flat metrics for MLflow and tables: ensemble.<split>.<what>, distill.<kind>.<split>.<metric>."""
    q = ens.quality
    out: dict[str, float] = {"ensemble.members": float(len(ens.members))}
    for split in ("val", "test"):
        m = ens.metrics[split]
        single = np.asarray(m[f"member_{q}"])
        out.update({f"ensemble.{split}.member_{q}_mean": float(single.mean()),
                    f"ensemble.{split}.member_{q}_std": float(single.std()),
                    f"ensemble.{split}.member_{q}_min": float(single.min()),
                    f"ensemble.{split}.member_{q}_max": float(single.max()),
                    f"ensemble.{split}.mean_{q}": m[f"mean_{q}"]})
        if "vote_error" in m:
            out[f"ensemble.{split}.vote_error"] = m["vote_error"]
        if "mean_loss" in m:
            out[f"ensemble.{split}.mean_loss"] = m["mean_loss"]
        for kind, d in (distilled or {}).items():
            out[f"distill.{kind}.{split}.{q}"] = d[split][f"mean_{q}"]
            if "mean_loss" in d[split]:
                out[f"distill.{kind}.{split}.loss"] = d[split]["mean_loss"]
    return out


def histogram(ens: Ensemble, distilled: dict[str, dict[str, Any]] | None, path: Path, split: str = "test") -> Path:
    """Single-member accuracy (or RMSE) on `split`, with the ensemble and the distilled nets marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    q = ens.quality
    scale = (lambda e: 100 * (1 - e)) if q == "error" else (lambda e: e)
    label = f"{split} accuracy (%)" if q == "error" else f"{split} RMSE"
    single = [scale(e) for e in ens.metrics[split][f"member_{q}"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(single, bins=min(20, max(5, len(single) // 2)), color="#999", label=f"{len(single)} single members")
    ax.axvline(scale(ens.metrics[split][f"mean_{q}"]), color="C0", lw=2, label="ensemble (mean prediction)")
    if "vote_error" in ens.metrics[split]:
        ax.axvline(scale(ens.metrics[split]["vote_error"]), color="C0", ls=":", lw=2, label="ensemble (majority vote)")
    for i, (kind, d) in enumerate((distilled or {}).items()):
        ax.axvline(scale(d[split][f"mean_{q}"]), color=f"C{i + 1}", ls="--", lw=2, label=f"Polyak average ({kind})")
    ax.set_xlabel(label)
    ax.set_ylabel("members")
    members = ens.members[0]
    ax.set_title(f"{members['arm']} seed {members['seed_index']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_ensemble(trials: Sequence[TrialRecord], members: int, out_dir: Path, compute: Compute, *,
                 sample_seed: int = 0, distill_too: bool = True, tracker=None) -> dict[str, float]:
    """Everything for one arm x seed: members, table, (distillation), plot, and the MLflow
    records on the arm's run when `tracker` is given. Returns the headline metrics."""
    ens = build_ensemble(trials, members, compute, sample_seed)
    t = trials[0]
    provenance = {"arm": t.arm, "method": t.method, "seed_index": t.seed_index, "seed": t.seed,
                  "source_run": t.run_id, "tracking_uri": t.tracking_uri}
    write_ensemble(ens, out_dir, provenance)
    distilled = distill(ens, out_dir, compute) if distill_too else None
    histogram(ens, distilled, out_dir / "members.png")
    metrics = headline(ens, distilled)
    if tracker is not None and t.run_id:
        record(tracker, t.run_id, metrics, out_dir)
    return metrics


def table(results: dict[tuple[str, int], dict[str, float]], split: str = "test") -> list[dict[str, Any]]:
    """Rows for printing: arm, seed, members, single-member mean +- std, ensemble (mean and
    vote), Polyak averages (raw, gauge), all on `split`; errors as percentages."""
    out = []
    for (arm, seed_index), m in results.items():
        q = "error" if f"ensemble.{split}.mean_error" in m else "rmse"
        scale = 100.0 if q == "error" else 1.0
        fmt = (lambda key: "" if key not in m else f"{scale * m[key]:.2f}")
        out.append({"arm": arm, "seed": seed_index, "members": int(m["ensemble.members"]),
                    f"single {q}": f"{fmt(f'ensemble.{split}.member_{q}_mean')} +- {fmt(f'ensemble.{split}.member_{q}_std')}",
                    f"ensemble {q}": fmt(f"ensemble.{split}.mean_{q}"), "vote error": fmt(f"ensemble.{split}.vote_error"),
                    f"polyak raw {q}": fmt(f"distill.raw.{split}.{q}"),
                    f"polyak gauge {q}": fmt(f"distill.gauge.{split}.{q}")})
    return out


def collected(study_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """Headline metrics of every ensemble already written under STUDY/ensembles/."""
    out = {}
    for folder in sorted((study_dir / "ensembles").glob("*-seed*")):
        if not (folder / "ensemble.json").is_file():
            continue
        saved = json.loads((folder / "ensemble.json").read_text())
        ens = Ensemble([{}] * saved["members"], np.zeros((0, 0)), np.zeros(0), {}, saved["metrics"])
        distilled = json.loads((folder / "distill.json").read_text()) if (folder / "distill.json").is_file() else None
        out[(saved["arm"], saved["seed_index"])] = headline(ens, distilled)
    return out


def report_markdown(results: dict[tuple[str, int], dict[str, float]], split: str = "test") -> str:
    """Per arm, over seeds (mean +- standard deviation): single members, the ensemble by mean
    prediction and by vote, the Polyak averages; classification errors in %."""
    arms: dict[str, list[dict[str, float]]] = {}
    for (arm, _), m in results.items():
        arms.setdefault(arm, []).append(m)
    first = next(iter(results.values()))
    q = "error" if f"ensemble.{split}.mean_error" in first else "rmse"
    scale = 100.0 if q == "error" else 1.0
    columns = [("single member", f"ensemble.{split}.member_{q}_mean"), ("ensemble (mean)", f"ensemble.{split}.mean_{q}"),
               ("ensemble (vote)", f"ensemble.{split}.vote_error"), ("Polyak raw", f"distill.raw.{split}.{q}"),
               ("Polyak gauge-fixed", f"distill.gauge.{split}.{q}")]
    unit = " (%)" if q == "error" else ""
    lines = ["| arm | seeds | members | " + " | ".join(f"{c} {split} {q}{unit}" for c, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for arm, ms in arms.items():
        cells = []
        for _, key in columns:
            vals = [m[key] * scale for m in ms if key in m]
            cells.append(f"{np.mean(vals):.2f} +- {np.std(vals):.2f}" if vals else "")
        lines.append(f"| {arm} | {len(ms)} | {int(ms[0]['ensemble.members'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record(tracker, run_id: str, metrics: dict[str, float], out_dir: Path) -> None:
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.flush()
    for name in ("ensemble.parquet", "ensemble.json", "distill.json", "members.png", "distilled-raw.pt",
                 "distilled-gauge.pt"):
        if (out_dir / name).is_file():
            tracker.log_artifact(run_id, out_dir / name, "ensemble")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

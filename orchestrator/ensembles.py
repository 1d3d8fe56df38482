"""Ensembles and distillation, coordinated: find trained trials in a study directory, have the
workers draw and evaluate members (workers/ensemble.py, as Ray tasks when Ray is up), write the
ensemble table and distilled weights, and record them on the arm's MLflow run.

Members of an arm x seed:
- a generative method (`Method.generative`): K samples from its best trial;
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

import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hypersweep.orchestrator.studydir import Folder, StudyDir
from hypersweep.orchestrator.trials import Compute, EnsembleError, TrialRecord

ENSEMBLE_FILE = "ensemble.parquet"
DISTILL_FILE = "distill.json"


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
    try:
        drawn = compute.map(sample_members, [(t.config, t.checkpoint(), k, s) for t, k, s in sources])
    except ValueError as e:  # a checkpoint that is not one (through Ray: a RayTaskError that is a ValueError)
        raise EnsembleError(str(getattr(e, "cause", None) or e).splitlines()[-1]) from None
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


def write_ensemble(ens: Ensemble, out: Folder, provenance: dict[str, Any]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(ens.members)
    flat = pa.array(ens.weights.reshape(-1), pa.float32())
    table = table.append_column("weights", pa.FixedSizeListArray.from_arrays(flat, ens.weights.shape[1]))
    table = table.append_column("log_noise_std", pa.array(ens.log_noise_std, pa.float32()))
    meta = {"hypersweep": json.dumps({"config": ens.config, **provenance})}
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = out.write_bytes(ENSEMBLE_FILE, buf.getvalue())
    out.write_json("ensemble.json", {"members": len(ens.members), "metrics": ens.metrics, **provenance})
    return path


def read_ensemble(folder: Folder, file: str = ENSEMBLE_FILE) -> tuple[Ensemble, dict[str, Any]]:
    """An ensemble table (in `folder`, named `file`) and its provenance."""
    import pyarrow.parquet as pq
    if not folder.is_file(file):
        raise EnsembleError(f"{folder}: no {file} (run `hypersweep ensemble` first)")
    try:
        table = pq.read_table(io.BytesIO(folder.read_bytes(file)))
        meta = json.loads(table.schema.metadata[b"hypersweep"])
        weights = np.stack(table.column("weights").to_numpy(zero_copy_only=False)).astype(np.float32)
        log_std = table.column("log_noise_std").to_numpy()
        rows = table.drop_columns(["weights", "log_noise_std"]).to_pylist()
        config = meta.pop("config")
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise EnsembleError(f"{folder}/{file}: not an ensemble table written by hypersweep "
                            f"({type(e).__name__})") from None
    ens = Ensemble(rows, weights, log_std, config)
    ens.metrics = folder.read_json("ensemble.json", {}).get("metrics", {})
    return ens, meta


def distill(ens: Ensemble, out: Folder, compute: Compute) -> dict[str, dict[str, Any]]:
    """Polyak averages of the members, evaluated; weights files and distill.json in `out`."""
    import torch

    from hypersweep.workers.ensemble import distill_weights
    result = compute.map(distill_weights, [(ens.config, ens.weights, ens.log_noise_std)])[0]
    spec = result.pop("spec")
    summary = {}
    for kind, r in result.items():
        with out.writing(f"distilled-{kind}.pt") as local:
            torch.save({"weights": torch.from_numpy(np.array(r["weights"])), **spec, "config": ens.config,
                        "kind": kind, "members": len(ens.members)}, local)
        summary[kind] = {"val": r["val"], "test": r["test"]}
    out.write_json(DISTILL_FILE, summary)
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


def histogram(ens: Ensemble, distilled: dict[str, dict[str, Any]] | None, out: Folder, name: str = "members.png",
              split: str = "test") -> str:
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
    with out.writing(name) as local:
        fig.savefig(local, dpi=110)
    plt.close(fig)
    return name


def run_ensemble(trials: Sequence[TrialRecord], members: int, out: Folder, compute: Compute, *,
                 sample_seed: int = 0, distill_too: bool = True, tracker=None, step: int = 0) -> dict[str, float]:
    """Everything for one arm x seed: members, table, (distillation), plot, and the MLflow
    records on the arm's run when `tracker` is given (at `step`: an arm extended by a longer
    budget draws again, at the step of its extension). Returns the headline metrics."""
    ens = build_ensemble(trials, members, compute, sample_seed)
    t = trials[0]
    provenance = {"arm": t.arm, "method": t.method, "seed_index": t.seed_index, "seed": t.seed,
                  "source_run": t.run_id, "tracking_uri": t.tracking_uri}
    write_ensemble(ens, out, provenance)
    distilled = distill(ens, out, compute) if distill_too else None
    histogram(ens, distilled, out)
    metrics = headline(ens, distilled)
    if tracker is not None and t.run_id:
        record(tracker, t.run_id, metrics, out, step)
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


def collected(study: StudyDir) -> dict[tuple[str, int], dict[str, float]]:
    """Headline metrics of every ensemble already written under STUDY/ensembles/."""
    out = {}
    for folder in study.ensemble_folders():
        saved = folder.read_json("ensemble.json")
        if saved is None:
            continue
        ens = Ensemble([{}] * saved["members"], np.zeros((0, 0)), np.zeros(0), {}, saved["metrics"])
        distilled = folder.read_json(DISTILL_FILE)
        out[(saved["arm"], saved["seed_index"])] = headline(ens, distilled)
    return out


# What a method's ensemble is, where the paper says it is not an ensemble method.
METHOD_NOTES = {
    "hyper-ml": "trains its weight distribution towards a point (Sheikh et al. 2017, sections 3-4, Fig. 2: the "
                "distribution collapses to a near-delta), so its members are near copies and its ensemble equals "
                "a single member; it is a way to train one net, not an ensemble method, and is listed here only "
                "for completeness.",
}


def arm_methods(study: StudyDir) -> dict[str, str]:
    """arm -> method of every ensemble already written under STUDY/ensembles/."""
    out = {}
    for folder in study.ensemble_folders():
        saved = folder.read_json("ensemble.json")
        if saved is not None and "method" in saved:
            out[saved["arm"]] = saved["method"]
    return out


def report_markdown(results: dict[tuple[str, int], dict[str, float]], split: str = "test",
                    methods: dict[str, str] | None = None) -> str:
    """Per arm, over seeds (mean +- standard deviation): single members, the ensemble by mean
    prediction and by vote, the Polyak averages; classification errors in %. Below the table,
    a note for each arm whose method is not an ensemble method (METHOD_NOTES)."""
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
    notes = [f"- **{arm}** ({method}) {METHOD_NOTES[method]}" for arm, method in (methods or {}).items()
             if arm in arms and method in METHOD_NOTES]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def record(tracker, run_id: str, metrics: dict[str, float], out: Folder, step: int = 0) -> dict[str, dict[str, Any]]:
    """The ensemble's metrics and files on the arm's run, and its Polyak averages as MLflow
    models (orchestrator/models.py), listed in the folder's models.json; returns that list."""
    from hypersweep.orchestrator.models import MODELS_FILE, log_distilled
    tracker.log_metrics(run_id, metrics, step=step)
    tracker.flush()
    for name in (ENSEMBLE_FILE, "ensemble.json", DISTILL_FILE, "members.png", "distilled-raw.pt",
                 "distilled-gauge.pt"):
        if out.is_file(name):
            with out.reading(name) as local:
                tracker.log_artifact(run_id, local, "ensemble")
    models = log_distilled(tracker, run_id, out)
    if models:
        out.write_json(MODELS_FILE, models)
    return models


"""The comparison report: anytime curves, their aggregate over seeds, and the per-arm table.

Anytime curve of an arm x seed: at arm wall time t, the lowest validation loss reported by any
of its trials so far, and the test metrics of that report (the checkpoint one would keep).
Curves are step functions, sampled on a common time grid and aggregated over seeds as the
median with the interquartile band (or the mean with a 95% normal confidence interval).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hypersweep.orchestrator.searches import BLACK_BOX  # the searches whose best result is "the best baseline"
from hypersweep.orchestrator.studydir import StudyDir


def quality(df: pd.DataFrame) -> str:
    return "error" if "test_error" in df.columns else "rmse"


def anytime_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (arm, seed_index, t, best_val_loss, test_loss, test_<q>) at each improvement."""
    q = quality(df)
    out = []
    for (arm, seed), g in df.sort_values("arm_time_s").groupby(["arm", "seed_index"], sort=False):
        best = math.inf
        for row in g.itertuples(index=False):
            if row.val_loss < best:
                best = row.val_loss
                out.append({"arm": arm, "seed_index": seed, "t": row.arm_time_s, "best_val_loss": best,
                            "test_loss": row.test_loss, f"test_{q}": getattr(row, f"test_{q}")})
    return pd.DataFrame(out, columns=["arm", "seed_index", "t", "best_val_loss", "test_loss", f"test_{q}"])


def on_grid(curve: pd.DataFrame, grid: np.ndarray, column: str = "best_val_loss") -> np.ndarray:
    """The step function of one arm x seed at the grid times (NaN before its first report)."""
    t = curve["t"].to_numpy()
    idx = np.searchsorted(t, grid, side="right") - 1
    values = curve[column].to_numpy()
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], np.nan)


def aggregate(curves: pd.DataFrame, grid: np.ndarray, how: str = "median") -> pd.DataFrame:
    """Per arm and grid time: center and band over seeds (median and IQR, or mean and 95% CI),
    over the seeds that have reported by then (`seeds` says how many; until every seed has
    reported, the curve can rise when a slower seed joins)."""
    rows = []
    for arm, g in curves.groupby("arm", sort=False):
        values = np.stack([on_grid(c, grid) for _, c in g.groupby("seed_index")])  # (seeds, grid)
        for j, t in enumerate(grid):
            v = values[:, j][~np.isnan(values[:, j])]
            if not len(v):
                continue
            if how == "median":
                center, low, high = np.median(v), np.percentile(v, 25), np.percentile(v, 75)
            else:
                center = v.mean()
                half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
                low, high = center - half, center + half
            rows.append({"arm": arm, "t": t, "center": center, "low": low, "high": high, "seeds": len(v)})
    return pd.DataFrame(rows, columns=["arm", "t", "center", "low", "high", "seeds"])


def time_to_reach(curve: pd.DataFrame, target: float) -> float:
    hit = curve[curve.best_val_loss <= target]
    return float(hit.t.iloc[0]) if len(hit) else math.nan


def last_reports(df: pd.DataFrame, arm: str, k: int, column: str) -> tuple[float, float]:
    """Per seed, the mean of `column` over the best trial's last k reports; then the mean and
    standard error over seeds (the UCI protocol's "average over the last epochs")."""
    per_seed = []
    for _, g in df[df.arm == arm].groupby("seed_index"):
        best = g.loc[g.val_loss.idxmin(), "trial_id"]
        per_seed.append(g[g.trial_id == best].sort_values("step")[column].tail(k).mean())
    v = np.asarray(per_seed, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def arm_table(df: pd.DataFrame, arms: dict[str, dict[str, Any]] | None = None,
              last_k: int = 0) -> tuple[pd.DataFrame, str | None]:
    """One row per arm: final best val loss (median and IQR over seeds), test metric at the best
    val report (median), time to reach the best black-box arm's final val loss (median over
    seeds; 'never' counts as missing), wall time used and trials (median); with `last_k`, the
    test metric averaged over the best trial's last k reports (mean +- s.e. over seeds).
    `arms`: the per-arm x seed records of arms.json. Returns the table and the baseline arm."""
    q = quality(df)
    curves = anytime_curves(df)
    finals = curves.groupby(["arm", "seed_index"]).last()
    searches = df.groupby("arm").search.first()
    medians = finals.groupby("arm").best_val_loss.median()
    baselines = medians[[a for a in medians.index if searches.get(a) in BLACK_BOX]]
    baseline = baselines.idxmin() if len(baselines) else None
    target = baselines.min() if len(baselines) else math.nan
    rows = []
    for arm in dict.fromkeys(df.arm):
        f = finals.loc[arm]
        reach = [time_to_reach(c, target) for _, c in curves[curves.arm == arm].groupby("seed_index")]
        reached = [r for r in reach if not math.isnan(r)]
        used = [a["wall_time_used_s"] for a in (arms or {}).values() if a["arm"] == arm]
        cpu = [a["cpu_s"] for a in (arms or {}).values() if a["arm"] == arm and "cpu_s" in a]
        trials = df[df.arm == arm].groupby("seed_index").trial_id.nunique()
        rows.append({"arm": arm, "search": searches[arm], "seeds": len(f),
                     "final best val_loss (median)": f.best_val_loss.median(),
                     "IQR low": f.best_val_loss.quantile(0.25), "IQR high": f.best_val_loss.quantile(0.75),
                     f"test_{q} at best val (median)": f[f"test_{q}"].median(),
                     "time to baseline (s, median)": float(np.median(reached)) if reached else math.nan,
                     "seeds reaching baseline": f"{len(reached)}/{len(reach)}",
                     "wall time used (s, median)": float(np.median(used)) if used else math.nan,
                     "CPU time (s, median)": float(np.median(cpu)) if cpu else math.nan,
                     "trials (median)": float(trials.median())})
        if last_k:
            mean, se = last_reports(df, arm, last_k, f"test_{q}")
            rows[-1][f"test_{q}, last {last_k} reports (mean +- s.e. over seeds)"] = f"{mean:.4g} +- {se:.2g}"
    return pd.DataFrame(rows), baseline


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def intro(baseline: str | None, budget_s: float, schedule: str, status: str, code: str = "") -> str:
    """The report's first line: budget, schedule, status, the baseline and (`code_sentence`) the
    code that ran the study."""
    return (f"Compared at equal wall-clock budget: {budget_s:g} s per arm x seed on the same resources (a one-trial "
            f"arm gets every worker slot's CPUs, or one whole GPU); the CPU time each used is in its row. Arms ran "
            f"{schedule}; {status}. Baseline for 'time to baseline': "
            f"{baseline or 'none (no ' + '/'.join(BLACK_BOX) + ' arm)'}'s final median val_loss."
            + (f" {code}" if code else ""))


def code_sentence(records: Any) -> str:
    """What code ran the study, from runs.json's `code` list (runner.code_record): "Code:
    hypersweep V at commit C; resumed with ...". Empty where none was recorded (older studies)."""
    records = [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    if not records:
        return ""

    def one(record: dict[str, Any]) -> str:
        commit = str(record.get("commit") or "")[:12]
        return (f"hypersweep {record.get('version') or 'unknown'}" + (f" at commit {commit}" if commit else "")
                + (" with uncommitted changes" if record.get("dirty") == "true" else ""))
    resumes = [one(r) for r in records[1:]]
    return f"Code: {one(records[0])}" + (f"; resumed with {', '.join(resumes)}" if resumes else "") + "."


def short_columns(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The arm table with short headers (MLflow's artifact pane shows about 100 characters of a
    line), the interquartile range in one column; and the legend lines that spell them out."""
    out, legend = pd.DataFrame({"arm": table["arm"], "search": table["search"], "seeds": table["seeds"]}), []

    def put(short: str, long: str, values) -> None:
        out[short] = list(values)
        legend.append(f"- **{short}**: {long}")
    put("val_loss", "final best validation loss, median over seeds", table["final best val_loss (median)"])
    put("IQR", "its interquartile range over seeds", (f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in
                                                      zip(table["IQR low"], table["IQR high"])))
    for col in table.columns:
        if col.endswith(" at best val (median)"):
            name = col.split(" at best val")[0]
            put(name, f"{name} of the report with the best val_loss, median over seeds", table[col])
        elif ", last " in col:
            name, k = col.split(", last ")[0], col.split(", last ")[1].split()[0]
            put(f"{name} last{k}", f"{name} averaged over the best trial's last {k} reports, mean +- s.e. over seeds",
                table[col])
    put("t_base", "arm wall time (s) until the best val_loss reached the baseline's final median, median over "
        "the seeds that reached it", table["time to baseline (s, median)"])
    put("reached", "seeds that reached the baseline", table["seeds reaching baseline"])
    put("wall", "wall time the arm used (s), median over seeds", table["wall time used (s, median)"])
    put("CPU", "CPU time its trials' processes used (s, every thread), median over seeds",
        table["CPU time (s, median)"])
    put("trials", "trials started, median over seeds", table["trials (median)"])
    return out, legend


def markdown(study: str, table: pd.DataFrame, baseline: str | None, budget_s: float, schedule: str,
             status: str, code: str = "") -> str:
    """report.md: the intro, the arm table under short headers, and their legend."""
    short, legend = short_columns(table)
    lines = [f"## {study}", "", intro(baseline, budget_s, schedule, status, code), "",
             "| " + " | ".join(short.columns) + " |", "|" + "---|" * len(short.columns)]
    for row in short.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines + [""] + legend) + "\n"


def anytime_plot(curves: pd.DataFrame, path: Path, *, title: str, log_time: bool = False, how: str = "median",
                 n_grid: int = 200) -> Path:
    """Best validation loss so far against arm wall time, per arm, aggregated over seeds, into
    the local file `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t_max = float(curves.t.max()) if len(curves) else 1.0
    t_min = max(float(curves.t.min()), 1e-3) if len(curves) else 1e-3
    grid = np.geomspace(t_min, t_max, n_grid) if log_time else np.linspace(0.0, t_max, n_grid)
    agg = aggregate(curves, grid, how)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (arm, g) in enumerate(agg.groupby("arm", sort=False)):
        ax.plot(g.t, g.center, color=f"C{i}", label=arm)
        ax.fill_between(g.t, g.low, g.high, color=f"C{i}", alpha=0.2)
    if log_time:
        ax.set_xscale("log")
    if len(agg) and float(agg.low.min()) > 0:
        ax.set_yscale("log")  # losses span decades: early jumps would flatten the end game
    ax.set_xlabel("arm wall time (s)")
    ax.set_ylabel("best validation loss so far")
    band = "median, interquartile band" if how == "median" else "mean, 95% CI"
    ax.set_title(f"{title} ({band} over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]  # matplotlib's C0-C9: the same colours as anytime.png


def html_report(title: str, intro: str, table: pd.DataFrame, curves: pd.DataFrame, *, how: str = "median",
                n_grid: int = 200) -> str:
    """report.md's content as one self-contained HTML page (MLflow's artifact pane previews it):
    the arm table, and the anytime chart as SVG, every point with a tooltip (arm, time, best val
    loss, seeds) and arms shown or hidden from the legend (where the viewer runs scripts)."""
    from html import escape
    W, H, L, R, T, B = 760, 380, 70, 160, 20, 45
    t_max = float(curves.t.max()) if len(curves) else 1.0
    agg = aggregate(curves, np.linspace(0.0, t_max, n_grid), how)
    log_y = bool(len(agg)) and float(agg.low.min()) > 0
    ys = np.log10(agg[["low", "high", "center"]].to_numpy()) if log_y else agg[["low", "high", "center"]].to_numpy()
    y_lo, y_hi = (float(np.nanmin(ys)), float(np.nanmax(ys))) if len(agg) else (0.0, 1.0)
    y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
    fx = lambda t: L + (W - L - R) * (t / t_max if t_max else 0.0)  # noqa: E731
    fy = lambda v: T + (H - T - B) * (1 - ((math.log10(v) if log_y else v) - y_lo) / (y_hi - y_lo))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="11"><rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#999"/>']
    for k in range(6):  # axis ticks
        t = t_max * k / 5
        parts.append(f'<text x="{fx(t):.1f}" y="{H - B + 15}" text-anchor="middle">{t:.3g}</text>')
        e = y_lo + (y_hi - y_lo) * k / 5
        parts.append(f'<text x="{L - 5}" y="{fy(10 ** e if log_y else e) + 4:.1f}" text-anchor="end">'
                     f'{(10 ** e if log_y else e):.3g}</text>')
    parts.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">arm wall time (s)</text>')
    parts.append(f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 14 '
                 f'{(T + H - B) / 2})">best validation loss so far{" (log)" if log_y else ""}</text>')
    for i, (arm, g) in enumerate(agg.groupby("arm", sort=False)):
        color, name = COLORS[i % len(COLORS)], escape(str(arm))
        band = [f"{fx(t):.1f},{fy(v):.1f}" for t, v in zip(g.t, g.high)] + \
               [f"{fx(t):.1f},{fy(v):.1f}" for t, v in zip(g.t[::-1], g.low[::-1])]
        points = " ".join(f"{fx(t):.1f},{fy(v):.1f}" for t, v in zip(g.t, g.center))
        parts.append(f'<g class="arm" data-arm="{name}"><polygon points="{" ".join(band)}" fill="{color}" '
                     f'opacity="0.2"/><polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        step = max(1, len(g) // 40)  # tooltips on every few grid points
        for row in g.iloc[::step].itertuples(index=False):
            parts.append(f'<circle cx="{fx(row.t):.1f}" cy="{fy(row.center):.1f}" r="4" fill="{color}" opacity="0.01">'
                         f'<title>{name}: {row.center:.4g} at {row.t:.3g} s ({how} of {row.seeds} seed(s); band '
                         f'{row.low:.4g} to {row.high:.4g})</title></circle>')
        parts.append("</g>")
        y = T + 16 * i + 10
        parts.append(f'<g class="legend" data-arm="{name}" style="cursor:pointer"><rect x="{W - R + 12}" y="{y - 8}" '
                     f'width="12" height="10" fill="{color}"/><text x="{W - R + 30}" y="{y + 1}">{name}</text></g>')
    parts.append("</svg>")
    band_says = "median and interquartile band" if how == "median" else "mean and 95% CI"
    head = "".join(f"<th>{escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False))
    script = ("document.querySelectorAll('g.legend').forEach(function (l) { l.addEventListener('click', function () {"
              " var g = document.querySelector('g.arm[data-arm=\"' + l.dataset.arm + '\"]');"
              " var hide = g.style.display !== 'none'; g.style.display = hide ? 'none' : '';"
              " l.style.opacity = hide ? 0.4 : 1; }); });")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>"
            "body{font-family:sans-serif;font-size:13px;margin:12px} table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#f3f3f3}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>"
            f"<h2>{escape(title)}</h2><p>{escape(intro)}</p><table><tr>{head}</tr>{body}</table>"
            f"<h3>Anytime: best validation loss against arm wall time ({band_says} over seeds)</h3>"
            f"<p>Hover a curve for its values; click an arm in the legend to hide or show it.</p>"
            f"{''.join(parts)}<script>{script}</script></body></html>\n")


def load_study_records(study_dir: StudyDir) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Results rows (the parts written so far, those of running arms included), arms.json,
    study.yaml."""
    return study_dir.results(), study_dir.arms(), study_dir.study_dict(validated=True)

"""Time to target on stn-vs-bo-digits: the wall time each arm needs to reach the final best
validation loss of the best black-box arm (grid, random, tpe, gp; median over seeds), as a
ratio to the budget, per seed. The STN paper reports beating BayesOpt's best in under a
quarter of its time on CIFAR-10.

    python -m bench.run time_to_target [STUDY_DIR]   (without one, runs configs/stn-vs-bo-digits.yaml)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from bench.common import md_table, write

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stn-vs-bo-digits.yaml"


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    argv = sys.argv[1:] if argv is None else argv
    from orchestrator.report import BLACK_BOX, anytime_curves, load_study_records, time_to_reach
    if argv:
        study_dir = Path(argv[0])
    else:
        import tempfile

        from orchestrator.runner import run_study
        from orchestrator.study import load_study
        study_dir = Path(tempfile.mkdtemp()) / "stn-vs-bo-digits"
        run_study(load_study(CONFIG), study_dir, tracking_uri=f"sqlite:///{study_dir.parent / 'mlflow.db'}", live=False)
    df, arms, study = load_study_records(study_dir)
    budget = study["budget"]["seconds"]
    curves = anytime_curves(df)
    finals = curves.groupby(["arm", "seed_index"]).best_val_loss.last()
    searches = df.groupby("arm").search.first()
    medians = finals.groupby("arm").median()
    black_box = medians[[a for a in medians.index if searches[a] in BLACK_BOX]]
    baseline, target = black_box.idxmin(), float(black_box.min())
    rows = []
    for arm in dict.fromkeys(df.arm):
        ratios = [time_to_reach(c, target) / budget for _, c in curves[curves.arm == arm].groupby("seed_index")]
        hit = [r for r in ratios if not math.isnan(r)]
        rows.append({"arm": arm, "search": searches[arm],
                     "ratio per seed": ", ".join("never" if math.isnan(r) else f"{r:.2f}" for r in ratios),
                     "median ratio (seeds that reached it)": float(np.median(hit)) if hit else "never",
                     "seeds reaching": f"{len(hit)}/{len(ratios)}"})
    text = (f"Study {study_dir} ({study['name']}, {study['seeds']} seeds, {budget:g} s per arm x seed). Target: "
            f"{baseline}'s final median best val_loss {target:.4f}. Ratio = time to reach it / budget.\n\n"
            + md_table(rows))
    path = write("time_to_target", {"study_dir": str(study_dir), "baseline": baseline, "target": target,
                                     "budget_s": budget, "rows": rows}, text,
                 f"python -m bench.run time_to_target {study_dir if argv else ''}".strip())
    print(path.read_text())


if __name__ == "__main__":
    main()

"""Time to target on stn-vs-bo-digits: the wall time each arm needs to reach the final best
validation loss of the best black-box arm (grid, random, tpe, gp) at the same seed, as a
ratio to the budget, per seed. The STN paper reports beating BayesOpt's best in under a
quarter of its time on CIFAR-10.

    python -m bench.run time_to_target [STUDY_DIR]   (without one, runs configs/stn-vs-bo-digits.yaml)

Results go to results/time_to_target.md for stn-vs-bo-digits, time_to_target-<study name>.md
for another study (the mnist-5k CNN study's: time_to_target-stn-vs-bo-mnist5k-cnn.md).
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
    from hypersweep.orchestrator.report import anytime_curves, load_study_records, time_to_reach
    from hypersweep.orchestrator.searches import BLACK_BOX
    from hypersweep.orchestrator.studydir import StudyDir
    if argv:
        study_dir = Path(argv[0])
    else:
        import tempfile

        from hypersweep.orchestrator.runner import run_study
        from hypersweep.orchestrator.study import load_study
        study_dir = Path(tempfile.mkdtemp()) / "stn-vs-bo-digits"
        run_study(load_study(CONFIG), StudyDir(study_dir), tracking_uri=f"sqlite:///{study_dir.parent / 'mlflow.db'}", live=False)
    df, arms, study = load_study_records(StudyDir(study_dir))
    budget = study["budget"]["seconds"]
    curves = anytime_curves(df)
    finals = curves.groupby(["arm", "seed_index"]).best_val_loss.last()
    searches = df.groupby("arm").search.first()
    black_box = [a for a in searches.index if searches[a] in BLACK_BOX]
    # Seeds where a black-box arm has reported (a study still running has the others to come).
    seeds = [int(s) for s in sorted(df.seed_index.unique()) if any((a, s) in finals.index for a in black_box)]
    if not seeds:
        sys.exit(f"time_to_target: no black-box arm ({', '.join(BLACK_BOX)}) has reported in {study_dir}")
    # Per seed, the target is the best black-box arm's final best val loss at that seed (arms are paired by seed).
    targets = {s: float(min(finals.loc[(a, s)] for a in black_box if (a, s) in finals.index)) for s in seeds}
    rows = []
    for arm in [a["name"] for a in study["arms"]]:
        ratios = []
        for s in seeds:
            c = curves[(curves.arm == arm) & (curves.seed_index == s)]
            ratios.append(time_to_reach(c, targets[s]) / budget if len(c) else math.nan)
        hit = [r for r in ratios if not math.isnan(r)]
        rows.append({"arm": arm, "search": searches.get(arm, ""),
                     "ratio per seed": ", ".join("never" if math.isnan(r) else f"{r:.2f}" for r in ratios),
                     "median ratio (seeds that reached it)": float(np.median(hit)) if hit else "never",
                     "seeds reaching": f"{len(hit)}/{len(ratios)}"})
    text = (f"Study {study_dir} ({study['name']}, {study['seeds']} seeds, {budget:g} s per arm x seed). Target per "
            f"seed: the best black-box arm's final best val_loss at that seed ("
            + ", ".join(f"seed {s}: {t:.4f}" for s, t in targets.items()) + "). Ratio = time to reach it / budget; "
            "the black-box arm that set the target reaches it by definition.\n\n" + md_table(rows))
    name = "time_to_target" if study["name"] == "stn-vs-bo-digits" else f"time_to_target-{study['name']}"
    path = write(name, {"study_dir": str(study_dir), "targets": targets,
                                     "budget_s": budget, "rows": rows}, text,
                 f"python -m bench.run time_to_target {study_dir if argv else ''}".strip())
    print(path.read_text())


if __name__ == "__main__":
    main()

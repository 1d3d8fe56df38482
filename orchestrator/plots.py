"""Plots the coordinator attaches to MLflow runs (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def schedule_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Hyperparameter schedules (`hp/<name>` per report) against epochs: one panel for rates
    and strengths in [0, 1], one for the others (cutout length and holes, input noise > 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted({k[3:] for row in rows for k in row if k.startswith("hp/")})
    epochs = [row["epoch"] for row in rows]
    wide = [n for n in names if max(row.get(f"hp/{n}", 0.0) for row in rows) > 1.0]
    unit = [n for n in names if n not in wide]
    fig, axes = plt.subplots(1, 2 if wide else 1, figsize=(10 if wide else 6, 3.5), squeeze=False)
    for ax, group in zip(axes[0], (unit, wide)):
        for name in group:
            ax.plot(epochs, [row.get(f"hp/{name}") for row in rows], label=name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("value")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

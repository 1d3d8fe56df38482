"""The results store: Parquet files under the study directory, one row per trial report.

Each arm x seed is written to its own part file (`results/<arm>__seed<k>.parquet`) when it
ends, and `results.parquet` is rewritten from all parts; both writes go to a temporary file
renamed into place, so a crash never leaves a half-written table.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

# Columns every row has; metrics and `hp_<name>` hyperparameter columns follow.
KEY_COLUMNS = ["study_id", "arm", "method", "search", "dataset", "seed_index", "seed", "trial_id",
               "step", "arm_time_s"]


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class ResultsStore:
    def __init__(self, study_dir: Path):
        self.study_dir = Path(study_dir)
        self.parts_dir = self.study_dir / "results"
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def write_part(self, arm: str, seed_index: int, rows: list[dict[str, Any]]) -> Path:
        path = self.parts_dir / f"{arm}__seed{seed_index}.parquet"
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=KEY_COLUMNS)
        _atomic_parquet(df[KEY_COLUMNS + [c for c in df.columns if c not in KEY_COLUMNS]], path)
        return path

    def read_part(self, arm: str, seed_index: int) -> pd.DataFrame | None:
        path = self.parts_dir / f"{arm}__seed{seed_index}.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    def consolidate(self) -> Path:
        parts = sorted(self.parts_dir.glob("*.parquet"))
        frames = [pd.read_parquet(p) for p in parts]
        frames = [f for f in frames if not f.empty]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEY_COLUMNS)
        path = self.study_dir / "results.parquet"
        _atomic_parquet(df, path)
        return path

"""What the terminal shows: a live table while the study runs, a summary table at the end."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hypersweep.orchestrator import budget


@dataclass
class ArmStatus:
    arm: str
    seed_index: int
    budget_s: float
    status: str = "pending"
    elapsed_s: float = 0.0
    trials_started: int = 0
    trials_done: int = 0
    reports: int = 0
    best_val_loss: float = math.inf
    best_row: dict = field(default_factory=dict)  # the report with the lowest val_loss
    wall_time_used_s: float = 0.0
    interruptions: int = 0  # times the coordinator died or was stopped while this arm ran
    trial_errors: int = 0  # trials that failed for good (after their retries)
    extensions: int = 0  # times `resume --budget-s` lengthened this arm after it had run out its budget
    trial_resources: dict = field(default_factory=dict)  # Ray resources of each of its trials (planning.trial_resources)
    timeline: dict = field(default_factory=dict)  # the arm's last Tune run: where its time went (tune_run.LiveArm)
    # compute its trials used: CPU time of their processes (from setup to their last report) and
    # GPU-seconds (each trial's wall time x the GPUs it was given: an allocation, not a measurement)
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    reason: str = ""  # why it failed, in one line (arms.json, the arm run's `error` tag, the CLI's last words)

    @property
    def ended(self) -> bool:
        return self.status in ("done", "failed")

    @property
    def within_budget(self) -> bool:
        return budget.within_budget(self.wall_time_used_s, self.budget_s)


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def quality_columns(task: str) -> tuple[str, str]:
    return ("val_error", "test_error") if task == "classification" else ("val_rmse", "test_rmse")


class ProgressView:
    """Rows of ArmStatus rendered live (rich); silent when `enabled` is False."""

    def __init__(self, statuses: list[ArmStatus], task: str, console: Console, enabled: bool = True):
        self.statuses, self.task, self.console = statuses, task, console
        self.live = Live(get_renderable=self.render, console=console, refresh_per_second=2,
                         transient=False) if enabled else None

    def render(self) -> Table:
        val_col, _ = quality_columns(self.task)
        table = Table(title="hypersweep: running", title_justify="left")
        for col in ("arm", "seed", "status", "elapsed / budget", "trials done/started", "best val_loss", val_col):
            table.add_column(col)
        for s in self.statuses:
            table.add_row(s.arm, str(s.seed_index), s.status, f"{s.elapsed_s:5.1f} / {s.budget_s:.0f} s",
                          f"{s.trials_done}/{s.trials_started}", _fmt(s.best_val_loss),
                          _fmt(s.best_row.get(val_col)))
        return table

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)


def summary_table(statuses: list[ArmStatus], task: str) -> Table:
    val_col, test_col = quality_columns(task)
    table = Table(title="hypersweep: summary (best report by val_loss per arm x seed)", title_justify="left")
    for col in ("arm", "seed", "status", "best val_loss", val_col, f"{test_col} at best val", "wall time used (s)",
                "within budget", "CPU time (s)", "trials"):
        table.add_column(col, justify="left" if col in ("arm", "status") else "right")
    for s in statuses:
        table.add_row(s.arm, str(s.seed_index), s.status, _fmt(s.best_val_loss), _fmt(s.best_row.get(val_col)),
                      _fmt(s.best_row.get(test_col)), f"{s.wall_time_used_s:.1f}", "yes" if s.within_budget else "NO",
                      f"{s.cpu_s:.1f}", str(s.trials_started))
    return table


def summary_markdown(statuses: list[ArmStatus], task: str) -> str:
    val_col, test_col = quality_columns(task)
    lines = [f"| arm | seed | status | best val_loss | {val_col} | {test_col} at best val | wall time used (s) | "
             "within budget | CPU time (s) | GPU (s) | trials |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in statuses:
        lines.append(f"| {s.arm} | {s.seed_index} | {s.status} | {_fmt(s.best_val_loss)} | "
                     f"{_fmt(s.best_row.get(val_col))} | {_fmt(s.best_row.get(test_col))} | "
                     f"{s.wall_time_used_s:.1f} | {'yes' if s.within_budget else 'NO'} | {s.cpu_s:.1f} | "
                     f"{s.gpu_s:.1f} | {s.trials_started} |")
    failed = [f"- {s.arm} seed {s.seed_index} failed: {s.reason}" for s in statuses if s.status == "failed" and s.reason]
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n\nEvery arm x seed had the same wall-clock budget on the same resources (a one-trial " \
        "arm: every worker slot's CPUs as torch threads, or one whole GPU). CPU time: what its trials' processes used " \
        "from their setup to their last report; GPU: each trial's wall time x the GPUs it was given.\n"

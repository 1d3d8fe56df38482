"""The `hypersweep` command.

Every command exits 0 on success, 2 on bad input (one line on stderr naming what is wrong,
nothing created), 1 when a run itself fails. Heavy libraries (torch, Ray, MLflow) load inside
the commands that need them, so `--help` is instant.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click


def _bad_input(message: str) -> None:
    click.echo(f"hypersweep: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hypersweep")
def main() -> None:
    """Compare hypernetwork methods, Self-Tuning Networks and Ray Tune searches at equal
    wall-clock budget, with every record in MLflow.

    \b
    Example:
      hypersweep validate configs/quickstart.yaml
      hypersweep run configs/quickstart.yaml
      mlflow ui --backend-store-uri sqlite:///mlflow.db
    """


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
def validate(study_file: str) -> None:
    """Check a study file without running anything.

    \b
    Example:
      hypersweep validate configs/quickstart.yaml
    """
    from orchestrator.planning import plan
    from orchestrator.study import StudyError, load_study
    try:
        study = load_study(study_file)
    except StudyError as e:
        _bad_input(str(e))
    units = plan(study)
    click.echo(f"{study_file}: ok: study {study.name!r}, dataset {study.dataset.name}, {len(study.arms)} arms x "
               f"{study.seeds} seeds = {len(units)} runs of {study.budget.seconds:g} s each "
               f"({len(units) * study.budget.seconds / 60:.1f} min of budget)")


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--study-dir", type=click.Path(file_okay=False), help="Where records go (default studies/<name>-<UTC time>); must not exist.")
@click.option("--budget-s", type=float, help="Override budget.seconds: wall-clock seconds per arm x seed.")
@click.option("--seeds", type=int, help="Override seeds: repetitions of every arm.")
@click.option("--address", help="Ray cluster address (e.g. auto, or HOST:6379); default: a local Ray on this machine's CPUs.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the study's tracking.uri, MLFLOW_TRACKING_URI, sqlite:///mlflow.db).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Override dataset.root for file-based data sets.")
@click.option("--live/--no-live", default=True, help="Live progress table (default on).")
def run(study_file, study_dir, budget_s, seeds, address, tracking_uri, data_root, live) -> None:
    """Run every arm x seed of a study on Ray, each with the same wall-clock budget.

    \b
    Example:
      hypersweep run configs/quickstart.yaml --budget-s 20 --study-dir studies/qs
    """
    from orchestrator.study import StudyError, load_study
    overrides = {k: v for k, v in {"budget.seconds": budget_s, "seeds": seeds, "dataset.root": data_root}.items()
                 if v is not None}
    try:
        study = load_study(study_file, overrides)
    except StudyError as e:
        _bad_input(str(e).replace("budget.seconds", "--budget-s / budget.seconds") if budget_s is not None else str(e))
    from methods.data import DataNotFoundError, check_available
    try:
        check_available(study.dataset.name, study.dataset.root)
    except DataNotFoundError as e:
        _bad_input(str(e))
    from orchestrator.runner import default_study_dir, run_study
    from orchestrator.tracking import resolve_tracking_uri
    target = Path(study_dir) if study_dir else default_study_dir(study)
    if target.exists():
        _bad_input(f"--study-dir {target} already exists; records are never overwritten, choose a new directory")
    try:
        statuses = run_study(study, target, tracking_uri=resolve_tracking_uri(tracking_uri, study.tracking.uri),
                             address=address, live=live)
    except StudyError as e:
        _bad_input(str(e))
    if any(s.status == "failed" for s in statuses):
        click.echo("hypersweep: some arms failed; see the summary and the Tune folders in the study directory", err=True)
        sys.exit(1)


@main.command()
@click.argument("dataset")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Folder to download into.")
def download(dataset: str, data_root: str) -> None:
    """Fetch a file-based data set (mnist, fashion-mnist, cifar10) into DATA_ROOT; needs internet.

    \b
    Example:
      hypersweep download mnist --data-root ~/data
    """
    from methods.data import download as fetch
    try:
        path = fetch(dataset, data_root)
    except ValueError as e:
        _bad_input(str(e))
    click.echo(f"{dataset}: files in {path}")


if __name__ == "__main__":
    main()

"""The `hypersweep` command.

Every command exits 0 on success, 2 on bad input (one line on stderr naming what is wrong,
nothing created), 1 when a run itself fails. Heavy libraries (torch, Ray, MLflow) load inside
the commands that need them, so `--help` is instant.
"""
from __future__ import annotations

import os
import sys

import click


def _bad_input(message: str) -> None:
    click.echo(f"hypersweep: error: {message}", err=True)
    if "hypersweep.orchestrator.runner" in sys.modules:  # a Ray this command started goes too
        sys.modules["hypersweep.orchestrator.runner"].shutdown_ray()
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
@click.argument("study_file")
@click.option("--data-root", help="Override dataset.root for file-based data sets (as run takes it).")
def validate(study_file: str, data_root: str | None) -> None:
    """Check a study file without running anything.

    \b
    Example:
      hypersweep validate configs/quickstart.yaml
    """
    from hypersweep.methods.data import DataNotFoundError, check_available
    from hypersweep.orchestrator.planning import plan
    from hypersweep.orchestrator.study import StudyError, load_study
    try:
        study = load_study(study_file, {"dataset.root": data_root} if data_root else None)
        check_available(study.dataset.name, study.dataset.root)  # what `run` needs first: the data files
    except StudyError as e:
        _bad_input(str(e))
    except DataNotFoundError as e:
        _bad_input(f"{study_file}: dataset: {e}")
    units = plan(study)
    click.echo(f"{study_file}: ok: study {study.name!r}, dataset {study.dataset.name}, {len(study.arms)} arms x "
               f"{study.seeds} seeds = {len(units)} runs of {study.budget.seconds:g} s each "
               f"({len(units) * study.budget.seconds / 60:.1f} min of budget)")


@main.command()
@click.argument("study_file")
@click.option("--study-dir", help="Where records go: a path or a URI (file://, s3://, gs://; default "
              "studies/<name>-<UTC time>); must not exist.")
@click.option("--budget-s", type=float, help="Override budget.seconds: wall-clock seconds per arm x seed.")
@click.option("--seeds", type=int, help="Override seeds: repetitions of every arm.")
@click.option("--address", help="Ray cluster address (e.g. auto, or HOST:6379); default: a local Ray on this machine's CPUs.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the study's tracking.uri, MLFLOW_TRACKING_URI, sqlite:///mlflow.db).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Override dataset.root for file-based data sets.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any study key (dotted; the value is YAML), e.g. --set budget.gpus_per_worker=0.")
@click.option("--live/--no-live", default=True, help="Live progress table (default on).")
@click.option("--register", "register_as", metavar="NAME",
              help="At the end, put the arm x seed model with the lowest validation loss in MLflow's Model Registry as NAME.")
def run(study_file, study_dir, budget_s, seeds, address, tracking_uri, data_root, sets, live, register_as) -> None:
    """Run every arm x seed of a study on Ray, each with the same wall-clock budget.

    \b
    Example:
      hypersweep run configs/quickstart.yaml --budget-s 20 --study-dir studies/qs
    """
    from hypersweep.orchestrator.jobs import JOB_ENV
    from hypersweep.orchestrator.study import StudyError
    _check_register(register_as)
    study = _study_with_overrides(study_file, budget_s, seeds, data_root, sets)
    if os.environ.get(JOB_ENV) and not (tracking_uri or study.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        _bad_input("a submitted study needs an MLflow store that outlives the job (its folder is deleted when it "
                   "ends): submit with --tracking-uri, set the study's tracking.uri, or MLFLOW_TRACKING_URI on the head")
    from hypersweep.methods.data import DataNotFoundError, check_available
    try:
        check_available(study.dataset.name, study.dataset.root)
    except DataNotFoundError as e:
        _bad_input(f"{study_file}: dataset: {e}")
    from hypersweep.orchestrator.runner import default_study_dir, run_study
    from hypersweep.orchestrator.tracking import resolve_tracking_uri
    location = str(study_dir or default_study_dir(study))
    target = _study_dir(location, "--study-dir")
    link = "://" not in location and os.path.islink(os.path.expanduser(location))  # a dangling one too
    if target.exists() or link:
        _bad_input(f"--study-dir {target} already exists{' (a symbolic link)' if link else ''}; records are never "
                   "overwritten, choose a new directory")
    from hypersweep.orchestrator.lease import LeaseHeld, LeaseLost
    from hypersweep.orchestrator.runner import StudyInterrupted
    from hypersweep.orchestrator.studydir import Unwritable
    from hypersweep.orchestrator.tracking import TrackingUnavailable
    from hypersweep.orchestrator.trust import UntrustedFile
    uri = resolve_tracking_uri(tracking_uri, study.tracking.uri)
    _leave_job_folder()
    try:
        statuses = run_study(study, target, tracking_uri=uri, address=address, live=live)
    except (StudyError, TrackingUnavailable, LeaseHeld, UntrustedFile) as e:  # MLflow away at the start: nothing written yet
        _bad_input(str(e))
    except LeaseLost as e:
        _lease_lost(e)
    except StudyInterrupted:
        _interrupted(target)
    except Unwritable as e:
        if not target.is_study():  # it could not even be made
            _bad_input(f"--study-dir {target}: {e.strerror}")
        _unwritable(target, e)
    if register_as:
        from hypersweep.orchestrator.models import MODELS_FILE
        _register_best(target.read_json(MODELS_FILE, default={}, kind=dict), uri, register_as, {})
    _end_of_study(statuses)


def _leave_job_folder() -> None:
    """In a submitted job, once its inputs are read: work from elsewhere than the job's folder
    (Ray may replace that folder while the coordinator connects, seen on a two-node Ray on
    one machine; the trials have their own copy on their node)."""
    from hypersweep.orchestrator.jobs import JOB_ENV
    if os.environ.get(JOB_ENV):
        import tempfile
        os.chdir(tempfile.gettempdir())


def _study_with_overrides(study_file, budget_s, seeds, data_root, sets):
    """The study file with `run`'s overrides applied, validated (bad input: one line, exit 2)."""
    from hypersweep.orchestrator.study import StudyError, load_study
    overrides = {k: v for k, v in {"budget.seconds": budget_s, "seeds": seeds, "dataset.root": data_root}.items()
                 if v is not None}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("arms"):
            _bad_input(f"--set {item!r}: expected KEY=VALUE with a dotted study key outside arms (e.g. budget.workers=4)")
        import yaml
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            _bad_input(f"--set {item!r}: the value is not valid YAML")
    try:
        return load_study(study_file, overrides)
    except StudyError as e:
        _bad_input(str(e).replace("budget.seconds", "--budget-s / budget.seconds") if budget_s is not None else str(e))


def _resume_command(study_dir) -> str:
    from hypersweep.orchestrator.jobs import JOB_ENV
    if os.environ.get(JOB_ENV):  # a submitted study: from the laptop, as it was started
        return f"hypersweep submit --resume {study_dir} --address http://HEAD:8265"
    return f"hypersweep resume {study_dir}"


def _interrupted(study_dir) -> None:
    _shutdown_ray()
    click.echo(f"hypersweep: stopped; the records are consistent. Continue with: {_resume_command(study_dir)}", err=True)
    sys.exit(130)


def _lease_lost(err: Exception) -> None:
    _shutdown_ray()
    click.echo(f"hypersweep: error: {err}", err=True)
    sys.exit(1)


def _unwritable(study_dir, err: OSError) -> None:
    _shutdown_ray()
    click.echo(f"hypersweep: error: the study directory stopped taking writes ({err.strerror}); the study stopped "
               f"with its records as they were. Make room or make it writable, then: {_resume_command(study_dir)}",
               err=True)
    sys.exit(1)


def _end_of_study(statuses) -> None:
    _shutdown_ray()
    failed = [s for s in statuses if s.status == "failed"]
    if failed:
        for s in failed:
            click.echo(f"hypersweep: {s.arm} seed {s.seed_index} failed: {s.reason or 'see its Tune folder'}", err=True)
        click.echo("hypersweep: some arms failed; see the summary and the Tune folders in the study directory", err=True)
        sys.exit(1)


def _shutdown_ray() -> None:
    from hypersweep.orchestrator.runner import shutdown_ray
    shutdown_ray()


@main.command()
@click.argument("study_dir")
@click.option("--budget-s", type=float, help="A longer budget per arm x seed than the recorded one (never shorter); "
              "arms that ran out the old budget go on to the new one.")
@click.option("--address", help="Ray cluster address (e.g. auto, or HOST:6379); default: a local Ray on this machine's CPUs.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the one the study recorded in runs.json).")
@click.option("--data-root", help="Override dataset.root for file-based data sets.")
@click.option("--live/--no-live", default=True, help="Live progress table (default on).")
@click.option("--break-lease", is_flag=True, help="Take the study over from a coordinator that still looks alive "
              "(its heartbeat is recent): it stops at its next heartbeat without writing more. Asks first.")
@click.option("--yes", "-y", is_flag=True, help="With --break-lease: do not ask.")
@click.option("--trust-study-dir", is_flag=True, help="Restore Ray Tune's state (pickles) as the study directory "
              "holds it, not only the copy this user's coordinator signed; recorded on the study's MLflow run.")
def resume(study_dir, budget_s, address, tracking_uri, data_root, live, break_lease, yes, trust_study_dir) -> None:
    """Continue a study whose coordinator died or was stopped (SIGKILL, Ctrl-C, a closed
    terminal, a lost head node): finished arms are kept, the interrupted arm's Tune experiment
    is restored from its checkpoints and charged the wall time it had used, the remaining arms
    run, and the same MLflow runs continue.

    One coordinator per study: a study another coordinator holds (its lease has a recent
    heartbeat) is refused; a dead one's lease is taken over at once on its host, after 60 s
    without a heartbeat from another.

    \b
    Example:
      hypersweep resume studies/quickstart-20261123-101500
      hypersweep resume /shared/studies/qs --break-lease   # its old head is unreachable
    """
    from hypersweep.orchestrator.lease import LeaseHeld, LeaseLost
    from hypersweep.orchestrator.runner import StudyInterrupted, resume_study
    from hypersweep.orchestrator.study import StudyError
    from hypersweep.orchestrator.studydir import CorruptFile, Unwritable
    from hypersweep.orchestrator.tracking import TrackingUnavailable
    from hypersweep.orchestrator.trust import UntrustedFile
    if yes and not break_lease:
        _bad_input("--yes goes with --break-lease")
    target = _study_dir(study_dir, "STUDY_DIR")
    _leave_job_folder()

    def take_over(holder, description: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            _bad_input(f"{target} is held by another coordinator: {description}; --break-lease needs --yes "
                       "where there is no terminal to ask")
        return click.confirm(f"{target} is held by {description}. Take it over? That coordinator stops at its next "
                             "heartbeat without writing more", err=True)

    try:
        statuses = resume_study(target, tracking_uri=tracking_uri, address=address, data_root=data_root,
                                budget_s=budget_s, live=live, take_over=take_over if break_lease else None,
                                trust_study_dir=trust_study_dir)
    except (StudyError, TrackingUnavailable, CorruptFile, LeaseHeld, UntrustedFile) as e:
        _bad_input(str(e))
    except LeaseLost as e:
        _lease_lost(e)
    except StudyInterrupted:
        _interrupted(target)
    except Unwritable as e:
        _unwritable(target, e)
    if statuses is None:
        click.echo(f"{target}: the study has finished; nothing to resume")
        return
    _end_of_study(statuses)


def _study_dir(location, option: str):
    """A StudyDir for a local path or a URI pyarrow opens; a URI it cannot open is bad input."""
    from hypersweep.orchestrator.studydir import StudyDir
    try:
        return StudyDir(location)
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme, missing credentials, ...
        _bad_input(f"{option} {location}: cannot open it ({str(e).splitlines()[0]})")


@main.command()
@click.argument("dataset")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Folder to download into.")
def download(dataset: str, data_root: str) -> None:
    """Fetch a file-based data set (mnist, fashion-mnist, cifar10) into DATA_ROOT; needs internet.

    \b
    Example:
      hypersweep download mnist --data-root ~/data
    """
    from hypersweep.methods.data import download as fetch
    try:
        path = fetch(dataset, data_root)
    except ValueError as e:
        _bad_input(str(e))
    click.echo(f"{dataset}: files in {path}")


def _print_rows(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for key in rows[0]:
        t.add_column(str(key), justify="left" if key == "arm" else "right")
    for row in rows:
        t.add_row(*(str(v) for v in row.values()))
    Console(width=160).print(t)


def _tracker_for(recorded: str | None, flag: str | None, run_id: str | None, study_id: str | None = None):
    """A Tracker for logging to an existing run of a study, or None (with a line saying why):
    the store is the one the user names, or the study's own when it is on this machine
    (tracking.choose_store); the run must be in it, and belong to this study directory (a
    copied one keeps the original's run ids)."""
    if not run_id:
        return None
    from hypersweep.orchestrator.tracking import Tracker, TrackingUnavailable, choose_store
    uri, why_not = choose_store(recorded, flag)
    if uri is None:
        click.echo(f"hypersweep: MLflow: nothing logged: {why_not}", err=True)
        return None
    try:
        tracker = Tracker(uri, None)
        run = tracker.client.get_run(run_id)
    except TrackingUnavailable as e:
        click.echo(f"hypersweep: MLflow: nothing logged: {e}", err=True)
        return None
    except Exception:  # MlflowException: no such run here
        click.echo(f"hypersweep: MLflow: nothing logged: run {run_id} is not in the store at {uri}", err=True)
        return None
    owner = run.data.tags.get("study_id")
    if study_id and owner and owner != study_id:
        click.echo(f"hypersweep: MLflow: nothing logged: run {run_id} belongs to study {owner}, not {study_id} "
                   "(a copied study directory?)", err=True)
        return None
    return tracker


@main.command()
@click.argument("path")
@click.option("--members", "-k", type=int, required=True, help="K: weight samples of a generative method, or the K best trials of any other.")
@click.option("--arm", help="Only this arm (default: every arm).")
@click.option("--seed-index", type=int, help="Only this repetition (default: every one).")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the generator that draws the members.")
@click.option("--out", help="Output folder, a path or a URI (default PATH/ensembles); must not hold an ensemble already.")
@click.option("--distill/--no-distill", default=True, help="Also the Polyak averages (as `hypersweep distill`).")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, help="Record on the arm's MLflow run (default on).")
@click.option("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the study's own when it is "
              "on this machine).")
@click.option("--address", help="Compute on this Ray cluster (default: in this process).")
def ensemble(path, members, arm, seed_index, sample_seed, out, distill, use_mlflow, tracking_uri, address) -> None:
    """Ensembles from a study directory (every arm x seed) or one trial directory
    (STUDY/tune/ARM-seedI/TRIAL): K members each, evaluated by mean prediction and majority
    vote, written to ensemble.parquet.

    \b
    Example:
      hypersweep ensemble studies/qs --members 16 --arm hyper-diverse
    """
    from hypersweep.orchestrator.ensembles import ENSEMBLE_FILE, member_sources, run_ensemble, table
    from hypersweep.orchestrator.studydir import CorruptFile, Folder
    from hypersweep.orchestrator.trials import TRIAL_FILE, Compute, EnsembleError, find_trials, groups
    root = _study_dir(path, "PATH")
    try:
        todo = groups(find_trials(root), arm, seed_index)
        for trials in todo.values():  # every group checked before anything is written
            member_sources(trials, members)
    except (EnsembleError, CorruptFile) as e:
        _bad_input(str(e))
    single_trial = len(todo) == 1 and root.is_file(TRIAL_FILE)
    base = Folder(out) if out else root.sub("ensemble" if single_trial else root.ENSEMBLES)
    folders = {key: base if single_trial else base.sub(f"{key[0]}-seed{key[1]}") for key in todo}
    taken = [str(f) for f in folders.values() if f.exists(ENSEMBLE_FILE)]
    if taken:
        _bad_input(f"{taken[0]} already holds an ensemble; records are never overwritten, pass --out NEW_FOLDER")
    if address:
        from hypersweep.orchestrator.runner import init_ray
        init_ray(address)
    compute = Compute(use_ray=bool(address))
    results = {}
    study_id = root.study_id if root.is_study() else None
    for key, trials in todo.items():
        tracker = _tracker_for(trials[0].tracking_uri, tracking_uri, trials[0].run_id, study_id) if use_mlflow else None
        try:
            results[key] = run_ensemble(trials, members, folders[key], compute, sample_seed=sample_seed,
                                        distill_too=distill, tracker=tracker)
        except (EnsembleError, CorruptFile) as e:
            _bad_input(str(e))
    _print_rows(table(results), f"ensembles of {members} (test split)")
    click.echo(f"written: {base}")


@main.command()
@click.argument("study_dirs", nargs=-1, required=True)
@click.option("--log-time", is_flag=True, help="Logarithmic time axis in anytime.png.")
@click.option("--band", type=click.Choice(["median", "mean"]), default="median", show_default=True,
              help="median with the interquartile band, or mean with a 95% confidence interval.")
@click.option("--last", "last_k", type=click.IntRange(min=0), default=0,
              help="Also the test metric averaged over the best trial's last K reports (mean +- s.e. over seeds).")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, help="Log report.md and anytime.png on the study's parent run.")
@click.option("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the study's own when it is "
              "on this machine).")
def compare(study_dirs, log_time, band, last_k, use_mlflow, tracking_uri) -> None:
    """Compare the arms of one or more studies (finished or still running): writes
    STUDY/report.md (per arm: final best val loss over seeds, test metric at best val, time
    to reach the best black-box arm's final val loss, wall time used, trials) and
    STUDY/anytime.png (best val loss against arm wall time, aggregated over seeds).

    \b
    Example:
      hypersweep compare studies/stn-vs-bo-digits-20261122-101500 --log-time
    """
    from hypersweep.orchestrator.report import (anytime_curves, anytime_plot, arm_table, code_sentence, html_report,
                                                intro, load_study_records, markdown)
    from hypersweep.orchestrator.studydir import CorruptFile
    loaded = []
    for d in study_dirs:
        path = _study_dir(d, "STUDY_DIR")
        if not path.is_study():
            _bad_input(f"{path}: not a study directory (no study.yaml)")
        try:
            (df, arms, study), meta = load_study_records(path), path.runs()
        except CorruptFile as e:
            _bad_input(str(e))
        if df.empty or "val_loss" not in df:
            _bad_input(f"{path}: no reports recorded yet")
        loaded.append((path, df, arms, study, meta))
    texts = []
    for path, df, arms, study, meta in loaded:
        table, baseline = arm_table(df, arms, last_k)
        order = {a["name"]: i for i, a in enumerate(study["arms"])}  # the study file's order
        table = table.sort_values("arm", key=lambda col: col.map(order)).reset_index(drop=True)
        expected = len(study["arms"]) * study["seeds"]
        done = sum(a["status"] in ("done", "failed") for a in arms.values())
        status = ("finished" if done == expected else f"still running or stopped: {done}/{expected} arm x seed runs ended"
                  if arms else "no arms.json: the study ran under an older hypersweep or has not ended an arm yet")
        b = study["budget"]
        if b.get("schedule", "sequential") == "sequential":
            how = f"one after another, each on the whole allocation ({b['workers']} worker slots)"
        else:
            how = f"concurrently, {b['workers'] // len(study['arms'])} of {b['workers']} worker slots each"
        code = code_sentence(meta.get("code"))
        text = markdown(study["name"], table, baseline, b["seconds"], how, status, code)
        path.write_text(path.REPORT, text)
        curves = anytime_curves(df)
        with path.writing(path.ANYTIME) as local:
            anytime_plot(curves, local, title=study["name"], log_time=log_time, how=band)
        path.write_text(path.REPORT_HTML, html_report(study["name"], intro(baseline, b["seconds"], how, status, code),
                                                      table, curves, how=band))
        tracker = _tracker_for(meta.get("tracking_uri"), tracking_uri, meta.get("parent_run_id"),
                               path.study_id) if use_mlflow else None
        if tracker is not None:
            for name in (path.REPORT, path.REPORT_HTML, path.ANYTIME):
                with path.reading(name) as local:
                    tracker.log_artifact(meta["parent_run_id"], local, "report")
            if status == "finished":  # the models the study's end could not log (MLflow was away then)
                from hypersweep.orchestrator.models import log_arm_models
                tracker.flush()
                log_arm_models(path, tracker.uri, meta.get("arms", {}))
        texts.append(text)
        click.echo(text)
    click.echo(f"written: {', '.join(f'{p[0]}/{p[0].REPORT}' for p in loaded)} (+ report.html, anytime.png)")
    for path, *_, meta in loaded:  # where to look at it: the links `run` printed, or the UI command
        uri = tracking_uri or meta.get("tracking_uri") or ""
        if use_mlflow and uri.startswith(("http://", "https://")):
            from hypersweep.orchestrator.ui import study_links
            for what, link in study_links(uri.rstrip("/"), meta):
                click.echo(f"  {what}: {link}")
        elif use_mlflow and meta.get("parent_run_id"):
            click.echo(f"browse it: hypersweep ui {path}")


@main.command("ensembles-report")
@click.argument("study_dir")
def ensembles_report(study_dir) -> None:
    """Summarise the ensembles of a study over its seeds (mean +- std per arm) into
    STUDY_DIR/ensembles.md and print it.

    \b
    Example:
      hypersweep ensembles-report studies/ensembles-digits
    """
    from hypersweep.orchestrator.ensembles import arm_methods, collected, report_markdown
    from hypersweep.orchestrator.studydir import CorruptFile
    folder = _study_dir(study_dir, "STUDY_DIR")
    try:
        results = collected(folder)
    except CorruptFile as e:
        _bad_input(str(e))
    if not results:
        _bad_input(f"{study_dir}: no ensembles under ensembles/ (an arm's `ensemble:` or `hypersweep ensemble` makes them)")
    text = report_markdown(results, methods=arm_methods(folder))
    folder.write_text(folder.ENSEMBLES_REPORT, text)
    click.echo(text, nl=False)


@main.command("distill")
@click.argument("path")
@click.option("--out", help="Output folder, a path or a URI (default: the ensemble's folder).")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, help="Record on the source arm's MLflow run (default on).")
@click.option("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the study's own when it is "
              "on this machine).")
@click.option("--register", "register_as", metavar="NAME",
              help="Put the Polyak average with the lower validation loss in MLflow's Model Registry as NAME.")
def distill_command(path, out, use_mlflow, tracking_uri, register_as) -> None:
    """Polyak-average the members of an ensemble (ensemble.parquet, or its folder): raw weights
    and, for the plain ReLU nets, gauge-fixed weights; evaluate and save them.

    \b
    Example:
      hypersweep distill studies/qs/ensembles/hyper-diverse-seed0
    """
    from hypersweep.orchestrator.ensembles import (DISTILL_FILE, ENSEMBLE_FILE, distill, headline, histogram,
                                                   read_ensemble, record, table)
    from hypersweep.orchestrator.studydir import CorruptFile, Folder
    from hypersweep.orchestrator.trials import Compute, EnsembleError
    _check_register(register_as)
    source = Folder(path)
    name = ENSEMBLE_FILE
    if source.is_file(""):  # PATH is the table itself
        source, name = Folder(source.path.rsplit("/", 1)[0] or "/", source.fs), source.name
    try:
        ens, meta = read_ensemble(source, name)
    except (EnsembleError, CorruptFile) as e:
        _bad_input(str(e))
    folder = Folder(out) if out else source
    done = [name for name in (DISTILL_FILE, "distilled-raw.pt", "distilled-gauge.pt") if folder.exists(name)]
    if done:
        _bad_input(f"{folder} already holds a distillation ({done[0]}); records are never overwritten, "
                   "pass --out NEW_FOLDER")
    if not ens.metrics:
        from hypersweep.workers.ensemble import evaluate_weights
        ens.metrics = evaluate_weights(ens.config, ens.weights, ens.log_noise_std)
    distilled = distill(ens, folder, Compute())
    histogram(ens, distilled, folder)
    metrics = headline(ens, distilled)
    tracker = _tracker_for(meta.get("tracking_uri"), tracking_uri, meta.get("source_run")) if use_mlflow else None
    models = record(tracker, meta["source_run"], metrics, folder) if tracker is not None else {}
    _print_rows(table({(meta.get("arm", "?"), meta.get("seed_index", 0)): metrics}), "Polyak-distilled (test split)")
    click.echo(f"written: {folder}")
    for kind, entry in models.items():
        click.echo(f"MLflow model distilled-{kind}: {entry['model_uri']} (on run {entry['run_id']})")
    if register_as:
        _register_best(models, tracker.uri if tracker is not None else None, register_as,
                       {kind: f"distilled-{kind}" for kind in models})


def _check_register(name: str | None) -> None:
    """--register NAME, checked before anything is written."""
    if name is not None:
        from hypersweep.orchestrator.models import ModelError, check_model_name
        try:
            check_model_name(name)
        except ModelError as e:
            _bad_input(str(e))


def _register_best(models: dict, uri: str | None, name: str, labels: dict) -> None:
    """Register the logged model with the lowest validation loss as a new version of NAME."""
    from hypersweep.orchestrator.models import best_of, register
    from hypersweep.orchestrator.tracking import one_line
    try:
        key, entry = best_of(models)
        ref = register(uri, entry["model_uri"], name)
    except Exception as e:  # ModelError (nothing logged), the registry refusing or away
        click.echo(f"hypersweep: error: --register {name}: {one_line(e)}", err=True)
        sys.exit(1)
    click.echo(f"registered {labels.get(key, key)} ({entry['model_uri']}) as {ref}")


@main.group()
def cluster() -> None:
    """Start, inspect and stop a Ray cluster for studies, from a file in configs/cluster/
    (Ray's cluster launcher: aws-gpu, gcp-gpu, onprem; kuberay.yaml is applied with kubectl).

    \b
    Example:
      hypersweep cluster up configs/cluster/aws-gpu.yaml --dry-run
      hypersweep cluster up configs/cluster/aws-gpu.yaml
      hypersweep cluster down configs/cluster/aws-gpu.yaml
    """


def _cluster_file(path: str) -> dict:
    """A launcher file, checked as `ray up` checks it (bad input: one line, exit 2)."""
    import copy

    from hypersweep.orchestrator.study import StudyError, load_yaml, read_study_text
    try:
        config = load_yaml(read_study_text(path), path)
    except StudyError as e:
        _bad_input(str(e).replace("study file", "cluster file"))
    if isinstance(config, dict) and config.get("kind") == "RayCluster":
        _bad_input(f"{path}: a KubeRay RayCluster manifest, not a launcher file: kubectl apply -f {path} "
                   "(then kubectl port-forward svc/<name>-head-svc 8265:8265)")
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # (its INFO lines about filled-in defaults)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # jsonschema's ValidationError, Ray's ValueError: the first line says it
        where = ".".join(str(p) for p in getattr(e, "absolute_path", ()))
        message = getattr(e, "message", None) or str(e)
        _bad_input(f"{path}: {where + ': ' if where else ''}{message.splitlines()[0] if message else type(e).__name__}")
    return prepared


def _ray_cli(*args: str) -> None:
    """Ray's cluster launcher CLI, its output streamed; a failure is one line naming it (exit 1)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args])
    if r.returncode != 0:
        click.echo(f"hypersweep: error: `ray {' '.join(args)}` failed (exit {r.returncode}); see its output above",
                   err=True)
        sys.exit(1)


@cluster.command("up")
@click.argument("cluster_file")
@click.option("--dry-run", is_flag=True, help="Check the file and print what would be launched; start nothing.")
def cluster_up(cluster_file: str, dry_run: bool) -> None:
    """Start (or update) the cluster: `ray up`, after the same checks.

    \b
    Example:
      hypersweep cluster up configs/cluster/aws-gpu.yaml --dry-run
      hypersweep cluster up configs/cluster/aws-gpu.yaml
    """
    config = _cluster_file(cluster_file)
    if dry_run:
        provider = config["provider"]
        click.echo(f"cluster {config['cluster_name']!r} on {provider['type']}"
                   f"{' ' + provider['region'] if provider.get('region') else ''}; head node type "
                   f"{config['head_node_type']!r}")
        for name, node in config["available_node_types"].items():
            kind = node.get("node_config", {})
            machine = kind.get("InstanceType") or kind.get("machineType") or "given machines"
            click.echo(f"  {name}: {machine}, workers {node.get('min_workers', 0)}-{node.get('max_workers', 0)}, "
                       f"resources {node.get('resources', {}) or 'detected'}")
        for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
            click.echo(f"  {key}:")
            for command in config.get(key, []):
                click.echo(f"    {command}")
        click.echo("nothing was started (--dry-run)")
        return
    from hypersweep.orchestrator.trust import UntrustedFile, key_file, study_key
    try:
        study_key()  # the file the cluster file copies to the head (made here on first use)
    except UntrustedFile as e:
        _bad_input(str(e))
    click.echo(f"the head gets this user's key that signs Tune's state: {key_file()}")
    _ray_cli("up", "-y", cluster_file)


@cluster.command("down")
@click.argument("cluster_file")
def cluster_down(cluster_file: str) -> None:
    """Stop the cluster and its nodes: `ray down`.

    \b
    Example:
      hypersweep cluster down configs/cluster/aws-gpu.yaml
    """
    _cluster_file(cluster_file)
    _ray_cli("down", "-y", cluster_file)


@cluster.command("status")
@click.argument("cluster_file")
def cluster_status(cluster_file: str) -> None:
    """Nodes and resources of the running cluster (`ray status` on its head).

    \b
    Example:
      hypersweep cluster status configs/cluster/aws-gpu.yaml
    """
    _cluster_file(cluster_file)
    _ray_cli("exec", cluster_file, "ray status")


@cluster.command("attach")
@click.argument("cluster_file")
def cluster_attach(cluster_file: str) -> None:
    """A shell on the head node: `ray attach`.

    \b
    Example:
      hypersweep cluster attach configs/cluster/aws-gpu.yaml
    """
    _cluster_file(cluster_file)
    _ray_cli("attach", cluster_file)


@main.command()
@click.argument("study_dir", required=False)
@click.option("--tracking-uri", help="MLflow store (default: the one the study recorded, else MLFLOW_TRACKING_URI, "
              "else sqlite:///mlflow.db).")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True,
              help="Port on 127.0.0.1 (0: any free one).")
def ui(study_dir, tracking_uri, port) -> None:
    """The MLflow UI on a study's store, on 127.0.0.1, with links to the arm runs (in MLflow's
    model-training view), the study run and a compare page per seed; Ctrl-C stops it. With a
    store that is an MLflow server already, only the links.

    \b
    Example:
      hypersweep ui studies/quickstart-20261123-101500
    """
    from hypersweep.orchestrator import ui as ui_api
    from hypersweep.orchestrator.studydir import CorruptFile
    from hypersweep.orchestrator.tracking import artifact_root, choose_store
    runs: dict = {}
    if study_dir:
        target = _study_dir(study_dir, "STUDY_DIR")
        if not target.is_study():
            _bad_input(f"{study_dir}: not a study directory (no study.yaml and runs.json)")
        try:
            runs = target.runs()
        except CorruptFile as e:
            _bad_input(str(e))
    uri, why = choose_store(runs.get("tracking_uri"), tracking_uri)
    if why:
        _bad_input(why)
    if uri.startswith(("http://", "https://")):
        for what, link in ui_api.study_links(uri.rstrip("/"), runs):
            click.echo(f"{what}: {link}")
        return
    port = port or ui_api.free_port()
    import socket
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            _bad_input(f"--port {port}: something listens there already; choose another (or --port 0)")
    import tempfile
    from pathlib import Path
    log = Path(tempfile.mkdtemp(prefix="hypersweep-ui-")) / "mlflow-server.log"
    base = f"http://127.0.0.1:{port}"
    proc = ui_api.start_server(uri, port, artifact_root(uri), log)
    try:
        if not ui_api.wait_until_up(base, proc):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            click.echo(f"hypersweep: error: the MLflow UI did not start on {uri} ({tail[0] if tail else 'no output'}; "
                       f"log: {log})", err=True)
            sys.exit(1)
        click.echo(f"MLflow UI on {base} over {uri} (Ctrl-C stops it)")
        for what, link in ui_api.study_links(base, runs):
            click.echo(f"  {what}: {link}")
        proc.wait()
        click.echo(f"hypersweep: error: the MLflow UI stopped by itself; log: {log}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        ui_api.stop_server(proc)


def _jobs_client(address):
    from hypersweep.orchestrator.jobs import JobsError, client
    try:
        return client(address)
    except JobsError as e:
        _bad_input(str(e))


_ADDRESS_HELP = "The cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)."


@main.command()
@click.argument("study_file", required=False)
@click.option("--address", help=_ADDRESS_HELP)
@click.option("--study-dir", help="Where the records go, on storage every node and a later head reach: a shared "
              "path (/shared/studies/NAME) or a bucket (s3://..., gs://...); must not exist.")
@click.option("--resume", "resume_dir", metavar="STUDY_DIR", help="Continue this study directory on the cluster "
              "(as `hypersweep resume`), instead of a new study.")
@click.option("--budget-s", type=float, help="As `run` (with --resume: a longer budget, as `resume`).")
@click.option("--seeds", type=int, help="As `run`.")
@click.option("--tracking-uri", help="MLflow store the head reaches (default: the study's tracking.uri, else "
              "MLFLOW_TRACKING_URI on the head; with --resume: the recorded one).")
@click.option("--data-root", help="Data folder on the cluster (a path on the head and the workers).")
@click.option("--upload-data", type=click.Path(exists=True, file_okay=False),
              help="Send this local data folder with the job (small data only) and use it as the data root.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="As `run`.")
@click.option("--break-lease", is_flag=True, help="With --resume: take the study over from a coordinator that still "
              "looks alive (as `resume --break-lease --yes`).")
@click.option("--trust-study-dir", is_flag=True, help="With --resume: as `resume --trust-study-dir`.")
@click.option("--follow", is_flag=True, help="Then print the job's log until it ends (as `hypersweep logs --follow`).")
def submit(study_file, address, study_dir, resume_dir, budget_s, seeds, tracking_uri, data_root, upload_data, sets,
           break_lease, trust_study_dir, follow) -> None:
    """Run a study on a running Ray cluster as a Ray Job: its coordinator runs on the head,
    records go to --study-dir on the cluster's storage; prints the job id and returns.

    \b
    Example:
      hypersweep submit configs/quickstart.yaml --address http://HEAD:8265 \\
          --study-dir /shared/studies/qs --tracking-uri http://HEAD:5000
      hypersweep logs JOB --follow
      hypersweep submit --resume /shared/studies/qs --address http://HEAD:8265
    """
    from hypersweep.orchestrator import jobs as jobs_api
    if data_root and upload_data:
        _bad_input("give --data-root (a folder on the cluster) or --upload-data (a local folder sent with the job), "
                   "not both")
    options = [*(["--budget-s", repr(budget_s)] if budget_s is not None else []),
               *(["--tracking-uri", tracking_uri] if tracking_uri else []),
               *(["--data-root", data_root] if data_root else [])]
    if (break_lease or trust_study_dir) and not resume_dir:
        _bad_input(f"{'--break-lease' if break_lease else '--trust-study-dir'} goes with --resume STUDY_DIR")
    if resume_dir:
        if study_file or seeds is not None or sets or study_dir:
            _bad_input("--resume STUDY_DIR continues a recorded study: no study file, --study-dir, --seeds or --set")
        name, target = None, resume_dir
        options += (["--break-lease", "--yes"] if break_lease else []) + (["--trust-study-dir"] if trust_study_dir else [])
    else:
        if not study_file:
            _bad_input("give a study file to run, or --resume STUDY_DIR to continue one")
        if not study_dir:
            _bad_input("--study-dir is needed: a shared path or bucket every node and a later head reach (the job's "
                       "own folder is deleted when it ends), e.g. --study-dir /shared/studies/NAME")
        study = _study_with_overrides(study_file, budget_s, seeds, data_root, sets)
        if upload_data:
            from hypersweep.methods.data import DataNotFoundError, check_available
            try:
                check_available(study.dataset.name, upload_data)
            except DataNotFoundError as e:
                _bad_input(f"--upload-data {upload_data}: {e}")
        options += [*(["--seeds", str(seeds)] if seeds is not None else []), *[a for s in sets for a in ("--set", s)]]
        name, target = study.name, study_dir
    if "://" not in target and not os.path.isabs(target):
        _bad_input(f"{'--resume' if resume_dir else '--study-dir'} {target}: give an absolute path on the cluster's "
                   "shared storage (or a URI such as s3://...); a relative one would be inside the job's own folder")
    client = _jobs_client(address)
    try:
        sub = jobs_api.submit(client, study_file=study_file, study_dir=target, resume=bool(resume_dir),
                              options=options, upload_data=upload_data, study_name=name)
    except jobs_api.JobsError as e:
        _bad_input(str(e))
    click.echo(f"submitted: {sub.job_id}")
    click.echo(f"  study directory (on the cluster): {sub.study_dir}")
    click.echo(f"  follow: hypersweep logs {sub.job_id} --follow    stop: hypersweep stop {sub.job_id}")
    if follow:
        _follow(client, sub.job_id)


def _follow(client, job_id: str) -> None:
    """The job's log until it ends; exit 0 when it succeeded, else 1 with its status."""
    from hypersweep.orchestrator import jobs as jobs_api
    try:
        jobs_api.follow(client, job_id)
        job = jobs_api.info(client, job_id)
    except jobs_api.JobsError as e:
        click.echo(f"hypersweep: error: {e}", err=True)
        sys.exit(1)
    status = jobs_api.status_of(job)
    if status != "SUCCEEDED":
        click.echo(f"hypersweep: job {job_id} {status}{': ' + job.message if job.message else ''}", err=True)
        sys.exit(1)


@main.command()
@click.option("--address", help=_ADDRESS_HELP)
def jobs(address) -> None:
    """The cluster's jobs with their status, newest first.

    \b
    Example:
      hypersweep jobs --address http://127.0.0.1:8265
    """
    from hypersweep.orchestrator import jobs as jobs_api
    client = _jobs_client(address)
    try:
        rows = jobs_api.listing(client)
    except jobs_api.JobsError as e:
        _bad_input(str(e))
    if not rows:
        click.echo("no jobs on this cluster")
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(*rows[0])
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)


@main.command()
@click.argument("job_id")
@click.option("--address", help=_ADDRESS_HELP)
@click.option("--follow", "-f", is_flag=True, help="Go on printing until the job ends.")
def logs(job_id, address, follow) -> None:
    """A submitted study's output (its coordinator's, on the head).

    \b
    Example:
      hypersweep logs raysubmit_XYZ --follow
    """
    from hypersweep.orchestrator import jobs as jobs_api
    client = _jobs_client(address)
    try:
        jobs_api.info(client, job_id)  # an unknown id is bad input
        if not follow:
            click.echo(jobs_api.logs(client, job_id), nl=False)
            return
    except jobs_api.JobsError as e:
        _bad_input(str(e))
    _follow(client, job_id)


@main.command()
@click.argument("job_id")
@click.option("--address", help=_ADDRESS_HELP)
@click.option("--wait-s", type=click.FloatRange(min=0), default=150.0, show_default=True,
              help="How long to wait for the study to stop and leave its records consistent.")
def stop(job_id, address, wait_s) -> None:
    """Stop a submitted study as Ctrl-C stops a local one: trials end with their last reports,
    the records stay consistent, and `submit --resume` continues it.

    \b
    Example:
      hypersweep stop raysubmit_XYZ
      hypersweep submit --resume /shared/studies/qs
    """
    import time

    from hypersweep.orchestrator import jobs as jobs_api
    client = _jobs_client(address)
    try:
        job = jobs_api.info(client, job_id)
        study_dir = (job.metadata or {}).get("study_dir")
        if not jobs_api.stop(client, job_id):
            click.echo(f"job {job_id} had ended already ({jobs_api.status_of(job)})")
            return
        end = time.monotonic() + wait_s
        while jobs_api.status_of(job) not in jobs_api.TERMINAL and time.monotonic() < end:
            time.sleep(1.0)
            job = jobs_api.info(client, job_id)
    except jobs_api.JobsError as e:
        _bad_input(str(e))
    status = jobs_api.status_of(job)
    if status not in jobs_api.TERMINAL:
        click.echo(f"hypersweep: job {job_id} is still {status} after {wait_s:.0f} s", err=True)
        sys.exit(1)
    click.echo(f"job {job_id} {status}")
    if study_dir:
        click.echo(f"continue with: hypersweep submit --resume {study_dir} --address {client.get_address()}")


if __name__ == "__main__":
    main()

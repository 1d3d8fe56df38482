import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # full MNIST for slow tests; absent elsewhere


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session."""
    import ray

    from hypersweep.orchestrator.runner import loopback_only
    loopback_only()  # as a study's own Ray: nothing listens beyond 127.0.0.1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch
    torch.set_num_threads(1)  # the same numbers and speed on every machine
    yield


def run_study_file(folder: Path, study: dict, name: str = "study") -> tuple[Path, str]:
    """Write `study` as YAML in `folder`, run it through the CLI on the session's Ray, and
    return (study directory, MLflow URI); fails the test with the CLI's output otherwise."""
    import yaml
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(folder / f"{name}.yaml"), "--study-dir", str(folder / "sd"),
                                       "--tracking-uri", uri, "--no-live"])
    assert result.exit_code == 0, result.output + str(result.exception)
    return folder / "sd", uri

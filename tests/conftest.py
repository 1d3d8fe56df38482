import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # full MNIST for slow tests; absent elsewhere
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session."""
    import ray
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

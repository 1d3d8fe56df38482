"""The wheel installs one import name, `hypersweep`, and nothing else into site-packages."""
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_has_one_top_level_name_and_imports_in_a_fresh_venv(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools leaves build/ beside the sources it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                "studies", "bench", "tests", "configs", ".whl",
                                                                ".gl", "mlruns", "mlflow.db"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    wheel, = (tmp_path / "wheel").glob("hypersweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"hypersweep", wheel.name.split("-py")[0] + ".dist-info"}
    assert {n.split("/")[1] for n in names if n.startswith("hypersweep/")} == {"orchestrator", "workers", "methods"}
    assert "hypersweep/orchestrator/cli.py" in names and "hypersweep/methods/sgd.py" in names

    # A virtualenv outside the repository, without this machine's site-packages (where the
    # development install lives); the packages' __init__ modules need no dependency.
    env = tmp_path / "venv"
    venv.create(env, with_pip=False, system_site_packages=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)

    def imports(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-c", f"import {module}; print({module}.__name__)"], cwd=tmp_path,
                              capture_output=True, text=True)

    for module in ("hypersweep.orchestrator", "hypersweep.workers", "hypersweep.methods"):
        done = imports(module)
        assert done.returncode == 0 and done.stdout.strip() == module, done.stderr
    for module in ("orchestrator", "workers", "methods"):
        assert "ModuleNotFoundError" in imports(module).stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_tags_name_the_commit_of_a_hypersweep_checkout_only(tmp_path):
    """A study's MLflow run says which code ran it: the version always, and the commit and
    whether the package folders had uncommitted changes when that code is a git checkout."""
    from hypersweep.orchestrator.runner import code_tags

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout
    repo = tmp_path / "checkout"
    (repo / "orchestrator").mkdir(parents=True)
    (repo / "orchestrator" / "cli.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", "first")
    tags = code_tags(repo)
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD").strip()
    assert tags["hypersweep.git_dirty"] == "false" and tags["hypersweep.version"]
    (repo / "notes.txt").write_text("outside the package folders\n")
    assert code_tags(repo)["hypersweep.git_dirty"] == "false"
    (repo / "orchestrator" / "cli.py").write_text("x = 2\n")
    assert code_tags(repo)["hypersweep.git_dirty"] == "true"
    # a tree inside some other repository (a venv in a project), or in none: the version only
    assert set(code_tags(repo / "orchestrator")) == {"hypersweep.version"}
    assert set(code_tags(tmp_path)) == {"hypersweep.version"}

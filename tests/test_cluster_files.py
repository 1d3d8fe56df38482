"""The ready cluster files in configs/cluster/: Ray's cluster launcher accepts each of them
(its own schema and checks, as `ray up` applies them), every node installs the laptop's
hypersweep with its `cluster` extra and joins with Ray's token authentication, and the KubeRay
manifest has the RayCluster fields it relies on."""
import copy
from pathlib import Path

import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "cluster"
LAUNCHER = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]


def _check(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER)
def test_ray_s_cluster_launcher_accepts_the_file(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    _check(config)
    broken = {**config, "setup_comands": []}  # a typo: the same checks refuse it
    with pytest.raises(Exception, match="setup_comands"):
        _check(broken)


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_node_gets_this_hypersweep_and_joins_with_a_token(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["file_mounts"]["/tmp/hypersweep-dist"] == "./dist"  # the laptop's wheel
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # the key that signs the Tune state a resume on the head restores (trust.py)
    assert config["file_mounts"]["~/.config/hypersweep/study.key"] == "~/.config/hypersweep/study.key"
    assert any("hypersweep-dist/hypersweep-*.whl" in c and "[cluster]" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), key
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server" in head and "sqlite" not in head


def test_the_kuberay_manifest_has_the_raycluster_fields_it_uses():
    doc = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD takes strings
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups and all(0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"
            assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    # the coordinator on the head signs Tune's state with the laptop user's key (trust.py)
    key = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}["HYPERSWEEP_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "hypersweep-study-key", "key": "key"}
    gpu = groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"


def test_the_cluster_extra_brings_ray_s_jobs_and_dashboard():
    import tomllib
    project = tomllib.loads((CLUSTER.parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("ray[default]") for d in project["optional-dependencies"]["cluster"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_cluster_up_dry_run_says_what_it_would_launch(name):
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    config = yaml.safe_load((CLUSTER / name).read_text())
    r = CliRunner().invoke(main, ["cluster", "up", str(CLUSTER / name), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].startswith(f"cluster {config['cluster_name']!r} on {config['provider']['type']}")
    for node_type in config.get("available_node_types", {}):
        assert f"  {node_type}: " in r.stdout
    assert "RAY_AUTH_MODE=token ray start" in r.stdout and r.stdout.endswith("nothing was started (--dry-run)\n")
    assert r.stderr == ""


def test_cluster_commands_refuse_what_ray_up_would_refuse(tmp_path):
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()), "setup_comands": []}))
    for args in (["up", str(bad), "--dry-run"], ["down", str(bad)], ["status", str(bad)], ["attach", str(bad)]):
        r = CliRunner().invoke(main, ["cluster", *args])
        assert r.exit_code == 2 and r.stderr == \
            f"hypersweep: error: {bad}: Additional properties are not allowed ('setup_comands' was unexpected)\n"
    r = CliRunner().invoke(main, ["cluster", "up", str(CLUSTER / "kuberay.yaml")])
    assert r.exit_code == 2 and f"kubectl apply -f {CLUSTER / 'kuberay.yaml'}" in r.stderr
    r = CliRunner().invoke(main, ["cluster", "up", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "cannot read the cluster file" in r.stderr


def test_cluster_up_without_credentials_fails_in_one_final_line(tmp_path):
    import os
    import subprocess
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "HOME": str(tmp_path)}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)
    r = subprocess.run(["hypersweep", "cluster", "up", str(CLUSTER / "aws-gpu.yaml")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == \
        f"hypersweep: error: `ray up -y {CLUSTER / 'aws-gpu.yaml'}` failed (exit 1); see its output above"

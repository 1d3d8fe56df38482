"""A local study's Ray listens on the loopback interface only: nothing of it is reachable from
the network (a local Ray has no authentication between its processes)."""
import os
import socket
import subprocess
import time

import psutil
import pytest
import yaml

from tests.test_resume import STUDY, _cli, _finish, _journal, _kill_group, _running, _wait_for


def _listening(pid: int) -> dict[str, set[str]]:
    """{process name: addresses it listens on} for the process and its descendants."""
    out: dict[str, set[str]] = {}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.setdefault(proc.name(), set()).add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_a_local_study_listens_on_loopback_only(tmp_path):
    study = {**STUDY, "seeds": 1, "arms": [STUDY["arms"][1]], "budget": {**STUDY["budget"], "seconds": 15}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    sd, uri = tmp_path / "sd", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli("run", str(tmp_path / "study.yaml"), "--study-dir", str(sd), "--tracking-uri", uri, "--no-live")
    try:
        # while trials train: GCS, raylet, the trial actors and the coordinator are all up
        _wait_for(lambda: _running(sd, "rand/seed0") and len(_journal(sd, "rand", 0)) >= 2, 120, run)
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for name, addresses in _listening(run.pid).items():
                seen.setdefault(name, set()).update(addresses)
            time.sleep(0.5)
        out = _finish(run)
    finally:
        _kill_group(run)
    assert run.returncode == 0, out
    assert {"gcs_server", "raylet"} <= set(seen), seen
    wide = {name: a for name, a in seen.items() if not all(psutil_loopback(ip) for ip in a)}
    assert not wide, f"listening beyond loopback: {wide}"


def psutil_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


@pytest.mark.parametrize("address, env, says", [
    ("127.0.0.1:{port}", {}, "no Ray cluster answers at"),
    ("auto", {"RAY_ADDRESS": "127.0.0.1:{port}"}, "no Ray cluster answers at"),  # e.g. a stale cluster
    ("ray://127.0.0.1:{port}", {}, "Ray Client (ray://) is not supported"),
])
def test_an_address_where_no_ray_answers_is_one_line_at_once(tmp_path, address, env, says):
    """Ray would wait on "Failed to connect to GCS" for as long as it runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    address = address.format(port=port)
    t0 = time.monotonic()
    r = subprocess.run(["hypersweep", "run", str(tmp_path / "study.yaml"), "--study-dir", str(tmp_path / "sd"),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--address", address, "--no-live"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **{k: v.format(port=port) for k, v in env.items()}})
    print(f"\n{address}: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"hypersweep: error: --address {address}: ") and says in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing made
